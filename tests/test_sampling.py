"""The sampler's CFG and per-position-stream forms: sample_tokens(logits, seeds, step, ..., guidance=...).

guidance mixes (1 + t) * cond - t * uncond in fp32 inside the kernel from (2B, l, V) logits in their own dtype;
a step tensor gives position i the stream of a one-position call with step = steps[i]. Kernel vs reference in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set before triton is imported); on a GPU machine
`TRITON_INTERPRET=0 pytest tests/test_sampling.py` runs them compiled, plus the CUDA-only ones.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from var_rt import ops  # noqa: E402
from var_rt.kernels import sampling  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
if DEV.type == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and not INTERPRET), reason="needs CUDA, compiled Triton")


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device=DEV, dtype=dtype)


def _guidance(kind, l, seed):
    if kind == "float":
        return 1.7  # 1 + t is not exact in fp32: the kernel must round it as torch rounds a Python scalar
    if kind == "tensor":  # per position, with zeros (LlamaGen's cfg_interval: CFG off)
        g = torch.rand(l, generator=torch.Generator().manual_seed(seed)) * 4
        g[::3] = 0.0
        return g.to(DEV)
    return None


def _step(kind, l):
    return 7 if kind == "int" else torch.tensor([(37 * i + 5) % 101 for i in range(l)], device=DEV)


# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guide", ["float", "tensor", None])
@pytest.mark.parametrize("step", ["int", "tensor"])
@pytest.mark.parametrize("B,l,V", [(1, 5, 37), (3, 3, 129)])
def test_in_kernel_mix_equals_sampling_torch_mixed_logits(dtype, guide, step, B, l, V):
    """Exact: the kernel's mix of (2B, l, V) logits in their dtype == the reference mix in fp32, sampled."""
    N = 2 * B if guide else B
    logits = randn(N, l, V, dtype=dtype, seed=B + V, scale=2.0)
    g, st = _guidance(guide, l, seed=V), _step(step, l)
    seeds = torch.tensor([5, 77, 901][:B], device=DEV)
    mixed = ops.guide_logits_ref(logits, g)  # (B, l, V) fp32
    assert mixed.dtype == torch.float32 and mixed.shape == (B, l, V)
    for kw in (dict(top_k=9), dict(top_k=20, top_p=0.9, temperature=0.8), dict(top_p=0.7), dict()):
        got = sampling.sample_tokens(logits, seeds, st, guidance=g, **kw)
        assert got.shape == (B, l) and got.dtype == torch.int64
        assert torch.equal(got, sampling.sample_tokens(mixed, seeds, st, **kw)), kw
        # every draw lies in the reference's filtered set of the mixed logits
        kept = ops.filter_logits_ref(mixed, kw.get("top_k", 0), kw.get("top_p", 0.0)) > float("-inf")
        assert kept.gather(-1, got.unsqueeze(-1)).all()
    # top-1: kernel, reference and argmax agree on each form
    assert torch.equal(sampling.sample_tokens(logits, seeds, st, top_k=1, guidance=g), mixed.argmax(-1))
    assert torch.equal(ops.sample_tokens_ref(logits, seeds, st, top_k=1, guidance=g), mixed.argmax(-1))
    assert torch.equal(ops.sample_tokens(logits, seeds, st, top_k=1, guidance=g, backend="fast"), mixed.argmax(-1))


def test_mix_rounds_like_torch_python_scalar():
    """guidance=t (float) == torch's `(1 + t) * cond - t * uncond` with Python scalars, bit for bit."""
    B, l, V = 2, 4, 64
    logits = randn(2 * B, l, V, seed=3, scale=3.0)
    seeds = torch.tensor([1, 2], device=DEV)
    for t in (0.1, 1.7, 4.0 * 3 / 9, 2.25):
        torch_mixed = (1 + t) * logits[:B] - t * logits[B:]
        assert torch.equal(ops.guide_logits_ref(logits, t), torch_mixed)
        for kw in (dict(top_k=5), dict(top_k=30, top_p=0.8)):
            assert torch.equal(sampling.sample_tokens(logits, seeds, 3, guidance=t, **kw),
                               sampling.sample_tokens(torch_mixed, seeds, 3, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1.7, 4.0 * 3 / 9])  # VAR's t at cfg 4, scale 3 of 10: fp32(1 + t) != 1 + fp32(t)
