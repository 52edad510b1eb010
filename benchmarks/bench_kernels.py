"""Triton kernels vs their torch references, scale by scale at the real VAR shapes; one JSON line per case.

  python benchmarks/bench_kernels.py                    # CUDA: VAR-d30 and d16, batch 64 (2 x 64 CFG rows)
  python benchmarks/bench_kernels.py --models d30 --batch 16 --out results/kernels.jsonl
  python benchmarks/bench_kernels.py --tiny             # CPU smoke test under TRITON_INTERPRET=1 (CI)

Human-readable lines start with '#'; the others are JSON. Per case: ms (CUDA-graph replay when capturable, else eager; say which), achieved TFLOP/s and TB/s, and
`roof` = the roofline time max(flop / peak_flop, bytes / peak_bw) over the measured time, where the peaks are
measured in the same run: a big bf16 matmul (FLOP/s) and a big device copy (bytes read + written per second).
Cases: attention (ours; torch reference; normalise + SDPA as the official code; flash-attn if importable),
adaln, bicubic upsample of h to 16x16, area downsample of f_hat, token sampling (top-k 900, top-p 0.96).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
MODELS = {"d30": dict(C=1920, H=30), "d16": dict(C=1024, H=16)}  # head dim 64, width 64 * depth
TINY = dict(models={"tiny": dict(C=32, H=2)}, patch_nums=(1, 2, 3), batch=1, vocab=64, cvae=4, hw=4)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes; on CPU under TRITON_INTERPRET=1 (smoke test)")
    ap.add_argument("--models", nargs="+", default=["d30", "d16"], choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=64, help="images per batch (attention/adaln run 2x: CFG)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--kernels", nargs="+", default=["attention", "adaln", "resample", "sampling"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", help="append the JSON lines to this file too")
    return ap.parse_args()


def timer(device, iters, graphs):
    """(fn) -> (seconds per call, mode): CUDA-graph replay of `iters` calls if capturable, else an eager loop."""
    def run(fn, graph=True):
        if device.type != "cuda":
            fn()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters, "eager"
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        mode = "eager"
        if graphs and graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(iters):
                        fn()
                g.replay()
                torch.cuda.synchronize()
                call, mode = g.replay, "graph"
            except Exception:  # not capturable after all: time it eagerly
                torch.cuda.synchronize()
        if mode == "eager":
            def call():
                for _ in range(iters):
                    fn()
        best = float("inf")
        for _ in range(3):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            call()
            e1.record()
            torch.cuda.synchronize()
            best = min(best, e0.elapsed_time(e1) / 1e3 / iters)
        return best, mode
    return run


def ceilings(device, run):
    """Peak bytes/s (copy of 1 GiB: read + write) and bf16 FLOP/s (8192^3 matmul), measured now."""
    if device.type != "cuda":
        a = torch.empty(1 << 22, device=device)
        t, _ = run(lambda: a.clone())
        return 2 * a.numel() * 4 / t, None
    a = torch.empty(1 << 28, device=device)
    b = torch.empty_like(a)
    t, _ = run(lambda: b.copy_(a))
    bw = 2 * a.numel() * 4 / t
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t, _ = run(lambda: m @ m)
    return bw, 2 * 8192 ** 3 / t


class Report:
    def __init__(self, out, bw, flops, meta):
        self.f = open(out, "a") if out else None
        self.bw, self.flops, self.meta = bw, flops, meta  # meta: device, date, commit, ... (timing.run_meta)
        print(f"# ceilings: copy {bw / 1e12:.3f} TB/s" + (f", bf16 matmul {flops / 1e12:.1f} TFLOP/s" if flops else ""))
        print(f"# {'kernel':<10} {'model':<5} {'pn':>3} {'impl':<14} {'ms':>9} {'TFLOP/s':>8} {'TB/s':>7} {'roof':>5} mode")

    def __call__(self, kernel, model, pn, impl, sec, mode, flop=0.0, nbytes=0.0, **extra):
        roof_t = max(flop / self.flops if self.flops else 0.0, nbytes / self.bw)
        rec = dict(kernel=kernel, model=model, pn=pn, impl=impl, ms=sec * 1e3, mode=mode,
                   tflops=flop / sec / 1e12, tbps=nbytes / sec / 1e12, roof=roof_t / sec if roof_t else None,
                   ceiling_tbps=self.bw / 1e12, ceiling_tflops=self.flops / 1e12 if self.flops else None,
                   **self.meta, **extra)
        roof = f"{rec['roof']:.2f}" if rec["roof"] is not None else "-"
        print(f"# {kernel:<10} {model:<5} {pn:>3} {impl:<14} {rec['ms']:>9.4f} {rec['tflops']:>8.2f} {rec['tbps']:>7.3f} "
              f"{roof:>5} {mode}", flush=True)
        line = json.dumps(rec)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()
        print(line, flush=True)


def bench_attention(K, ops, rep, run, dev, dt, name, C, H, rows, pns):
    """Per scale: the fused kernel (qkv in, pool write + attention, (N, l, C) out) against the torch reference
    and the official path (normalise in the model dtype, SDPA with scale 1, transpose back)."""
    D = C // H
    Lmax = sum(p * p for p in pns)
    pool = torch.randn(2, rows, H, Lmax, D, device=dev, dtype=dt)  # one layer's view of the preallocated KV pool
    sm = torch.rand(H, device=dev) * 30 + 1
    try:
        from flash_attn import flash_attn_func
    except Exception:
        flash_attn_func = None
    start = 0
    for pn in pns:
        Lq = pn * pn
        Lk = start + Lq
        qkv = torch.randn(rows, Lq, 3 * C, device=dev, dtype=dt)
        out = torch.empty(rows, Lq, C, device=dev, dtype=dt)
        flop = 4.0 * rows * H * Lq * Lk * D
        nbytes = float(rows * H * (3 * Lq + 2 * Lk + 2 * Lq) * D * qkv.element_size())  # qkv + pool read, k/v + o written
        t, m = run(lambda: K.var_attention(qkv, pool, start, sm, out=out))
        rep("attention", name, pn, "triton", t, m, flop, nbytes, Lq=Lq, Lk=Lk)
        t, m = run(lambda: ops.var_attention_ref(qkv, pool, start, sm))
        rep("attention", name, pn, "torch_ref", t, m, flop, nbytes, Lq=Lq, Lk=Lk)
        q, k, v = qkv.view(rows, Lq, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        kc, vc = pool[0, :, :, :Lk], pool[1, :, :, :Lk]

        def sdpa():  # the official code's path: normalise in the model dtype, then SDPA with scale 1
            kc[:, :, start:] = F.normalize(k, dim=-1)
            vc[:, :, start:] = v
            qn = F.normalize(q, dim=-1) * sm.to(dt).view(1, -1, 1, 1)
            o = F.scaled_dot_product_attention(qn, kc, vc, scale=1.0)
            return o.transpose(1, 2).reshape(rows, Lq, C)
        t, m = run(sdpa)
        rep("attention", name, pn, "torch_sdpa", t, m, flop, nbytes, Lq=Lq, Lk=Lk)
        if flash_attn_func is not None and dev.type == "cuda" and dt != torch.float32:
            qf, kf, vf = qkv.view(rows, Lq, 3, H, D)[:, :, 0], kc.transpose(1, 2), vc.transpose(1, 2)  # (B, L, H, D)
            t, m = run(lambda: flash_attn_func(qf, kf, vf, softmax_scale=1.0))
            rep("attention", name, pn, "flash_attn", t, m, flop, nbytes, Lq=Lq, Lk=Lk, note="no l2-norm")
        start = Lk


def bench_adaln(K, ops, rep, run, dev, dt, name, C, rows, pns):
    ada = torch.randn(rows, 1, 6 * C, device=dev, dtype=dt)
    scale, shift = ada[..., 2 * C:3 * C], ada[..., 4 * C:5 * C]
    for pn in pns:
        x = torch.randn(rows, pn * pn, C, device=dev, dtype=dt)
        out = torch.empty_like(x)
        nbytes = float(2 * x.numel() * x.element_size() + 2 * rows * C * x.element_size())
        t, m = run(lambda: K.adaln(x, scale, shift, out=out))
        rep("adaln", name, pn, "triton", t, m, 0.0, nbytes, L=pn * pn)
        t, m = run(lambda: ops.adaln_ref(x, scale, shift))
        rep("adaln", name, pn, "torch_ref", t, m, 0.0, nbytes, L=pn * pn)


def bench_resample(K, ops, rep, run, dev, batch, pns, cvae, hw):
    f_hat = torch.randn(batch, cvae, hw, hw, device=dev)
    up = torch.empty_like(f_hat)
    for pn in pns[:-1]:
        h = torch.randn(batch, cvae, pn, pn, device=dev)
        nbytes = float((h.numel() + up.numel()) * 4)
        t, m = run(lambda: K.upsample_bicubic(h, hw, out=up))
        rep("bicubic", "vae", pn, "triton", t, m, 0.0, nbytes)
        t, m = run(lambda: ops.upsample_bicubic_ref(h, hw))
        rep("bicubic", "vae", pn, "torch_ref", t, m, 0.0, nbytes)
    for pn in pns[1:-1]:
        dn = torch.empty(batch, cvae, pn, pn, device=dev)
        nbytes = float((f_hat.numel() + dn.numel()) * 4)
        t, m = run(lambda: K.downsample_area(f_hat, pn, out=dn))
        rep("area", "vae", pn, "triton", t, m, 0.0, nbytes)
        t, m = run(lambda: ops.downsample_area_ref(f_hat, pn))
        rep("area", "vae", pn, "torch_ref", t, m, 0.0, nbytes)


def bench_sampling(K, ops, rep, run, dev, batch, pns, V, top_k=900, top_p=0.96):
    seeds = torch.arange(batch, device=dev)
    top_k = min(top_k, V - 1)
    for pn in pns:
        logits = torch.randn(batch, pn * pn, V, device=dev) * 3
        out = torch.empty(batch, pn * pn, dtype=torch.int64, device=dev)
        nbytes = float(logits.numel() * 4)
        t, m = run(lambda: K.sample_tokens(logits, seeds, 3, top_k, top_p, 1.0, out=out))
        rep("sampling", "V%d" % V, pn, "triton", t, m, 0.0, nbytes, top_k=top_k, top_p=top_p)
        t, m = run(lambda: ops.sample_tokens_ref(logits, seeds, 3, top_k, top_p, 1.0), graph=False)  # host sync
        rep("sampling", "V%d" % V, pn, "torch_ref", t, m, 0.0, nbytes, top_k=top_k, top_p=top_p)

        def official():  # as the official VAR: filter, softmax, torch.multinomial (one generator for the batch)
            p = ops.filter_logits_ref(logits, top_k, top_p).softmax(-1)
            return torch.multinomial(p.view(-1, V), 1)
        t, m = run(official, graph=False)
        rep("sampling", "V%d" % V, pn, "torch_multinom", t, m, 0.0, nbytes, top_k=top_k, top_p=top_p)


def main():
    args = parse()
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not cuda:
        if not args.tiny:
            sys.exit("bench_kernels: needs a CUDA device (or --tiny for the CPU smoke test under TRITON_INTERPRET=1)")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels (and triton) are imported
    import importlib
    try:
        K = {m: importlib.import_module(f"var_rt.kernels.{m}") for m in ("attention", "adaln", "resample", "sampling")}
    except ModuleNotFoundError:  # not installed: the repo's kernels/ folder
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        K = {m: importlib.import_module(f"kernels.{m}") for m in ("attention", "adaln", "resample", "sampling")}
    from var_rt import ops
    kern = argparse.Namespace(var_attention=K["attention"].var_attention, adaln=K["adaln"].adaln,
                              upsample_bicubic=K["resample"].upsample_bicubic,
                              downsample_area=K["resample"].downsample_area, sample_tokens=K["sampling"].sample_tokens)

    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if args.tiny:
        models, pns, batch, V, cvae, hw = TINY["models"], TINY["patch_nums"], TINY["batch"], TINY["vocab"], TINY["cvae"], TINY["hw"]
        iters = 2 if not cuda else args.iters
    else:
        models = {m: MODELS[m] for m in args.models}
        pns, batch, V, cvae, hw, iters = PATCH_NUMS, args.batch, args.vocab, 32, 16, args.iters
    dt = torch.bfloat16 if cuda else torch.float32
    run = timer(dev, iters, graphs=cuda)
    bw, flops = ceilings(dev, run)
    from timing import run_meta  # benchmarks/timing.py (this script's folder is on sys.path)
    rep = Report(args.out, bw, flops, dict(run_meta(dev), bench="kernels", batch=batch))
    t0 = time.time()
    for name, m in models.items():
        if "attention" in args.kernels:
            bench_attention(kern, ops, rep, run, dev, dt, name, m["C"], m["H"], 2 * batch, pns)
        if "adaln" in args.kernels:
            bench_adaln(kern, ops, rep, run, dev, dt, name, m["C"], 2 * batch, pns)
    if "resample" in args.kernels:
        bench_resample(kern, ops, rep, run, dev, batch, pns, cvae, hw)
    if "sampling" in args.kernels:
        bench_sampling(kern, ops, rep, run, dev, batch, pns, V)
    print(f"# done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
