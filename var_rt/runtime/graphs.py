"""CUDA graphs: every shape of a VAR generation is static, so a whole generation (all scales, both CoDe phases,
sampling and the residual-VQ updates) is captured once per (batch bucket, sampling settings) and replayed.

Static input buffers (labels, seeds) are filled before each replay; outputs live in the graph's memory and are
cloned out. All graphs share one memory pool and are captured largest batch first. Whether a run can be
captured is decided per run, from the backend that run uses: a torch-backend run (the reference sampler syncs
with the host to seed its generators) goes eagerly without touching later fast runs. Only what holds for the
whole cache turns graphs off for good: a CPU device, or a capture that failed (one warning saying why).

Chains (VARPipeline.stream): a generation split into segments of scales is one graph per segment. After each
replay the segment's live outputs (`run(..., clone=False)`) are copied into buffers the chain owns, outside the
shared pool (another graph captured earlier may use the outputs' bytes as scratch), and the next segment's graph
is captured reading those buffers in place. A segment's function must not write its input tensors (it copies
f_hat): the warm-up run inside `capture` then leaves the previous segment's state as it was.
"""
from __future__ import annotations

import warnings

import torch

from var_rt import ops


class _Captured:
    def __init__(self, graph, labels, seeds, outputs):
        self.graph, self.labels, self.seeds, self.outputs = graph, labels, seeds, outputs


class GraphCache:
    """fn(labels, seeds) -> tuple of tensors, captured per key; `run` replays or falls back to eager."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.pool = None
        self.graphs: dict = {}
        # sticky: only what holds for every later run (the device; a failed capture). Per-run reasons are not kept.
        self.disabled_reason: str | None = None if self.device.type == "cuda" else "not a CUDA device"
        self.last_mode: str | None = None  # "graph" or "eager: <why>", for the run just made (benchmarks report it)

    def eager_reason(self, backend: str | None = None) -> str | None:
        """Why a run with this backend goes eagerly (None: it is captured / replayed)."""
        if self.disabled_reason is not None:
            return self.disabled_reason
        if (backend or ops.default_backend(self.device)) == "torch":
            return "the torch reference sampler syncs with the host (backend torch)"
        return None

    def _disable(self, why: str) -> None:
        self.disabled_reason = why
        warnings.warn(f"var_rt: CUDA graphs off, running eagerly: {why}", RuntimeWarning, stacklevel=3)

    def capture(self, key, fn, labels: torch.Tensor, seeds: torch.Tensor):
        static_labels, static_seeds = labels.clone(), seeds.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks algorithms, outside capture
            fn(static_labels, static_seeds)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(static_labels, static_seeds)
        self.graphs[key] = _Captured(graph, static_labels, static_seeds, outputs)
        return self.graphs[key]

    def run(self, key, fn, labels: torch.Tensor, seeds: torch.Tensor, backend: str | None = None,
            clone: bool = True):
        """Replay the graph for `key` (capturing it first), or run fn eagerly where this run cannot be captured.
        backend: the op backend this run uses (default: ops.default_backend now, i.e. inside the caller's
        ops.use_backend); a torch run goes eagerly this time only.
        clone=False returns the graph's own output tensors (the same objects at every replay; None entries allowed),
        for chaining graphs: a graph captured with another one's outputs as its inputs reads them in place at each
        replay (streaming previews). They stay allocated while the cache holds the entry, and the next replay of
        `key` overwrites them: copy what must outlive it."""
        why = self.eager_reason(backend)
        if why is not None:
            self.last_mode = f"eager: {why}"
            return fn(labels, seeds)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.capture(key, fn, labels, seeds)
            except Exception as e:  # capture impossible here: stay correct, run eagerly from now on
                self._disable(f"capture failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
                self.last_mode = f"eager: {self.disabled_reason}"
                return fn(labels, seeds)
        self.last_mode = "graph"
        entry.labels.copy_(labels)
        entry.seeds.copy_(seeds)
        entry.graph.replay()
        if not clone:
            return entry.outputs
        return tuple(o.clone() if torch.is_tensor(o) else [t.clone() for t in o] for o in entry.outputs)
