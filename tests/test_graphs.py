"""GraphCache decides per run from the backend that run uses (issue 10b), checked without CUDA.

A cache for a CUDA device is built on a CPU-only machine (torch.device("cuda") needs no GPU), and `capture` is
replaced by a fake that records its calls and replays nothing, so the decision logic runs as on a GPU.
"""
import warnings

import pytest
import torch

from var_rt import ops
from var_rt.runtime import graphs


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def _cache(monkeypatch, fail=False):
    cache = graphs.GraphCache("cuda")
    captured = []

    def fake_capture(key, fn, labels, seeds):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        captured.append(key)
        cache.graphs[key] = graphs._Captured(_FakeGraph(), labels.clone(), seeds.clone(), (labels * 10,))
        return cache.graphs[key]

    monkeypatch.setattr(cache, "capture", fake_capture)
    return cache, captured


def _eager_calls():
    calls = []

    def fn(labels, seeds):
        calls.append(1)
        return (labels * 10,)
    return fn, calls


LAB, SEEDS = torch.tensor([1, 2]), torch.tensor([5, 6])


def test_torch_run_first_does_not_disable_later_fast_runs(monkeypatch):
    cache, captured = _cache(monkeypatch)
    fn, calls = _eager_calls()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference backend going eagerly is expected: no warning
        out = cache.run(("b2", "torch"), fn, LAB, SEEDS, backend="torch")
    assert calls == [1] and captured == [] and torch.equal(out[0], LAB * 10)
    assert cache.disabled_reason is None and cache.last_mode.startswith("eager") and "torch" in cache.last_mode
    out = cache.run(("b2", "fast"), fn, LAB, SEEDS, backend="fast")  # the bug: this ran eagerly too
    assert captured == [("b2", "fast")] and cache.last_mode == "graph" and calls == [1]
    assert torch.equal(out[0], LAB * 10)
    cache.run(("b2", "fast"), fn, LAB, SEEDS, backend="fast")  # replayed, not captured again
    assert captured == [("b2", "fast")] and cache.graphs[("b2", "fast")].graph.replays == 2


def test_backend_defaults_to_the_callers_use_backend(monkeypatch):
    cache, captured = _cache(monkeypatch)
    fn, calls = _eager_calls()
    monkeypatch.delenv("VAR_RT_BACKEND", raising=False)
    with ops.use_backend("torch"):
        cache.run("k", fn, LAB, SEEDS)
    assert calls == [1] and captured == [] and cache.disabled_reason is None
    with ops.use_backend("fast"):
        cache.run("k", fn, LAB, SEEDS)
    assert captured == ["k"] and cache.last_mode == "graph"


def test_capture_failure_disables_with_one_warning(monkeypatch):
    cache, _ = _cache(monkeypatch, fail=True)
    fn, calls = _eager_calls()
    with pytest.warns(RuntimeWarning, match="capture failed") as rec:
        cache.run("k", fn, LAB, SEEDS, backend="fast")
    assert len(rec) == 1 and calls == [1] and "RuntimeError" in cache.disabled_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later runs: eager, silently
        cache.run("k2", fn, LAB, SEEDS, backend="fast")
        cache.run("k3", fn, LAB, SEEDS, backend="torch")
    assert calls == [1, 1, 1] and cache.last_mode.startswith("eager: capture failed")


def test_cpu_device_is_always_eager():
    cache = graphs.GraphCache("cpu")
    fn, calls = _eager_calls()
    cache.run("k", fn, LAB, SEEDS, backend="fast")
    assert calls == [1] and cache.disabled_reason == "not a CUDA device" and not cache.graphs



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_run_first_then_fast_run_replays_a_graph():
    """The bug on a GPU: a torch-backend generation on a pipeline, then a triton one on the same pipeline."""
    from var_rt.models.var import VARConfig
    from var_rt.models.vqvae import VQVAEConfig
    from var_rt.pipeline import VARPipeline
    cfg = VARConfig(depth=2, width=128, heads=2, vocab=64, cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4))
    vae = VQVAEConfig(vocab=64, cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    pipe = VARPipeline.random(cfg, vae_cfg=vae, device="cuda", dtype="bf16")
    pipe.backend = "torch"
    pipe.generate_latents([1, 2], seed=0)
    assert pipe._graphs.last_mode.startswith("eager") and pipe._graphs.disabled_reason is None
    pipe.backend = "fast"
    a = pipe.generate_latents([1, 2], seed=0).clone()  # capture
    b = pipe.generate_latents([1, 2], seed=0)  # replay
    assert pipe._graphs.last_mode == "graph" and pipe._graphs.disabled_reason is None
    assert torch.equal(a, b)
