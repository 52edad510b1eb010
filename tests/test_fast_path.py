"""The fast path (Triton kernels + the _C residual-VQ step) against the torch reference, end to end.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest); the `cuda` tests need a GPU."""
import pytest
import torch

from var_rt.pipeline import VARPipeline

from conftest import tiny_vae, tiny_var

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_greedy_tokens_and_images_match_reference():
    var, vae = tiny_var(depth=3), tiny_vae()
    ref = VARPipeline(vae, var=var, backend="torch")
    fast = VARPipeline(vae, var=var, backend="fast")
    a = ref([1, 5, 9], cfg=3.0, top_k=1, seed=0)
    b = fast([1, 5, 9], cfg=3.0, top_k=1, seed=0)
    for s, (x, y) in enumerate(zip(ref.last_tokens, fast.last_tokens)):
        assert torch.equal(x, y), f"scale {s}"
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fast_path_is_deterministic_and_code_invariant_holds():
    var, vae = tiny_var(depth=2), tiny_vae()
    single = VARPipeline(vae, var=var, backend="fast")
    code = VARPipeline(vae, drafter=var, refiner=var, draft_steps=2, backend="fast")
    kw = dict(cfg=2.0, top_k=20, top_p=0.9, seed=4)
    a, a2 = single([2, 3], **kw), single([2, 3], **kw)
    assert torch.equal(a, a2)
    b = code([2, 3], **kw)
    for x, y in zip(single.last_tokens, code.last_tokens):
        assert torch.equal(x, y)


# ---- GPU ------------------------------------------------------------------------------------------------------
def _real_size_pair(depth=16, dtype="bf16"):
    ref = VARPipeline.random(depth, device="cuda", dtype="fp32")
    fast = VARPipeline.random(depth, device="cuda", dtype=dtype)
    fast.backend, ref.backend = "fast", "torch"
    return ref, fast


@pytest.mark.cuda
@cuda
def test_cuda_greedy_tokens_agree_with_fp32_reference():
    ref, fast = _real_size_pair()
    ref.use_graphs = False
    labels = list(range(0, 1000, 125))
    ref.generate_latents(labels, top_k=1, seed=0)
    fast.generate_latents(labels, top_k=1, seed=0)
    agree = sum((x == y).sum().item() for x, y in zip(ref.last_tokens, fast.last_tokens))
    total = sum(x.numel() for x in ref.last_tokens)
    assert agree / total >= 0.99, agree / total


@pytest.mark.cuda
@cuda
def test_cuda_per_scale_logits_close_to_fp32_reference():
    ref, fast = _real_size_pair()
    labels2 = torch.tensor([1, 2, 1000, 1000], device="cuda")
    for pipe in (ref, fast):
        pipe._state = pipe.models["main"].prepare(labels2)
    g = torch.Generator(device="cuda").manual_seed(0)
    cfg = ref.cfg
    kv_r = [torch.zeros(ref.models["main"].kv_shape(4), device="cuda") for _ in range(cfg.depth)]
    kv_f = [torch.zeros(fast.models["main"].kv_shape(4), device="cuda", dtype=torch.bfloat16) for _ in range(cfg.depth)]
    from var_rt import ops
    for s, (b, e) in enumerate(cfg.scale_bounds()):
        rows = None if s == 0 else torch.randn(2, e - b, cfg.cvae, device="cuda", generator=g)
        with ops.use_backend("torch"):
            mr = ref.models["main"]
            lr = mr.logits(mr.forward_tokens(mr.scale_input(s, ref._state, rows), ref._state, kv_r, b)).float()
        with ops.use_backend("fast"):
            mf = fast.models["main"]
            lf = mf.logits(mf.forward_tokens(mf.scale_input(s, fast._state, rows), fast._state, kv_f, b)).float()
        rel = (lf - lr).norm() / lr.norm()
        assert rel <= 1e-2, (s, rel.item())


@pytest.mark.cuda
@cuda
def test_cuda_graph_replay_equals_eager_and_is_deterministic():
    pipe = VARPipeline.random(16, refiner_depth=16, draft_steps=6, device="cuda", dtype="bf16")
    pipe.backend = "fast"
    pipe.use_graphs = False
    eager = pipe([1, 2, 3], seed=0)
    eager_tokens = [t.clone() for t in pipe.last_tokens]
    pipe.use_graphs = True
    g1 = pipe([1, 2, 3], seed=0)  # capture
    g2 = pipe([1, 2, 3], seed=0)  # replay
    assert pipe._graphs.disabled_reason is None
    assert torch.equal(g1, g2) and torch.equal(g1, eager)
    for x, y in zip(eager_tokens, pipe.last_tokens):
        assert torch.equal(x, y)


@pytest.mark.cuda
@cuda
def test_cuda_llamagen_graph_replay_equals_eager():
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    pipe = LlamaGenPipeline.random("B", image_size=256, device="cuda", dtype="bf16")
    pipe.backend = "fast"
    pipe.use_graphs = False
    eager = pipe.generate_tokens([1, 2], top_k=2000, top_p=1.0, seed=0, zipar_window=4).clone()
    pipe.use_graphs = True
    g1 = pipe.generate_tokens([1, 2], top_k=2000, top_p=1.0, seed=0, zipar_window=4).clone()
    g2 = pipe.generate_tokens([1, 2], top_k=2000, top_p=1.0, seed=0, zipar_window=4)
    assert pipe._graphs.disabled_reason is None
    assert torch.equal(eager, g1) and torch.equal(g1, g2)
