"""What VARPipeline and LlamaGenPipeline share (var_rt.pipeline_base): one sampling-settings type and its rules,
per-image seeds, the KV pool per batch, dtype defaults, and the backend stored per pipeline."""
import math
import threading

import pytest
import torch

from var_rt import ops
from var_rt.llamagen_pipeline import LlamaGenPipeline
from var_rt.models.llamagen import LlamaGenConfig
from var_rt.pipeline import VARPipeline
from var_rt.pipeline_base import SamplingSettings, check_seeds, image_seeds, resolve_dtype
from var_rt.runtime.settings import MIN_TEMPERATURE

from conftest import tiny_vae, tiny_var

pytestmark = pytest.mark.usefixtures("one_thread")


def var_pipe(backend="torch"):
    return VARPipeline(tiny_vae(), var=tiny_var(), backend=backend)


def llamagen_pipe(backend="torch", grid=4):
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=48, num_classes=10, grid=grid)
    return LlamaGenPipeline.random(cfg, std=0.3, backend=backend)


# ---- SamplingSettings ------------------------------------------------------------------------------------------
def test_settings_rules_are_one_for_both_families():
    s = SamplingSettings.build(cfg=4, top_k=900.0, top_p=1, temperature=0, steps=3)
    assert s.top_k == (900,) * 3 and s.top_p == (1.0,) * 3 and s.temperature == (0.0,) * 3 and s.cfg == 4.0
    assert s.at(1) == (900, 1.0, MIN_TEMPERATURE)                       # temperature 0 is drawn as 1e-5
    assert SamplingSettings.build(temperature=0.7).at(0)[2] == 0.7
    assert hash(s) == hash(SamplingSettings.build(cfg=4.0, top_k=900, top_p=1.0, temperature=0.0, steps=3))
    with pytest.raises(Exception):
        s.cfg = 1.0                                                      # frozen
    bad = [(dict(cfg=-0.1), "cfg"), (dict(cfg=[1.0]), "cfg"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
           (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
           (dict(temperature=-1e-3), "temperature"), (dict(temperature=math.nan), "temperature"),
           (dict(temperature=math.inf), "temperature"), (dict(cfg_interval=-2), "cfg_interval"),
           (dict(cfg_interval=1.5), "cfg_interval")]
    for kw, msg in bad:
        for steps in (None, 4):
            with pytest.raises(ValueError, match=msg):
                SamplingSettings.build(steps=steps, **kw)


def test_per_scale_lists_are_var_only():
    s = SamplingSettings.build(top_k=[1, 2, 3, 4], temperature=[1.1, 1.1, 1.0, 1.0], steps=4)
    assert s.top_k == (1, 2, 3, 4) and s.at(3) == (4, 1.0, 1.0)
    with pytest.raises(ValueError, match="one per scale"):
        SamplingSettings.build(top_p=[0.9, 0.9], steps=4)
    assert SamplingSettings.build(top_k=[7]) == SamplingSettings.build(top_k=7)    # LlamaGen: a list of one is fine
    with pytest.raises(ValueError, match="per-scale lists are for VAR"):
        SamplingSettings.build(temperature=[1.0, 1.0])
    pipe = llamagen_pipe()
    a = pipe.generate_tokens([1, 2], top_k=[5], temperature=[0.9], seed=1).clone()
    assert torch.equal(a, pipe.generate_tokens([1, 2], top_k=5, temperature=0.9, seed=1))
    with pytest.raises(ValueError, match="per-scale lists are for VAR"):
        pipe([1], top_k=[5, 5])


@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_temperature_zero_is_near_greedy_on_both_families(backend):
    """temperature 0 is accepted by both families and draws as 1e-5 (the official LlamaGen rule): the same tokens
    as a tiny temperature, and here the greedy ones."""
    vp = var_pipe(backend)
    vp([1, 5], cfg=2.0, top_k=0, top_p=1.0, temperature=0.0, seed=3)
    zero = [t.clone() for t in vp.last_tokens]
    vp([1, 5], cfg=2.0, top_k=0, top_p=1.0, temperature=1e-5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(zero, vp.last_tokens))
    vp([1, 5], cfg=2.0, top_k=1, top_p=1.0, temperature=1.0, seed=4)          # greedy, another seed
    assert all(torch.equal(a, b) for a, b in zip(zero, vp.last_tokens))
    lp = llamagen_pipe(backend)
    for top_p in (1.0, 0.9):  # fast draw and torch draw
        zero = lp.generate_tokens([3, 4], cfg=3.0, top_k=0, top_p=top_p, temperature=0, seed=3).clone()
        assert torch.equal(zero, lp.generate_tokens([3, 4], cfg=3.0, top_k=0, top_p=top_p, temperature=1e-5, seed=3))
        assert torch.equal(zero, lp.generate_tokens([3, 4], cfg=3.0, top_k=1, top_p=top_p, seed=4))


# ---- seeds and class ids -------------------------------------------------------------------------------------
def test_seeds_are_per_image_and_checked():
    assert torch.equal(check_seeds(3, seed=5), image_seeds(5, range(3)))
    assert image_seeds(5, [1]).item() == ops.mix_seed(5, 1)
    assert check_seeds(2, seeds=torch.tensor([7, 8], dtype=torch.int32)).dtype == torch.int64
    for kw, msg in ((dict(seeds=[1, 2, 3]), "3 seeds for 2 images"), (dict(seeds=[1.0, 2.0]), "integers"),
                    (dict(seeds=torch.tensor([True, False])), "integers"), (dict(seed=1.5), "seed"),
                    (dict(seed="0"), "seed")):
        with pytest.raises(ValueError, match=msg):
            check_seeds(2, **kw)
    for pipe, call in ((var_pipe(), "generate_latents"), (llamagen_pipe(), "generate_tokens")):
        gen = getattr(pipe, call)
        gen([1, 2, 3], seed=9)
        by_seed = pipe.last_tokens
        gen([1, 2, 3], seeds=image_seeds(9, range(3)).tolist())
        same = (all(torch.equal(a, b) for a, b in zip(by_seed, pipe.last_tokens)) if isinstance(by_seed, list)
                else torch.equal(by_seed, pipe.last_tokens))
        assert same
        with pytest.raises(ValueError, match="2 seeds for 3 images"):
            gen([1, 2, 3], seeds=[1, 2])
        with pytest.raises(ValueError, match="outside"):
            gen([1, 10])
        with pytest.raises(ValueError, match="integers"):
            gen([1.0, 2.0])


# ---- KV pools --------------------------------------------------------------------------------------------------
def test_kv_pool_per_batch_with_graphs_latest_only_without():
    for pipe, call, rows in ((var_pipe(), "generate_latents", lambda b: b),
                             (llamagen_pipe(), "generate_tokens", lambda b: 2 * b)):   # cfg 4 > 1: 2B rows
        gen = getattr(pipe, call)
        assert not pipe.use_graphs                   # CPU: eager, only the latest arena is kept
        gen([1, 2], seed=0)
        first = pipe._pools[rows(2)]
        gen([1, 2], seed=1)
        assert pipe._pools[rows(2)] is first and list(pipe._pools) == [rows(2)]
        gen([1], seed=0)
        assert list(pipe._pools) == [rows(1)]
        assert pipe.last_stats["kv_pool_bytes"] == pipe._pools[rows(1)].nbytes
        pipe.use_graphs = True                       # graphs keep one arena per batch (they point into it)
        gen([1, 2], seed=0)
        gen([1, 2, 3], seed=0)
        gen([1], seed=0)
        assert sorted(pipe._pools) == sorted({rows(1), rows(2), rows(3)})


# ---- dtype -----------------------------------------------------------------------------------------------------
def test_default_dtype_is_bf16_on_cuda_fp32_on_cpu(tiny_files):
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype(None, torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")
    assert VARPipeline.from_checkpoints(var=tiny_files["var"], vae=tiny_files["vae"]).models["main"].head.weight.dtype \
        == torch.float32
    pipe = VARPipeline.from_checkpoints(var=tiny_files["var"], vae=tiny_files["vae"], dtype="bf16")
    assert pipe.models["main"].head.weight.dtype == torch.bfloat16
    assert llamagen_pipe().gpt.output.weight.dtype == torch.float32
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=48, num_classes=10, grid=4)
    assert LlamaGenPipeline.random(cfg, dtype="bf16").gpt.output.weight.dtype == torch.bfloat16


# ---- backend ---------------------------------------------------------------------------------------------------
def test_backend_resolved_at_construction(monkeypatch):
    monkeypatch.delenv("VAR_RT_BACKEND", raising=False)
    assert var_pipe(None).backend == "torch" and var_pipe("triton").backend == "fast"
    assert llamagen_pipe("cuda").backend == "fast" and llamagen_pipe("torch").backend == "torch"
    monkeypatch.setenv("VAR_RT_BACKEND", "fast")
    pipe = llamagen_pipe(None)
    assert pipe.backend == "fast"
    monkeypatch.setenv("VAR_RT_BACKEND", "torch")               # later changes do not move a built pipeline
    assert pipe.backend == "fast"
    pipe.backend = "torch"
    assert pipe.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        VARPipeline(tiny_vae(), var=tiny_var(), backend="tpu")


def _spy_backends(pipe, seen, barrier=None):
    """Record ops.default_backend() inside the model step and the decoder of `pipe` (instance attributes)."""
    model, step = (pipe.gpt, "step") if isinstance(pipe, LlamaGenPipeline) else (pipe.models["main"], "forward_tokens")
    decoder, dec = (pipe.vq, "decode_tokens") if isinstance(pipe, LlamaGenPipeline) else (pipe.vae, "fhat_to_img")
    for obj, name in ((model, step), (decoder, dec)):
        real = getattr(obj, name)

        def spy(*a, real=real, name=name, **k):
            seen.append((name, ops.default_backend()))
            if barrier is not None and name == dec:
                barrier.wait(timeout=60)   # both pipelines are inside their calls at the same time
            return real(*a, **k)
        setattr(obj, name, spy)


def test_every_model_and_decoder_call_runs_on_the_pipelines_backend(monkeypatch):
    """Even with VAR_RT_BACKEND saying otherwise, and (the bug fixed here) LlamaGen's VQ decode too."""
    monkeypatch.setenv("VAR_RT_BACKEND", "fast")
    for pipe in (llamagen_pipe("torch"), var_pipe("torch")):
        seen = []
        _spy_backends(pipe, seen)
        pipe([1, 2], seed=0)
        assert seen and {b for _, b in seen} == {"torch"}, seen
        assert ops.default_backend("cpu") == "fast"              # nothing leaks out of the call


def test_two_pipelines_with_different_backends_do_not_affect_each_other():
    torch_pipe, fast_pipe = llamagen_pipe("torch"), llamagen_pipe("fast")
    kw = dict(cfg=3.0, top_k=8, seed=2)
    alone_t, alone_f = torch_pipe([1, 2], **kw), fast_pipe([1, 2], **kw)
    tok_t, tok_f = torch_pipe.last_tokens.clone(), fast_pipe.last_tokens.clone()
    seen_t, seen_f, out = [], [], {}
    barrier = threading.Barrier(2)
    _spy_backends(torch_pipe, seen_t, barrier)
    _spy_backends(fast_pipe, seen_f, barrier)

    def run(name, pipe):
        out[name] = (pipe([1, 2], **kw), pipe.last_tokens.clone())
    threads = [threading.Thread(target=run, args=(name, pipe)) for name, pipe in (("t", torch_pipe), ("f", fast_pipe))]
    with ops.use_backend("fast"):                          # the caller's own choice does not leak in either
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ops.default_backend() == "fast"
    assert {b for _, b in seen_t} == {"torch"} and {b for _, b in seen_f} == {"fast"}
    assert torch.equal(out["t"][1], tok_t) and torch.equal(out["f"][1], tok_f)
    assert torch.equal(out["t"][0], alone_t) and torch.equal(out["f"][0], alone_f)


# ---- graph wiring (no GPU: a GraphCache for "cuda" whose capture runs the generation eagerly) -----------------
def _fake_graphs(monkeypatch, captured):
    from var_rt.runtime import graphs

    class _Replay:
        def replay(self):
            pass
    cache = graphs.GraphCache("cuda")

    def capture(key, fn, labels, seeds):
        captured.append(key)
        cache.graphs[key] = graphs._Captured(_Replay(), labels.clone(), seeds.clone(), fn(labels, seeds))
        return cache.graphs[key]
    monkeypatch.setattr(cache, "capture", capture)
    return cache


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_graph_cache_wiring(monkeypatch, family):
    """With graphs on, a fast-backend generation is captured once per (batch, settings, ...) and replayed; the
    outputs equal the eager run. LlamaGen's torch draw (top-p < 1) is never captured."""
    pipe = var_pipe("fast") if family == "var" else llamagen_pipe("fast")
    gen = pipe.generate_latents if family == "var" else pipe.generate_tokens
    kw = dict(cfg=2.0, top_k=5, top_p=1.0, seed=1)
    eager = gen([1, 2], **kw).clone()
    captured = []
    pipe.use_graphs, pipe._graphs = True, _fake_graphs(monkeypatch, captured)
    assert torch.equal(gen([1, 2], **kw), eager) and len(captured) == 1 and pipe._graphs.last_mode == "graph"
    assert torch.equal(gen([1, 2], **kw), eager) and len(captured) == 1          # replayed
    gen([1, 2], **dict(kw, top_k=6))
    assert len(captured) == 2                                                     # other settings: another graph
    assert captured[0][0] == 2 and "fast" in captured[0]
    if family == "llamagen":
        gen([1, 2], **dict(kw, top_p=0.9))                                        # the torch draw: eager
        assert len(captured) == 2
    pipe.backend = "torch"
    gen([1, 2], **kw)
    assert len(captured) == 2 and pipe._graphs.disabled_reason is None
