#!/usr/bin/env bash
# One GPU session's checks and timings in one go (for the device tool: budget ~10 minutes).
#   bash benchmarks/run_gpu_suite.sh [OUT_DIR]
# Installs var_rt in place (no downloads), runs the CUDA tests and the kernels compiled (not interpreted),
# then the VAR / CoDe / LlamaGen benchmarks at the target configs; JSON lines land in OUT_DIR/*.jsonl and a
# short table is printed last. Copy the JSON into benchmarks/results/ with the device name and date.
set -uo pipefail
OUT="${1:-${OUT:-out/gpu}}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
var-rt info | tee "$OUT/info.txt"
timeout 240 python -m pytest -q -m cuda tests 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
timeout 240 python -m pytest -q -x tests/test_kernels.py tests/test_kernels_fused.py tests/test_rvq_ext.py 2>&1 | tail -5 | tee "$OUT/pytest_kernels_compiled.txt"
B="python benchmarks/bench_var.py --random-weights --warmup 2 --iters 5 --out $OUT/bench_var.jsonl"
for bs in 64 1; do
  timeout 300 $B --drafter d30 --drafter-only --batch $bs
  timeout 300 $B --drafter d30 --refiner d16 --draft-steps 8 --batch $bs
  timeout 300 $B --drafter d30 --refiner d16 --draft-steps 6 --batch $bs
done
timeout 300 python benchmarks/bench_kernels.py --out "$OUT/bench_kernels.jsonl" > "$OUT/bench_kernels.txt" 2>&1
for bs in 1 8; do
  timeout 300 python benchmarks/bench_llamagen.py --model XL --image-size 384 --batch $bs --zipar-window 8 \
    --random-weights >> "$OUT/bench_llamagen.jsonl"
done
python - "$OUT" <<'PY'
import json, sys, pathlib
rows = [json.loads(l) for l in (pathlib.Path(sys.argv[1]) / "bench_var.jsonl").read_text().splitlines() if l.strip()]
print(f"{'config':28s} {'batch':>5s} {'backend':8s} {'ms tok':>9s} {'img/s e2e':>10s} {'gemm frac':>9s} {'peak MiB':>9s}")
for r in rows:
    print(f"{r['config']:28s} {r['batch']:5d} {r['backend']:8s} {r['ms_tokens']:9.1f} {r['img_s_end_to_end']:10.1f} "
          f"{r['gemm_fraction_tokens']:9.3f} {str(r['peak_mib']):>9s}")
PY