def test_mix_is_bit_exact_on_ties(dtype, t):
    """A vocabulary of 32 (cond, uncond) pairs whose torch mix is exactly the same maximum, where other roundings
    (u + (c - u)(1 + t), an FMA, 1 + t in fp32) would split the tie: top-1 then draws uniformly over exactly the
    tied set, so any rounding difference in the in-kernel mix changes tokens."""
    n = 32
    c = (1 + torch.rand(20000, generator=torch.Generator().manual_seed(0))).to(dtype).float()
    u = (((1 + t) * c - 2.5) / t).to(dtype).float()
    m = (1 + t) * c - t * u
    vals, counts = m.unique(return_counts=True)
    best = vals[counts.argmax()]
    sel = (m == best).nonzero().view(-1)[:n]
    assert sel.numel() == n
    c, u = c[sel], u[sel]
    t32 = torch.tensor(t, dtype=torch.float32)
    alt = (u + (c - u) * (1 + t), ((1 + t) * c.double() - (t * u).double()).float(), (1 + t32) * c - t32 * u)
    assert any((a != best).any() for a in alt)  # the test can see those roundings
    V, B, l = n + 5, 8, 4
    low = torch.tensor([0.0, 0.5, -1.0, 1.0, -2.0])  # exact in bf16; mixed with itself: itself, below the tie
    cond, unc = torch.cat([c, low]), torch.cat([u, low])
    exact = torch.stack([cond] * B + [unc] * B).view(2 * B, 1, V).expand(2 * B, l, V).to(DEV)
    logits = exact.to(dtype)
    assert torch.equal(logits.float(), exact)  # the pairs are representable in dtype
    seeds = torch.arange(B, device=DEV) * 31
    mixed = ops.guide_logits_ref(logits, t)
    assert (mixed[..., :n] == best).all()
    for st in (3, torch.arange(l, device=DEV) * 5):
        got = sampling.sample_tokens(logits, seeds, st, top_k=1, guidance=t)
        assert torch.equal(got, sampling.sample_tokens(mixed, seeds, st, top_k=1))
        assert got.unique().numel() > 4  # draws spread over the tied set
        # a tensor guidance computes 1 + t in fp32, as torch does with a tensor t
        g = torch.full((l,), t, device=DEV)
        got = sampling.sample_tokens(logits, seeds, st, top_k=1, guidance=g)
        assert torch.equal(got, sampling.sample_tokens(ops.guide_logits_ref(logits, g), seeds, st, top_k=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_steps_tensor_equals_per_position_calls(dtype, guided):
    """A step tensor draws what LlamaGen's former loop drew: one call per position with step = steps[i]."""
    B, l, V = 3, 7, 53
    logits = randn(2 * B if guided else B, l, V, dtype=dtype, seed=11, scale=1.5)
    steps = torch.tensor([0, 1, 9, 4, 600, 2 ** 31 - 1, 9], device=DEV)
    g = _guidance("tensor", l, seed=2) if guided else None
    seeds = torch.tensor([3, 1 << 40, 12345], device=DEV)
    mixed = ops.guide_logits_ref(logits, g)
    for kw in (dict(top_k=12, temperature=0.9), dict(top_p=0.95)):
        got = sampling.sample_tokens(logits, seeds, steps, guidance=g, **kw)
        loop = torch.stack([sampling.sample_tokens(mixed[:, i:i + 1], seeds, int(steps[i]), **kw)[:, 0]
                            for i in range(l)], dim=1)
        assert torch.equal(got, loop), kw
        # the same per position with the guidance mixed in-kernel one position at a time
        if guided:
            one = torch.stack([sampling.sample_tokens(logits[:, i:i + 1], seeds, int(steps[i]),
                                                      guidance=g[i:i + 1], **kw)[:, 0] for i in range(l)], dim=1)
            assert torch.equal(got, one)
        # the reference: a step tensor == one reference call per position (exponential_noise(seeds, steps[i]))
        ref = ops.sample_tokens_ref(logits, seeds, steps.to(torch.int32), guidance=g, **kw)
        ref_loop = torch.stack([ops.sample_tokens_ref(mixed[:, i:i + 1], seeds, int(steps[i]), **kw)[:, 0]
                                for i in range(l)], dim=1)
        assert torch.equal(ref, ref_loop)
    # equal steps at two positions with equal logits: the same token (the stream ignores the position)
    same = logits[:, 2:3].expand(-1, 2, -1)
    st = torch.tensor([9, 9], device=DEV)
    a = sampling.sample_tokens(same, seeds, st, guidance=None if g is None else g[2:3].expand(2), top_k=12)
    assert torch.equal(a[:, 0], a[:, 1])


def test_strided_inputs():
    """Logits, steps and guidance as views with odd strides (a transposed vocab axis, every other position)."""
    B, l, V = 2, 3, 41
    base = randn(2 * B, V, 2 * l, seed=5)
    logits = base.transpose(1, 2)[:, ::2]  # (2B, l, V), stride over V = 2l
    steps = torch.tensor([4, 0, 8, 1, 2, 3], device=DEV)[::2]
    g = torch.tensor([2.0, 9.0, 0.0, 9.0, 0.5, 9.0], device=DEV)[::2]
    seeds = torch.tensor([8, 9], device=DEV)
    for kw in (dict(top_k=6), dict(top_p=0.9, temperature=1.3)):
        got = sampling.sample_tokens(logits, seeds, steps, guidance=g, **kw)
        assert torch.equal(got, sampling.sample_tokens(ops.guide_logits_ref(logits.contiguous(), g.contiguous()),
                                                       seeds, steps.contiguous(), **kw))


def _chi2_crit(dof, z=3.72):  # Wilson-Hilferty: the chi-square quantile at p = 1e-4
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("top_k,top_p,temp,dtype", [(0, 0.0, 1.0, torch.float32), (6, 0.0, 1.0, torch.bfloat16),
                                                    (0, 0.8, 0.7, torch.bfloat16)])
def test_guided_distribution(top_k, top_p, temp, dtype):
    """n requests x 3 positions (steps tensor, per-position guidance) of one cond/uncond pair: chi-square."""
    n, l, V, t = 1500, 3, 17, 1.5
    cond, uncond = randn(V, seed=50 + top_k, dtype=dtype), randn(V, seed=60 + top_k, dtype=dtype)
    logits = torch.cat([cond.view(1, 1, V).expand(n, l, V), uncond.view(1, 1, V).expand(n, l, V)])
    mixed = ops.guide_logits_ref(torch.stack([cond, uncond]).view(2, 1, V), t)
    probs = (ops.filter_logits_ref(mixed, top_k, top_p) / temp).softmax(-1).view(-1)
    toks = sampling.sample_tokens(logits, torch.arange(n, device=DEV), torch.tensor([3, 1000, 4], device=DEV),
                                  top_k=top_k, top_p=top_p, temperature=temp,
                                  guidance=torch.full((l,), t, device=DEV))
    counts = torch.bincount(toks.view(-1), minlength=V).float()
    assert counts[probs == 0].sum() == 0
    expect = probs * n * l
    m = expect > 0
    chi2 = (((counts - expect) ** 2)[m] / expect[m]).sum().item()
    dof = int(m.sum()) - 1
    assert chi2 < _chi2_crit(dof), f"chi2 {chi2:.1f} over {dof} dof"


def test_checks():
    seeds = torch.tensor([1, 2], device=DEV)
    with pytest.raises(ValueError, match="2B rows"):
        sampling.sample_tokens(randn(3, 2, 9), seeds, 0, guidance=1.0)
    with pytest.raises(ValueError, match="seeds"):
        sampling.sample_tokens(randn(2, 2, 9), seeds, 0, guidance=1.0)  # 2 rows with guidance: B = 1
    with pytest.raises(ValueError, match="step tensor"):
        sampling.sample_tokens(randn(2, 2, 9), seeds, torch.tensor([1, 2, 3], device=DEV))
    with pytest.raises(ValueError, match="step"):
        sampling.sample_tokens(randn(2, 2, 9), seeds, torch.tensor([1.0, 2.0], device=DEV))
    with pytest.raises(ValueError, match="guidance"):
        sampling.sample_tokens(randn(4, 2, 9), seeds, 0, guidance=torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="guidance"):
        sampling.sample_tokens(randn(4, 2, 9), seeds, 0, guidance=torch.ones(2, device=DEV, dtype=torch.float64))
    out = torch.empty(2, 2, dtype=torch.int64, device=DEV)
    lg = randn(4, 2, 9)
    assert sampling.sample_tokens(lg, seeds, torch.tensor([0, 1], device=DEV), top_k=1, guidance=0.5, out=out) is out
    assert torch.equal(out, ops.guide_logits_ref(lg, 0.5).argmax(-1))


# ------------------------------------------------------------------------------------------------------------------
# LlamaGen: one sampler launch per pass == the former per-query loop (CFG and cfg_interval included)
@pytest.mark.parametrize("zipar_window,cfg_interval,labels", [(None, -1, [2]), (2, 1, [1, 4, 2])])
def test_llamagen_one_launch_per_pass_equals_per_query_loop(monkeypatch, zipar_window, cfg_interval, labels):
    pytest.importorskip("var_rt.kernels.zipar_attention")
    from var_rt import llamagen_pipeline as lp
    from var_rt.models.llamagen import LlamaGenConfig
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=61, num_classes=6, grid=4)
    pipe = lp.LlamaGenPipeline.random(cfg, std=0.3, backend="fast")
    kw = dict(cfg=3.0, cfg_interval=cfg_interval, top_k=15, temperature=0.9, seed=4, zipar_window=zipar_window)
    launches = []
    real = ops.sample_tokens

    def counting(*a, **k):
        launches.append(1)
        return real(*a, **k)
    monkeypatch.setattr(lp.ops, "sample_tokens", counting)
    got = pipe.generate_tokens(labels, **kw).clone()
    assert len(launches) == pipe.last_forward_passes  # one launch per pass

    def per_query(logits, seeds, steps, top_k, top_p, temperature, guidance=None, backend=None):
        B = seeds.numel()
        t = guidance.view(1, -1, 1)
        mixed = (1 + t) * logits[:B] - t * logits[B:]  # torch's mix, then one launch per query as before
        return torch.stack([real(mixed[:, i:i + 1], seeds, int(s), top_k, top_p, temperature, backend=backend)[:, 0]
                            for i, s in enumerate(steps.tolist())], dim=1)
    monkeypatch.setattr(lp.ops, "sample_tokens", per_query)
    assert torch.equal(pipe.generate_tokens(labels, **kw), got)
    # the guidance tensors outlive the call (captured CUDA graphs read them at replay): cached on the pipeline
    g = pipe.guidance(zipar_window, 3.0, cfg_interval)
    assert g is pipe.guidance(zipar_window, 3.0, cfg_interval) and len(g) == pipe.last_forward_passes
    for p, gp in zip(pipe.plan(zipar_window), g):
        assert gp.tolist() == [0.0 if cfg_interval > -1 and t - 1 > cfg_interval else 2.0 for t in p.steps]


# ------------------------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.cuda
def test_cuda_real_shapes_bf16_guided_and_graph():
    """VAR-d30's last scale: bf16 (2B, 256, 4096) head logits with guidance t, exactly the torch-mixed fp32 draw;
    LlamaGen's form (steps and guidance tensors) captured in a CUDA graph (no host sync) replays identically."""
    dev = torch.device("cuda")
    B, l, V, t = 64, 256, 4096, 4.0 * 9 / 9
    logits = (torch.randn(2 * B, l, V, device=dev) * 3).bfloat16()
    seeds = torch.arange(B, device=dev) * 7919
    mixed = ops.guide_logits_ref(logits, t)
    for kw in (dict(top_k=900, top_p=0.96), dict(top_k=1)):
        got = sampling.sample_tokens(logits, seeds, 9, guidance=t, **kw)
        assert torch.equal(got, sampling.sample_tokens(mixed, seeds, 9, **kw))
    assert torch.equal(sampling.sample_tokens(logits, seeds, 9, top_k=1, guidance=t), mixed.argmax(-1))
    lg = (torch.randn(2 * 4, 8, 16384, device=dev) * 3).bfloat16()
    steps = torch.arange(8, device=dev) * 24
    g = torch.tensor([3.0] * 6 + [0.0] * 2, device=dev)
    sd = seeds[:4]
    eager = sampling.sample_tokens(lg, sd, steps, top_k=2000, guidance=g)
    out = torch.empty_like(eager)
    sampling.sample_tokens(lg, sd, steps, top_k=2000, guidance=g, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampling.sample_tokens(lg, sd, steps, top_k=2000, guidance=g, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
