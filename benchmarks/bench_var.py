"""VAR / CoDe sampling throughput: fast path and torch reference side by side, one JSON line per config.

  python benchmarks/bench_var.py --drafter d30 --refiner d16 --draft-steps 8 --batch 64 --random-weights
  python benchmarks/bench_var.py --drafter d30 --drafter-only --batch 1 --random-weights
  python benchmarks/bench_var.py --tiny          # CPU smoke test (CI)

Each line: ms per batch and img/s for tokens only (labels -> f_hat) and end to end (labels -> uint8 images on
the host), peak MiB (CUDA) and KV pool MiB, plus the time the same batch's GEMMs alone take (cuBLAS/torch
matmul on random operands of the exact shapes), so the ratio to the floor is read off one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from timing import git_commit, sync, timed  # noqa: E402  (benchmarks/timing.py)






def gemm_shapes(pipe, batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every transformer GEMM one generation runs (2B CFG rows), per the schedule."""
    shapes = []
    pns = pipe.cfg.patch_nums
    for phase in pipe.schedule:
        m = pipe.models[phase.model].cfg
        C, V, hid = m.width, m.vocab, round(m.width * m.mlp_ratio)
        chunks = [sum(pns[s] ** 2 for s in phase.prefill)] if phase.prefill else []
        chunks += [pns[s] ** 2 for s in (phase.scales[1:] if phase.prefill else phase.scales)]
        for l in chunks:
            M = 2 * batch * l
            shapes += [(M, C, 3 * C), (M, C, C), (M, C, hid), (M, hid, C)] * m.depth
        for s in phase.scales:
            shapes.append((2 * batch * pns[s] ** 2, C, V))
    return shapes


def gemm_only_seconds(shapes, dtype, device, warmup, iters) -> float:
    ops = [(torch.randn(M, K, dtype=dtype, device=device), torch.randn(K, N, dtype=dtype, device=device)) for M, K, N in shapes]
    return timed(lambda: [a @ b for a, b in ops], device, warmup, iters)




def build(a, device, dtype):
    from var_rt.pipeline import VARPipeline
    if a.tiny:
        from var_rt.models.var import VARConfig
        from var_rt.models.vqvae import VQVAEConfig
        d = VARConfig(depth=2, width=64, heads=2, vocab=64, cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4))
        r = VARConfig(depth=1, width=64, heads=2, vocab=64, cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4))
        vae = VQVAEConfig(vocab=64, cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1)
        n = None if a.drafter_only else min(a.draft_steps or 2, 3)
        return VARPipeline.random(d, refiner_depth=None if a.drafter_only else r, draft_steps=n, vae_cfg=vae,
                                  device=device, dtype=dtype)
    depth = int(a.drafter.lstrip("d"))
    if a.drafter_only or a.refiner is None:
        return VARPipeline.random(depth, device=device, dtype=dtype)
    return VARPipeline.random(depth, refiner_depth=int(a.refiner.lstrip("d")), draft_steps=a.draft_steps,
                              device=device, dtype=dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", "--var", dest="drafter", default="d30", help="drafter (or plain VAR) depth, e.g. d30")
    p.add_argument("--refiner", default=None, help="refiner depth, e.g. d16 (CoDe)")
    p.add_argument("--draft-steps", type=int, default=None)
    p.add_argument("--drafter-only", action="store_true", help="the drafter alone over all scales")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--random-weights", action="store_true", help="(the only mode: speed does not depend on weights)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backends", default=None, help="comma list; default 'torch,triton' on CUDA, 'torch' on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU: a smoke test")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if a.tiny:
        a.batch, a.warmup, a.iters = min(a.batch, 2), 1, 2
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    backends = (a.backends or ("torch,triton" if device.type == "cuda" or (a.tiny and interp) else "torch")).split(",")
    from var_rt.images import to_uint8
    pipe = build(a, device, dtype)
    torch_dtype = next(iter(pipe.models.values())).head.weight.dtype
    labels = torch.arange(a.batch) % pipe.num_classes
    gemm_s = gemm_only_seconds(gemm_shapes(pipe, a.batch), torch_dtype, device, a.warmup, a.iters)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
        "config": "tiny" if a.tiny else (f"{a.drafter}" if a.drafter_only or not a.refiner else
                                         f"CoDe {a.drafter}+{a.refiner} N={a.draft_steps}"),
        "batch": a.batch, "dtype": dtype,
    }
    rows = []
    for backend in backends:
        pipe.backend = backend
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kw = dict(cfg=4.0, top_k=900, top_p=0.95, seed=0)
        t_tok = timed(lambda: pipe.generate_latents(labels, **kw), device, a.warmup, a.iters)
        t_e2e = timed(lambda: to_uint8(pipe(labels, **kw)), device, a.warmup, a.iters)
        row = dict(meta, backend=backend,
                   ms_tokens=round(t_tok * 1e3, 3), img_s_tokens=round(a.batch / t_tok, 2),
                   ms_end_to_end=round(t_e2e * 1e3, 3), img_s_end_to_end=round(a.batch / t_e2e, 2),
                   ms_gemm_only=round(gemm_s * 1e3, 3), gemm_fraction_tokens=round(gemm_s / t_tok, 3),
                   kv_pool_mib=round(pipe.last_stats["kv_pool_bytes"] / 2**20, 2),
                   peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
