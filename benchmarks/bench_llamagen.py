"""LlamaGen c2i sampling: sequential and ZipAR, fast path (Triton, CUDA graphs) first, then the torch reference;
one JSON line per (backend, mode).

  python3 benchmarks/bench_llamagen.py --model XL --image-size 384 --batch 1 --zipar-window 8 --random-weights
  python3 benchmarks/bench_llamagen.py --gpt c2i_XL_384.pt --vq vq_ds16_c2i.pt --batch 8 --zipar-window 8
  python3 benchmarks/bench_llamagen.py --tiny     # CPU smoke test (CI), a few seconds

Each line: ms per batch for the tokens alone and end to end (labels -> images in [0, 1]: tokens + VQ decode, both
timed in the same iteration, so one generation gives both), forward passes, img/s, peak MiB, whether the tokens
ran as a CUDA-graph replay (`graphs`), and the warm-ups / iterations used. Each backend gets its own pipeline
(own KV arena, own graphs) around the same weights. The torch reference is slow at full size (XL-384
sequential: ~30 s a generation), so it gets its own, smaller --ref-warmup / --ref-iters (default 0 and 1), runs
ZipAR before sequential, and with --budget-s a reference run whose estimated time (from the per-pass time
already measured) does not fit in what is left is skipped: its line says `skipped` and why. The fast path needs
CUDA (or TRITON_INTERPRET=1 on the CPU, only sensible at --tiny sizes); otherwise its lines say why they were
skipped. Random weights: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout
from timing import cuda_reset, peak_mib, run_meta, sync, timed_split  # noqa: E402  (benchmarks/timing.py)

from var_rt.llamagen_pipeline import LlamaGenPipeline  # noqa: E402
from var_rt.models.llamagen import LlamaGenConfig  # noqa: E402

T0 = time.monotonic()


def fast_path_usable(device) -> str | None:
    """None if the Triton kernel can run here, else the reason."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel in the interpreter)"
    from var_rt import ops
    impl, why = ops.describe_backends(device, "fast")["zipar_attention"]
    return None if impl == ops.dispatch.TRITON else f"Triton kernel unavailable: {why}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="XL", help="B, L, XL, XXL or 3B (with --random-weights)")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--zipar-window", type=int, default=8)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--gpt", help="official c2i_*.pt instead of random weights")
    p.add_argument("--vq", help="official vq_ds16_c2i.pt (with --gpt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    p.add_argument("--backends", default="fast,torch", help="comma list, timed in this order: fast, torch")
    p.add_argument("--modes", default="sequential,zipar", help="fast path: these modes, in this order")
    p.add_argument("--ref-modes", default="zipar,sequential",
                   help="torch reference: these modes, in this order ('none' to skip it; ZipAR first sizes sequential)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--ref-warmup", type=int, default=0, help="torch reference warm-ups")
    p.add_argument("--ref-iters", type=int, default=1, help="torch reference iterations")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip a reference run whose estimated time exceeds what is left of this many seconds "
                        "(counted from the start of the process)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (CI smoke test)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = p.parse_args(argv)

    device = torch.device("cpu" if a.tiny else a.device)
    dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    t0 = time.perf_counter()
    if a.tiny:
        cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=64, num_classes=10, grid=3)  # 9 tokens
        pipe = LlamaGenPipeline.random(cfg, device=device, dtype=dtype, std=0.3)
        a.zipar_window, a.batch, a.top_k, name = 2, min(a.batch, 2), 20, "tiny"
        a.warmup, a.iters, a.ref_warmup, a.ref_iters = 0, 1, 0, 1
    elif a.gpt:
        if not a.vq:
            p.error("--gpt needs --vq")
        pipe = LlamaGenPipeline.from_checkpoints(gpt=a.gpt, vq=a.vq, device=device, dtype=dtype,
                                                 image_size=a.image_size)
        name = os.path.basename(a.gpt)
    elif a.random_weights:
        pipe = LlamaGenPipeline.random(a.model, image_size=a.image_size, device=device, dtype=dtype)
        name = a.model
    else:
        p.error("give --random-weights, --gpt/--vq or --tiny")
    sync(device)
    base = dict(run_meta(device), bench="llamagen", model=name, image_size=pipe.image_size, batch=a.batch,
                dtype=dtype, load_s=round(time.perf_counter() - t0, 2),
                params_M=round(sum(x.numel() for x in pipe.gpt.parameters()) / 1e6, 1))

    def emit(row):  # print and append at once: a run cut short by a timeout keeps what it measured
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    labels = [(207 + 97 * i) % pipe.num_classes for i in range(a.batch)]
    kw = dict(cfg=a.cfg, top_k=a.top_k, seed=0)
    windows = {"sequential": None, "zipar": a.zipar_window}
    per_pass_s = {}  # backend -> seconds per forward pass, from the runs made so far (sizes the next ones)
    failed = False
    for backend in [b.strip() for b in a.backends.split(",") if b.strip()]:
        ref = backend == "torch"
        modes = a.ref_modes if ref else a.modes
        modes = [m.strip() for m in modes.split(",") if m.strip() and m.strip() != "none"]
        warmup, iters = (a.ref_warmup, a.ref_iters) if ref else (a.warmup, a.iters)
        why = fast_path_usable(device) if not ref else None
        cuda_reset(device)
        runner = LlamaGenPipeline(pipe.gpt, pipe.vq, device=device, backend=backend)  # fresh: no shared state
        for mode in modes:
            window = windows[mode]
            row = dict(base, mode=mode, window=window or pipe.cfg.grid, backend=backend, warmup=warmup, iters=iters)
            passes = len(runner.plan(window))
            est = per_pass_s[backend] * passes * (warmup + iters) if backend in per_pass_s else None
            left = None if a.budget_s is None else a.budget_s - (time.monotonic() - T0)
            if why is None and ref and left is not None and (left <= 0 or (est is not None and est > left)):
                why = (f"over budget: estimated {est:.0f} s ({passes} passes x {warmup + iters} runs), {left:.0f} s left"
                       if est is not None else f"over budget: {left:.0f} s left")
                row["estimated_s"] = None if est is None else round(est, 1)
            if why:
                emit({**row, "skipped": why})
                why = None if ref else why  # a budget skip concerns this mode only
                continue
            try:
                if device.type == "cuda":  # peak of this mode (the previous mode's graphs and arena still count)
                    torch.cuda.reset_peak_memory_stats()

                def decode(ids):  # as LlamaGenPipeline.__call__
                    return (runner.vq.decode_tokens(ids) + 1) / 2
                tok, end = timed_split(lambda: runner.generate_tokens(labels, zipar_window=window, **kw), decode,
                                       device, warmup, iters)
                per_pass_s[backend] = tok / runner.last_forward_passes
                graphs = runner._graphs.last_mode if runner._graphs is not None else (
                    "eager: graphs off (not CUDA)" if device.type != "cuda" else "eager: reference sampler")
                row.update(forward_passes=runner.last_forward_passes, ms_tokens=round(tok * 1e3, 2),
                           ms_per_batch=round(end * 1e3, 2), img_per_s=round(a.batch / end, 3), graphs=graphs,
                           peak_mib=peak_mib(device))
            except Exception as e:  # noqa: BLE001  (report, go on)
                import traceback
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                failed = True
            emit(row)
        del runner
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
