#!/usr/bin/env bash
# The GPU checks and timings, in two parts that each fit one device call (under ~8 minutes on one H200, the
# install included), plus a CPU dry run of every step of both parts at tiny sizes (CI runs it, so the suite
# cannot rot):
#   VAR_RT_COMMIT=<sha> bash benchmarks/run_gpu_suite.sh part1 OUT   # install, info, CUDA tests, kernel tests
#                                                                    # compiled, bench_kernels, VAR/CoDe batch 1
#   VAR_RT_COMMIT=<sha> bash benchmarks/run_gpu_suite.sh part2 OUT   # install, VAR/CoDe batch 64, LlamaGen-XL 384
#   bash benchmarks/run_gpu_suite.sh --dry-run OUT   # both parts, tiny, CPU interpreter ($PYTHON, else .venv's)
# The GPU machine gets the tree without .git: pass the commit as VAR_RT_COMMIT (every JSON line also carries a
# hash of the sources it ran, `source`). Nothing is downloaded. Python is $PYTHON (default python3; the
# dry run defaults to .venv/bin/python where it exists).
#
# OUT holds at most 6 files (the device tool brings back 8): steps.jsonl (one line per step: status, seconds,
# estimate, timeout, device, date, commit), log.txt (every step's output), bench_var.jsonl, bench_kernels.jsonl,
# bench_llamagen.jsonl, summary.txt (the table printed last, so it shows in a truncated output tail).
#
# Time: each step has an estimate (seconds on one H200, in the step list below) and a timeout. A step starts only
# if its estimate fits in what is left of the part's budget (PART_BUDGET_S, default 480 s); else it and the
# rest are recorded as skipped. Its timeout is cut so that the estimates of the steps after it still fit, and
# never runs past the budget: a slow test step is stopped rather than starving the benchmarks, and a part ends
# within its budget (plus a few seconds to kill a step) however the steps behave. Exit status: 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-}"
OUT="${2:-${OUT:-out/gpu}}"
case "$MODE" in
  part1|part2) DRY=0; PARTS="$MODE" ;;
  --dry-run|dry-run) DRY=1; PARTS="part1 part2" ;;
  *) echo "usage: bash benchmarks/run_gpu_suite.sh part1|part2|--dry-run OUT" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi  # make's venv
BUDGET="${PART_BUDGET_S:-480}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1   # tiny models, Triton kernels in the interpreter on the CPU
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny tensors: intra-op threads only add overhead
  TINY="--tiny"
else
  export TRITON_INTERPRET=0   # explicit: tests only default to the interpreter when no CUDA device is present
  TINY=""
fi
if [ -z "${VAR_RT_COMMIT:-}" ]; then
  VAR_RT_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ "$VAR_RT_COMMIT" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then VAR_RT_COMMIT+="+dirty"; fi
fi
export VAR_RT_COMMIT
DEVICE="$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)"
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# pytest: parallel workers (compiles Triton kernels in parallel) and a per-test timeout, where the plugins exist
PYTEST_X="--continue-on-collection-errors"
$PY -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && PYTEST_X+=" -n 8"
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_X+=" --timeout 120"
# the Triton kernel tests that run on CUDA tensors when compiled (files that pick DEV = cuda), and the C++ ext.
KERNEL_TESTS="$(grep -l 'DEV = torch.device("cuda"' tests/test_*.py | tr '\n' ' ')tests/test_rvq_ext.py"

FAILED=0
declare -a NAMES ESTS TOUTS CMDS
STEPLOG="$(mktemp)"; trap 'rm -f "$STEPLOG"' EXIT
[ "$DRY" = 1 ] && rm -f "$OUT"/{steps.jsonl,log.txt,bench_var.jsonl,bench_kernels.jsonl,bench_llamagen.jsonl,bench_serve.jsonl,summary.txt}

add() {  # add NAME EST_S TIMEOUT_S COMMAND...  (the command is one string, run by bash -c)
  NAMES+=("$1"); ESTS+=("$2"); TOUTS+=("$3"); CMDS+=("$4")
}

