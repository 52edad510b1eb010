"""VAR / CoDe sampling throughput: fast path first, then the torch reference, one JSON line per (config, backend).

  python3 benchmarks/bench_var.py --drafter d30 --refiner d16 --draft-steps 8 --batch 64 --random-weights
  python3 benchmarks/bench_var.py --drafter d30 --drafter-only --batch 1 --random-weights
  python3 benchmarks/bench_var.py --configs d30 d30+d16:8 d30+d16:6 --batch 1 --out OUT/bench_var.jsonl
  python3 benchmarks/bench_var.py --tiny          # CPU smoke test (CI), tiny models in the Triton interpreter

--configs runs several configs in one process: each distinct model (depth, role) is built once (random weights
at the real size; speed does not depend on them) and shared read-only. Each (config, backend) gets its own,
freshly built VARPipeline around those weights: no KV pool, CUDA graph or graph-off reason carries from one run
to the next, and the fast path is timed first.

Each line: ms per batch and img/s for tokens only (labels -> f_hat) and end to end (labels -> uint8 images on
the host; tokens + decode, both timed in the same iteration), peak MiB (CUDA), KV pool MiB, whether the run was a
CUDA-graph replay (`graphs`), plus the time the same batch's GEMMs alone take (torch matmul on random operands of
the exact shapes; each distinct shape allocated, timed and freed in turn), so the ratio to the floor is read off
one run. A config that fails writes a line with `error` and the others still run (exit status 1).

--stream adds, per backend, a line with `"row": "stream"`: the cost of streaming previews on the same pipeline and
batch (ms of pipe(...) vs list(pipe.stream(..., every=1)) vs every=2, and the overhead over the call).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout
from timing import cuda_reset, peak_mib, run_meta, timed, timed_split  # noqa: E402  (benchmarks/timing.py)

GEMM_REPS = 10  # per distinct shape: time min(count, GEMM_REPS) back-to-back matmuls, scale to count


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


def gemm_only_seconds(shapes, dtype, device, warmup, iters) -> tuple[float, int]:
    """Seconds the GEMMs of `shapes` take alone, and the number of distinct shapes. One distinct (M, K, N) at a
    time: allocate its operands, time min(count, GEMM_REPS) back-to-back matmuls, free them; the total is the
    sum of time-per-matmul x count (VAR-d30 at batch 64 would need ~175 GiB to hold every operand at once).
    Each of the back-to-back matmuls reads its own weight matrix (K, N), as the layers of a generation do: at
    batch 1 the GEMMs are weight reads, and one matrix read 10 times would come from L2, not memory."""
    total = 0.0
    counts = collections.Counter(shapes)
    for (M, K, N), count in counts.items():
        reps = min(count, GEMM_REPS)
        a = torch.randn(M, K, dtype=dtype, device=device)
        bs = [torch.randn(K, N, dtype=dtype, device=device) for _ in range(reps)]
        c = torch.empty(M, N, dtype=dtype, device=device)

        def run():
            for b in bs:
                torch.matmul(a, b, out=c)
        total += timed(run, device, warmup, iters) / reps * count
        del a, bs, c, run
    return total, len(counts)


def parse_spec(spec: str) -> tuple[int, int | None, int | None]:
    """'d30' -> (30, None, None) plain VAR; 'd30+d16:8' -> (30, 16, 8) CoDe with N = 8."""
    try:
        models, _, n = spec.partition(":")
        drafter, _, refiner = models.partition("+")
        d = int(drafter.strip().lstrip("d"))
        r = int(refiner.strip().lstrip("d")) if refiner else None
        return d, r, int(n) if n else None
    except ValueError:
        raise SystemExit(f"bench_var: bad config {spec!r}: expected dNN or dNN+dMM:N") from None


def config_name(d, r, n, tiny) -> str:
    name = f"d{d}" if r is None else f"CoDe d{d}+d{r} N={n}"
    return f"tiny ({name})" if tiny else name


class Models:
    """Each model built once, on its device, and shared read-only by every pipeline of the run."""

    def __init__(self, device, dtype: str, tiny: bool):
        self.device, self.dtype, self.tiny, self.cache = device, dtype, tiny, {}

    def var_cfg(self, depth, role):
        from var_rt.models.var import VARConfig
        if self.tiny:  # drafter (or plain VAR) depth 2, refiner depth 1, 4 scales
            return VARConfig(depth=2 if role == "drafter" else 1, width=64, heads=2, vocab=64, cvae=8,
                             num_classes=10, patch_nums=(1, 2, 3, 4))
        return VARConfig.official(depth)

    def var(self, depth: int, role: str):
        """role 'drafter' (or plain VAR): seed 0; 'refiner': seed 1, as VARPipeline.random."""
        key = (depth, role)
        if key not in self.cache:
            from var_rt.pipeline import resolve_dtype
            from var_rt.models import var as var_model
            cfg, seed = self.var_cfg(depth, role), (0 if role == "drafter" else 1)
            with torch.device("meta"):
                m = var_model.VAR(cfg)
            # skip the default init on the CPU (~30 s for d30): every parameter is set by init_random_
            m = m.to_empty(device=self.device) if not list(m.buffers()) else var_model.VAR(cfg)
            m = var_model.init_random_(m, seed).to(device=self.device, dtype=resolve_dtype(self.dtype))
            self.cache[key] = m.eval().requires_grad_(False)
        return self.cache[key]

    def vae(self):
        if "vae" not in self.cache:
            from var_rt.pipeline import resolve_dtype
            from var_rt.models import vqvae as vqvae_model
            cfg = (vqvae_model.VQVAEConfig(vocab=64, cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1) if self.tiny
                   else vqvae_model.VQVAEConfig())
            vae = vqvae_model.init_random_(vqvae_model.VQVAE(cfg), 0).to(self.device).eval().requires_grad_(False)
            vae.decoder.to(resolve_dtype(self.dtype))  # as VARPipeline.random
            self.cache["vae"] = vae
        return self.cache["vae"]

    def pipeline(self, d, r, n, backend):
        """A fresh VARPipeline (own KV pools, own CUDA graphs) around the shared weights."""
        from var_rt.pipeline import VARPipeline
        if r is None:
            return VARPipeline(self.vae(), var=self.var(d, "drafter"), device=self.device, backend=backend)
        if self.tiny:
            n = min(n, 3)
        return VARPipeline(self.vae(), drafter=self.var(d, "drafter"), refiner=self.var(r, "refiner"),
                           draft_steps=n, device=self.device, backend=backend)


def bench_config(a, models, spec, backends, device) -> list[dict]:
    from var_rt import ops
    from var_rt.images import to_uint8
    d, r, n = spec
    meta = dict(run_meta(device), config=config_name(d, r, n, a.tiny), batch=a.batch, dtype=models.dtype)
    rows = []
    try:
        probe = models.pipeline(d, r, n, backends[0])
        torch_dtype = next(iter(probe.models.values())).head.weight.dtype
        labels = torch.arange(a.batch) % probe.num_classes
        gemm_s, n_shapes = gemm_only_seconds(gemm_shapes(probe, a.batch), torch_dtype, device, a.warmup, a.iters)
        del probe
    except Exception as e:  # noqa: BLE001  (report, go on with the next config)
        traceback.print_exc()
        row = dict(meta, error=f"{type(e).__name__}: {str(e)[:300]}")
        yield_row(a, row)
        return [row]
    kw = dict(cfg=4.0, top_k=900, top_p=0.95, seed=0)
    for backend in backends:
        ref = backend == "torch"
        warmup, iters = (a.ref_warmup, a.ref_iters) if ref else (a.warmup, a.iters)
        row = dict(meta, backend=backend, warmup=warmup, iters=iters)
        try:
            cuda_reset(device)
            pipe = models.pipeline(d, r, n, backend)

            def decode(f_hat, pipe=pipe):  # as VARPipeline.__call__, then to host uint8
                with ops.use_backend(pipe.backend):
                    return to_uint8(pipe.vae.fhat_to_img(f_hat))
            t_tok, t_e2e = timed_split(lambda: pipe.generate_latents(labels, **kw), decode, device, warmup, iters)
            graphs = pipe._graphs.last_mode if pipe._graphs is not None else "eager: graphs off (not CUDA)"
            row.update(ms_tokens=round(t_tok * 1e3, 3), img_s_tokens=round(a.batch / t_tok, 2),
                       ms_end_to_end=round(t_e2e * 1e3, 3), img_s_end_to_end=round(a.batch / t_e2e, 2),
                       ms_gemm_only=round(gemm_s * 1e3, 3), gemm_fraction_tokens=round(gemm_s / t_tok, 3),
                       gemm_shapes_distinct=n_shapes, graphs=graphs,
                       kv_pool_mib=round(pipe.last_stats["kv_pool_bytes"] / 2**20, 2), peak_mib=peak_mib(device))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        yield_row(a, row)
        if a.stream and "error" not in row:
            rows.append(stream_row(dict(meta, backend=backend, warmup=warmup, iters=iters), pipe, labels, kw,
                                   device, warmup, iters))
            yield_row(a, rows[-1])
        pipe = decode = None  # the next backend starts from a clean device (its graphs and pools freed)
        cuda_reset(device)
    return rows


def stream_row(row: dict, pipe, labels, kw, device, warmup, iters) -> dict:
    """--stream: what streaming previews cost, on the same pipeline and batch: pipe(...) (images on the device)
    vs list(pipe.stream(..., every=1)) (a preview decoded after each scale) vs every=2; medians, and the overhead
    over the call. With CUDA graphs the stream replays one graph per segment (captured in the warm-ups)."""
    row = dict(row, row="stream")
    try:
        K = len(pipe.cfg.patch_nums)
        t_call = timed(lambda: pipe(labels, **kw), device, warmup, iters)
        row["ms_call"] = round(t_call * 1e3, 3)
        for every in (1, 2):
            t = timed(lambda: list(pipe.stream(labels, every=every, **kw)), device, warmup, iters)
            row.update({f"ms_stream_every{every}": round(t * 1e3, 3), f"previews_every{every}": -(-K // every),
                        f"stream_overhead_every{every}": round(t / t_call - 1, 3)})
        row.update(graphs=pipe._graphs.last_mode if pipe._graphs is not None else "eager: graphs off (not CUDA)",
                   peak_mib=peak_mib(device))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def yield_row(a, row) -> None:
    """Print the line and append it to --out at once: a run cut short by a timeout keeps what it measured."""
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, metavar="SPEC",
                   help="dNN (plain VAR) or dNN+dMM:N (CoDe), several in one process; overrides the four below")
    p.add_argument("--drafter", "--var", dest="drafter", default="d30", help="drafter (or plain VAR) depth, e.g. d30")
    p.add_argument("--refiner", default=None, help="refiner depth, e.g. d16 (CoDe)")
    p.add_argument("--draft-steps", type=int, default=None)
    p.add_argument("--drafter-only", action="store_true", help="the drafter alone over all scales")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--random-weights", action="store_true", help="(the only mode: speed does not depend on weights)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backends", default=None, help="comma list, timed in this order; default 'fast,torch' on CUDA "
                                                    "(and --tiny under TRITON_INTERPRET=1), else 'torch'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ref-warmup", type=int, default=None, help="torch reference warm-ups (default --warmup)")
    p.add_argument("--ref-iters", type=int, default=None, help="torch reference iterations (default --iters)")
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: a smoke test")
    p.add_argument("--stream", action="store_true", help="also a `row: stream` line per backend: pipe(...) vs "
                                                         "list(pipe.stream(..., every=1)) vs every=2 (previews' cost)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    a.ref_warmup = a.warmup if a.ref_warmup is None else a.ref_warmup
    a.ref_iters = a.iters if a.ref_iters is None else a.ref_iters
    if a.tiny:
        a.batch = min(a.batch, 2)
        a.warmup, a.iters, a.ref_warmup, a.ref_iters = 0, 1, 0, 1  # one generation each: a smoke test
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    backends = (a.backends or ("fast,torch" if device.type == "cuda" or (a.tiny and interp) else "torch")).split(",")
    if a.configs:
        specs = [parse_spec(s) for s in a.configs]
    else:
        d = int(a.drafter.lstrip("d"))
        specs = [(d, None, None) if a.drafter_only or a.refiner is None
                 else (d, int(a.refiner.lstrip("d")), a.draft_steps or 8)]
    models = Models(device, dtype, a.tiny)
    failed = False
    for spec in specs:
        failed |= any("error" in r for r in bench_config(a, models, spec, backends, device))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
