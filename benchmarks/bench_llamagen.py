"""LlamaGen c2i sampling: sequential and ZipAR side by side, torch reference and fast path (Triton attention),
one JSON line per (mode, backend).

  python benchmarks/bench_llamagen.py --model XL --image-size 384 --batch 1 --zipar-window 8 --random-weights
  python benchmarks/bench_llamagen.py --gpt c2i_XL_384.pt --vq vq_ds16_c2i.pt --batch 8 --zipar-window 8
  python benchmarks/bench_llamagen.py --tiny     # CPU smoke test (CI), < 30 s

Each line: ms per batch end to end (labels -> images in [0, 1]) and for the tokens alone, forward passes, img/s.
The fast path needs CUDA (or TRITON_INTERPRET=1 on the CPU, only sensible at --tiny sizes); otherwise its lines
say why they were skipped. Random weights: speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from timing import sync, timed  # noqa: E402  (benchmarks/timing.py)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from var_rt.llamagen_pipeline import LlamaGenPipeline  # noqa: E402
from var_rt.models.llamagen import LlamaGenConfig  # noqa: E402






def fast_path_usable(device) -> str | None:
    """None if the Triton kernel can run here, else the reason."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel in the interpreter)"
    import warnings
    from var_rt import ops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = ops.triton_fn("zipar_attention", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if fn is None:
        return "Triton kernel unavailable: " + "; ".join(str(w.message) for w in caught)
    return None


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
    p.add_argument("--backends", default="torch,triton", help="comma-separated: torch (reference), triton (fast)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (CI smoke test)")
    a = p.parse_args(argv)

    device = torch.device("cpu" if a.tiny else a.device)
    dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    t0 = time.perf_counter()
    if a.tiny:
        cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=64, num_classes=10, grid=4)
        pipe = LlamaGenPipeline.random(cfg, device=device, dtype=dtype, std=0.3)
        a.zipar_window, a.batch, a.warmup, a.iters, a.top_k, name = 2, 1, 0, 1, 20, "tiny"
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
    print(json.dumps({"bench": "llamagen", "event": "loaded", "model": name, "device": str(device), "dtype": dtype,
                      "load_s": round(time.perf_counter() - t0, 2), "grid": pipe.cfg.grid,
                      "params_M": round(sum(x.numel() for x in pipe.gpt.parameters()) / 1e6, 1)}), flush=True)

    labels = [(207 + 97 * i) % pipe.num_classes for i in range(a.batch)]
    kw = dict(cfg=a.cfg, top_k=a.top_k, seed=0)
    for backend in [b.strip() for b in a.backends.split(",") if b.strip()]:
        why = fast_path_usable(device) if backend != "torch" else None
        runner = LlamaGenPipeline(pipe.gpt, pipe.vq, device=device, backend=backend)
        for window in (None, a.zipar_window):
            row = {"bench": "llamagen", "model": name, "image_size": runner.image_size, "batch": a.batch,
                   "mode": "sequential" if window is None else "zipar", "window": window or pipe.cfg.grid,
                   "backend": backend, "device": str(device), "dtype": dtype}
            if why:
                print(json.dumps({**row, "skipped": why}), flush=True)
                continue
            tok = timed(lambda: runner.generate_tokens(labels, zipar_window=window, **kw), device, a.warmup, a.iters)
            end = timed(lambda: runner(labels, zipar_window=window, **kw), device, 0, a.iters)
            row.update(forward_passes=runner.last_forward_passes, ms_tokens=round(tok * 1e3, 2),
                       ms_per_batch=round(end * 1e3, 2), img_per_s=round(a.batch / end, 3))
            if device.type == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