record() {  # record PART STEP STATUS RC SECONDS EST TIMEOUT [NOTE]
  printf '{"part": "%s", "step": "%s", "status": "%s", "rc": %s, "seconds": %s, "est_s": %s, "timeout_s": %s, "note": "%s", "device": "%s", "date": "%s", "commit": "%s", "dry_run": %s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "${8:-}" "$DEVICE" "$DATE" "$VAR_RT_COMMIT" "$([ "$DRY" = 1 ] && echo true || echo false)" \
    >> "$OUT/steps.jsonl"
}

run_part() {  # run_part PART: the steps added, under the part's budget
  local part="$1" start=$PART_START n=${#NAMES[@]} i j
  for ((i = 0; i < n; i++)); do
    local name="${NAMES[$i]}" est="${ESTS[$i]}" tout="${TOUTS[$i]}" cmd="${CMDS[$i]}"
    [ "$DRY" = 1 ] && est=10   # the estimates are H200 seconds; tiny CPU steps take a few seconds each
    local left=$((BUDGET - (SECONDS - start))) reserve=0   # reserve: the estimates of the steps after this one
    for ((j = i + 1; j < n; j++)); do
      if [ "$DRY" = 1 ]; then reserve=$((reserve + 10)); else reserve=$((reserve + ESTS[j])); fi
    done
    if [ "$left" -lt "$est" ]; then
      echo "[$part] $name: SKIPPED (part budget: ${left}s left < estimate ${est}s)"
      record "$part" "$name" skipped null 0 "$est" null "part budget: ${left}s left < estimate ${est}s"
      continue
    fi
    local t=$((left - reserve)); [ "$t" -lt "$est" ] && t=$est; [ "$t" -gt "$tout" ] && t=$tout; [ "$t" -gt "$left" ] && t=$left
    local t0=$SECONDS
    echo "===== [$part] $name (estimate ${est}s, timeout ${t}s): $cmd" >> "$OUT/log.txt"
    STEP_TIMEOUT=$t timeout -k 10 "$t" bash -c "set -o pipefail; $cmd" > "$STEPLOG" 2>&1
    local rc=$? dt=$((SECONDS - t0)) status=ok
    cat "$STEPLOG" >> "$OUT/log.txt"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
    [ "$status" != ok ] && FAILED=1
    # note: pytest's summary line ("12 passed, 1 skipped in 40.2s"), if the step printed one
    local note; note="$(grep -E '[0-9]+ (passed|failed|skipped|error|deselected)|tests? collected' "$STEPLOG" | tail -n 1 | tr -d '"\\=' | cut -c1-150)"
    echo "[$part] $name: $status in ${dt}s (estimate ${est}s, timeout ${t}s) $note"
    if [ "$status" != ok ]; then tail -n 8 "$STEPLOG" | sed 's/^/    | /' | cut -c1-200; fi
    record "$part" "$name" "$status" "$rc" "$dt" "$est" "$t" "$note"
  done
  NAMES=(); ESTS=(); TOUTS=(); CMDS=()
}

# ---- the steps. Estimates (EST) are seconds on one H200 (16 cores) from the sizes involved; TIMEOUT caps each.
VAR="$PY benchmarks/bench_var.py --random-weights $TINY"
LG="$PY benchmarks/bench_llamagen.py --model XL --image-size 384 --zipar-window 8 --random-weights $TINY"
install_step() {
  # pip install -e: builds var_rt._C (c++ and nvcc for sm_80 + sm_90, ~500 lines): ~30-60 s on a fresh machine,
  # ~15 s when the build folder is still there (a warm machine, part 2 after part 1).
  if [ "$DRY" = 1 ]; then echo "(dry run: the venv's install is used; no pip install)"; return; fi
  add install 60 180 "$PY -m pip install --no-build-isolation --no-deps -e . && $PY -c 'import var_rt._C'"
}
part1() {
  install_step
  add info 10 60 "$PY -m var_rt.cli info"   # imports torch, triton, var_rt._C: ~5 s
  # -m cuda: ~15 tests (real VAR shapes, graph replay of tiny models, the CUDA rvq kernel); most of the time is
  # compiling the Triton kernels (~1 s each, 8 xdist workers in parallel) and collecting tests: ~60-90 s.
  if [ "$DRY" = 1 ]; then
    add tests_cuda 10 120 "$PY -m pytest -q $PYTEST_X -m cuda tests"   # collects everything, skips all on the CPU
    add tests_kernels_compiled 10 120 "$PY -m pytest -q $PYTEST_X --collect-only -m 'not cuda' $KERNEL_TESTS | tail -3"
  else
    add tests_cuda 90 200 "$PY -m pytest -q $PYTEST_X -m cuda tests"
    # ~250 small tests compiled (the -m cuda ones ran above): ~100+ kernel specialisations to compile, 8 workers
    add tests_kernels_compiled 90 240 "$PY -m pytest -q $PYTEST_X -m 'not cuda' $KERNEL_TESTS"
  fi
  # per kernel case: 3 warm-ups, a 20-call graph capture, 3 timed replays; ~170 cases at d30/d16 batch 64: ~40 s,
  # plus the compiles not cached by the tests: ~60 s
  add bench_kernels 60 150 "$PY benchmarks/bench_kernels.py $TINY --out $OUT/bench_kernels.jsonl | grep '^#'"
  # d30 + d16 random weights built once (CPU randn of 2.3e9 values: ~20-30 s); per config the GEMM floor (~1 s),
  # fast path 2 + 5 generations (+ graph capture, compiles: ~15 s the first time), the torch reference 1 + 3
  # (~0.5-1 s each at batch 1): ~100-120 s for the three configs. --stream: per backend a `row: stream` line,
  # pipe(...) vs stream every=1 / every=2 (3 x the generations above, plus 10 and 5 preview decodes each, and
  # the segments' graph captures): ~+40 s
  add var_b1 160 300 "$VAR --batch 1 --configs d30 d30+d16:8 d30+d16:6 --warmup 2 --iters 5 --ref-warmup 1 --ref-iters 3 --stream --out $OUT/bench_var.jsonl"
}
part2() {
  install_step
  # batch 64: fast path ~0.5-1 s a generation (2 + 5), the torch reference ~2-3 s (1 + 2); weights ~30 s;
  # ~30 s a config, plus ~30 s of Triton compiles on a fresh machine (a warm one kept part 1's cache): ~180 s
  add var_b64 180 300 "$VAR --batch 64 --configs d30 d30+d16:8 d30+d16:6 --warmup 2 --iters 5 --ref-warmup 1 --ref-iters 2 --out $OUT/bench_var.jsonl"
  # LlamaGen-XL 384 (24x24 tokens; weights initialised on the GPU: ~5 s). Fast path 1 + 3 generations each of
  # sequential (577 passes, ~2-3 s with graphs) and ZipAR w=8 (225 passes, ~1 s), plus capture and compiles:
  # ~45 s. The torch reference: 0 warm-ups, 1 generation, ZipAR first (~12 s), then sequential (~30 s) only if
  # its estimate (per-pass time x passes) fits in the step's time left (--budget-s); otherwise its line says
  # skipped and why. ~100 s at batch 1, ~110 s at batch 8.
  add llamagen_b1 100 200 "$LG --batch 1 --warmup 1 --iters 3 --ref-warmup 0 --ref-iters 1 --budget-s \$((STEP_TIMEOUT - 15)) --out $OUT/bench_llamagen.jsonl"
  add llamagen_b8 110 200 "$LG --batch 8 --warmup 1 --iters 3 --ref-warmup 0 --ref-iters 1 --budget-s \$((STEP_TIMEOUT - 15)) --out $OUT/bench_llamagen.jsonl"
  # var-rt serve on loopback (demo VAR): 1 / 4 / 16 / 64 clients, 3 s a level, then the offline pipeline at the
  # same batch sizes, 3 s each; server start ~10 s: ~40 s. Last: skipped when the part's budget is spent.
  add serve 40 90 "$PY benchmarks/bench_serve.py $TINY --seconds 3 --out $OUT/bench_serve.jsonl"
}
# Sum of estimates: part 1 ~470 s, part 2 ~450 s (each with its install; part 2's serve step, +40 s, runs when
# time is left), under the 480 s budget; a device call
# also spends ~1-2 min starting the machine, so a part fits a 10-minute call.

PART_START=0   # the first part's budget counts from the script's start (the probes above: ~5-10 s)
for part in $PARTS; do
  $part
  echo "[$part] start: device $DEVICE, commit $VAR_RT_COMMIT, TRITON_INTERPRET=$TRITON_INTERPRET, budget ${BUDGET}s, out $OUT"
  run_part "$part"
  PART_START=$SECONDS
done

# ---- the table, printed last
$PY - "$OUT" "$SECONDS" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out, total = pathlib.Path(sys.argv[1]), sys.argv[2]

def rows(name):
    p = out / name
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []

def g(r, k, fmt):
    v = r.get(k)
    return format(v, fmt) if isinstance(v, (int, float)) else "-"

print(f"\n== steps ({total} s in all)")
for r in rows("steps.jsonl"):
    print(f"{r['part']:6s} {r['step']:24s} {r['status']:8s} {r['seconds']:>5}s  (est {r['est_s']}s) {r['note']}")
var = rows("bench_var.jsonl")
if var:
    print(f"== bench_var  ({var[0].get('device')}, {var[0].get('date')}, commit {var[0].get('commit')})")
    print(f"{'config':24s} {'batch':>5s} {'backend':7s} {'ms tok':>9s} {'img/s e2e':>9s} {'gemm frac':>9s} {'peak MiB':>9s} graphs")
    for r in var:
        note = r.get("error") or r.get("skipped") or (r.get("graphs") or "")[:40]
        if r.get("row") == "stream" and not r.get("error"):  # streaming previews: the call vs the stream
            note = (f"stream: call {g(r, 'ms_call', '.1f')} ms, every=1 {g(r, 'ms_stream_every1', '.1f')} ms "
                    f"({g(r, 'stream_overhead_every1', '+.0%')}), every=2 {g(r, 'ms_stream_every2', '.1f')} ms")
        print(f"{r.get('config', '?'):24s} {r.get('batch', 0):5d} {r.get('backend', '-'):7s} {g(r, 'ms_tokens', '9.1f'):>9s} "
              f"{g(r, 'img_s_end_to_end', '9.1f'):>9s} {g(r, 'gemm_fraction_tokens', '9.3f'):>9s} "
              f"{g(r, 'peak_mib', '9.0f'):>9s} {note}")
lg = rows("bench_llamagen.jsonl")
if lg:
    print(f"== bench_llamagen  ({lg[0].get('device')})")
    print(f"{'model':6s} {'batch':>5s} {'mode':10s} {'backend':7s} {'passes':>6s} {'ms tok':>9s} {'ms/batch':>9s} {'peak MiB':>9s} graphs")
    for r in lg:
        note = r.get("error") or r.get("skipped") or (r.get("graphs") or "")[:40]
        print(f"{r.get('model', '?'):6s} {r.get('batch', 0):5d} {r.get('mode', '?'):10s} {r.get('backend', '?'):7s} "
              f"{g(r, 'forward_passes', '6d'):>6s} {g(r, 'ms_tokens', '9.1f'):>9s} {g(r, 'ms_per_batch', '9.1f'):>9s} "
              f"{g(r, 'peak_mib', '9.0f'):>9s} {note}")
for r in rows("bench_serve.jsonl"):
    print(f"== bench_serve  ({r.get('device')}, demo {r.get('demo')}): server / offline images/s at "
          f"{r['levels'][-1]['concurrency']} clients = {g(r, 'ratio', '.2f')} (target {r.get('target_ratio')})")
    for lv, off in zip(r["levels"], r["offline"]):
        print(f"  {lv['concurrency']:3d} clients: p50 {g(lv, 'p50_ms', '.1f')} ms, p99 {g(lv, 'p99_ms', '.1f')} ms, "
              f"{g(lv, 'images_per_s', '.1f')} img/s (mean batch {g(lv, 'mean_batch', '.1f')}); offline batch "
              f"{off['batch']}: {g(off, 'images_per_s', '.1f')} img/s")
k = rows("bench_kernels.jsonl")
if k:
    tri = [r for r in k if r.get("impl") == "triton"]
    worst = sorted(tri, key=lambda r: r.get("roof") or 0)[:3]
    print(f"== bench_kernels: {len(k)} lines, {len(tri)} triton cases; lowest roofline fraction: " +
          ", ".join(f"{r['kernel']} {r['model']} pn{r['pn']} {g(r, 'roof', '.2f')}" for r in worst))
print(f"files in {out}: " + " ".join(sorted(p.name for p in out.iterdir())))
PY
exit $FAILED
