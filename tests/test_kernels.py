"""The Triton kernels (var_rt.kernels) against their torch references in var_rt.ops.

Runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here before triton is imported), with tiny,
odd shapes. On a GPU machine, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the same tests compiled on
CUDA tensors, plus the @pytest.mark.cuda ones at the real VAR shapes.
Low precision: |kernel - ref32| <= 2 |torch low precision - ref32| + one ulp (max over the tensor); the ulp also
covers the interpreter, whose fp32 -> bf16 cast truncates where the GPU rounds to nearest.
"""
import math
import os

import torch  # noqa: E402  (torch does not import triton: asking for a GPU here is safe)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from var_rt import ops  # noqa: E402
from var_rt.kernels import adaln as adaln_k  # noqa: E402
from var_rt.kernels import resample, sampling  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
if DEV.type == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and not INTERPRET), reason="needs CUDA, compiled Triton")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows, on purpose


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=DEV, dtype=dtype)


def assert_lowp_close(out, ref32, torch_lp):
    """Max-norm error of the kernel at most twice torch's own low-precision error, plus one ulp."""
    err = (out.float() - ref32).abs().max().item()
    terr = (torch_lp.float() - ref32).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref32.abs().max().item()
    assert err <= 2 * terr + ulp, f"kernel error {err:.3g} > 2 x torch's {terr:.3g} + ulp {ulp:.3g}"


# ------------------------------------------------------------------------------------------------------------------
# AdaLN
@pytest.mark.parametrize("N,L,C", [(2, 5, 48), (1, 1, 96), (3, 7, 64), (2, 3, 130)])
def test_adaln_fp32(N, L, C):
    x = randn(N, L, C, scale=3.0) + 1.0
    ada = randn(N, 1, 6 * C, seed=1)  # the six-way chunk of SiLU -> Linear(C, 6C): strided views
    scale, shift = ada[..., 2 * C:3 * C], ada[..., 4 * C:5 * C]
    torch.testing.assert_close(adaln_k.adaln(x, scale, shift), ops.adaln_ref(x, scale, shift), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adaln_lowp_out(dtype):
    N, L, C = 2, 9, 96
    x32 = randn(N, L, C, scale=2.0, seed=2)
    sc32, sh32 = randn(N, 1, C, seed=3), randn(1, 1, C, seed=4)  # shift broadcast over N
    x, sc, sh = x32.to(dtype), sc32.to(dtype), sh32.to(dtype)
    buf = torch.empty(L, N, C, device=DEV, dtype=dtype)
    got = adaln_k.adaln(x, sc, sh, eps=1e-5, out=buf.transpose(0, 1))
    assert got.data_ptr() == buf.data_ptr()
    ref32 = ops.adaln_ref(x.float(), sc.float(), sh.float(), eps=1e-5)
    assert_lowp_close(got, ref32, ops.adaln_ref(x, sc, sh, eps=1e-5))
    with pytest.raises(ValueError, match="scale has shape"):
        adaln_k.adaln(x, sc[..., :-1], sh)


# ------------------------------------------------------------------------------------------------------------------
# resampling
@pytest.mark.parametrize("h,size", [(1, 16), (2, 16), (5, 16), (10, 16), (13, 16), (3, 7), (16, 16)])
def test_upsample_bicubic(h, size):
    x = randn(2, 3, h, h, seed=h)
    torch.testing.assert_close(resample.upsample_bicubic(x, size), ops.upsample_bicubic_ref(x, size),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,size", [(16, 13), (16, 10), (16, 5), (16, 1), (1, 16), (16, 16), (7, 3), (13, 4)])
def test_downsample_area(h, size):
    x = randn(2, 3, h, h, seed=h + size)
    torch.testing.assert_close(resample.downsample_area(x, size), ops.downsample_area_ref(x, size),
                               rtol=1e-5, atol=1e-6)


def test_resample_strided_lowp_out():
    x = randn(2, 4, 13, 13, seed=9).transpose(2, 3)  # non-contiguous input
    out = torch.empty(2, 4, 16, 16, device=DEV)
    assert resample.upsample_bicubic(x, 16, out=out) is out
    torch.testing.assert_close(out, ops.upsample_bicubic_ref(x, 16), rtol=1e-5, atol=1e-5)
    y = randn(2, 4, 16, 16, seed=10, dtype=torch.bfloat16)
    ref32 = ops.downsample_area_ref(y.float(), 10)
    assert_lowp_close(resample.downsample_area(y, 10), ref32, ops.downsample_area_ref(y, 10))
    yb = randn(1, 2, 5, 5, seed=12, dtype=torch.bfloat16)
    ref32 = ops.upsample_bicubic_ref(yb.float(), 16)
    assert_lowp_close(resample.upsample_bicubic(yb, 16), ref32, ops.upsample_bicubic_ref(yb, 16))
    with pytest.raises(ValueError, match="out has shape"):
        resample.downsample_area(y, 5, out=torch.empty(2, 4, 6, 6, device=DEV, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------------------------------
# sampling
def _draws(logits_1v, n, step=3, **kw):
    """n draws from one (V,) row: n requests with seeds 0..n-1 and the same logits."""
    V = logits_1v.numel()
    toks = sampling.sample_tokens(logits_1v.view(1, 1, V).expand(n, 1, V), torch.arange(n, device=DEV), step, **kw)
    assert toks.shape == (n, 1) and toks.dtype == torch.int64
    return toks.view(-1)


def test_sample_top1_is_argmax():
    logits = randn(3, 5, 100, scale=3.0, seed=1)
    base = randn(2, 3, 5, 1000, seed=2)[1]  # a non-contiguous (B, l, V) view, V not a power of two
    seeds = torch.tensor([4, 5, 6], device=DEV)
    for lg in (logits, base):
        assert torch.equal(sampling.sample_tokens(lg, seeds, 0, top_k=1), lg.argmax(-1))
        assert torch.equal(sampling.sample_tokens(lg, seeds, 1, top_p=1e-4, temperature=0.5), lg.argmax(-1))
    # the ops dispatch reaches the kernel too
    assert torch.equal(ops.sample_tokens(logits, seeds, 0, top_k=1, backend="fast"), logits.argmax(-1))


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (7, 0.0), (0, 0.6), (9, 0.8), (16, 0.999)])
def test_sample_support_is_the_filtered_set(top_k, top_p):
    row = randn(17, scale=0.4, seed=top_k)
    kept = ops.filter_logits_ref(row.view(1, 17), top_k, top_p).view(-1) > float("-inf")
    toks = _draws(row, 1500, top_k=top_k, top_p=top_p)
    seen = torch.zeros(17, dtype=torch.bool, device=DEV)
    seen[toks] = True
    assert torch.equal(seen, kept), f"drawn {seen.nonzero().view(-1).tolist()} kept {kept.nonzero().view(-1).tolist()}"


def test_sample_support_larger_vocab():
    row = randn(300, scale=2.0, seed=21)
    kept = ops.filter_logits_ref(row.view(1, -1), 40, 0.9).view(-1) > float("-inf")
    toks = _draws(row, 1200, top_k=40, top_p=0.9, temperature=1e4)  # ~uniform over the kept set
    seen = torch.zeros(300, dtype=torch.bool, device=DEV)
    seen[toks] = True
    assert torch.equal(seen, kept)


def _chi2_crit(dof, z=3.72):  # Wilson-Hilferty: the chi-square quantile at p = 1e-4
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("top_k,top_p,temp", [(0, 0.0, 1.0), (5, 0.0, 1.0), (0, 0.7, 1.0), (8, 0.9, 0.7),
                                              (0, 0.0, 2.5)])
def test_sample_distribution(top_k, top_p, temp):
    n, V = 4000, 17
    row = randn(V, seed=30 + top_k)
    probs = (ops.filter_logits_ref(row.view(1, V), top_k, top_p) / temp).softmax(-1).view(-1)
    counts = torch.bincount(_draws(row, n, top_k=top_k, top_p=top_p, temperature=temp), minlength=V).float()
    assert counts[probs == 0].sum() == 0
    expect = probs * n
    m = expect > 0
    chi2 = (((counts - expect) ** 2)[m] / expect[m]).sum().item()
    dof = int(m.sum()) - 1
    assert chi2 < _chi2_crit(dof), f"chi2 {chi2:.1f} over {dof} dof"


def test_sample_seeds_and_batch_independence():
    B, l, V = 4, 3, 29
    logits = randn(B, l, V, scale=0.5, seed=40)
    seeds = torch.tensor([11, 22, 33, 44], device=DEV)
    a = sampling.sample_tokens(logits, seeds, 5, top_k=20, top_p=0.95)
    assert torch.equal(a, sampling.sample_tokens(logits, seeds, 5, top_k=20, top_p=0.95))
    perm = torch.tensor([2, 0, 3, 1], device=DEV)  # other batch order and company: same tokens per request
    assert torch.equal(sampling.sample_tokens(logits[perm], seeds[perm], 5, top_k=20, top_p=0.95), a[perm])
    solo = sampling.sample_tokens(logits[1:2], seeds[1:2], 5, top_k=20, top_p=0.95)
    assert torch.equal(solo, a[1:2])
    other = torch.tensor([11, 99, 33, 7], device=DEV)
    b = sampling.sample_tokens(logits, other, 5, top_k=20, top_p=0.95)
    assert torch.equal(b[[0, 2]], a[[0, 2]])
    c = sampling.sample_tokens(logits, seeds, 6, top_k=20, top_p=0.95)
    assert not torch.equal(c, a)  # another step, another stream (12 draws over ~20 tokens: equal by chance ~never)


def test_sample_checks():
    logits = randn(2, 3, 17)
    with pytest.raises(ValueError, match="seeds"):
        sampling.sample_tokens(logits, torch.tensor([1], device=DEV), 0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample_tokens(logits, torch.tensor([1, 2], device=DEV), 0, temperature=0.0)
    out = torch.empty(2, 3, dtype=torch.int64, device=DEV)
    assert sampling.sample_tokens(logits, torch.tensor([1, 2], device=DEV), 0, top_k=1, out=out) is out
    assert torch.equal(out, logits.argmax(-1))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        adaln_k.adaln(torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8))


# ------------------------------------------------------------------------------------------------------------------
# CUDA only: the real VAR-d30 shapes (attention's are in test_attention.py)
@cuda
@pytest.mark.cuda
def test_cuda_real_shapes():
    torch.manual_seed(0)
    dev, bf = torch.device("cuda"), torch.bfloat16
    x = torch.randn(2 * 64, 256, 1920, device=dev, dtype=bf)
    sc, sh = torch.randn(128, 1, 1920, device=dev, dtype=bf), torch.randn(128, 1, 1920, device=dev, dtype=bf)
    assert_lowp_close(adaln_k.adaln(x, sc, sh), ops.adaln_ref(x.float(), sc.float(), sh.float()),
                      ops.adaln_ref(x, sc, sh))
    f = torch.randn(64, 32, 16, 16, device=dev)
    for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13):
        torch.testing.assert_close(resample.downsample_area(f, pn), ops.downsample_area_ref(f, pn))
        h = torch.randn(64, 32, pn, pn, device=dev)
        torch.testing.assert_close(resample.upsample_bicubic(h, 16), ops.upsample_bicubic_ref(h, 16),
                                   rtol=1e-5, atol=1e-5)
    logits = torch.randn(64, 256, 4096, device=dev) * 3
    seeds = torch.arange(64, device=dev)
    assert torch.equal(sampling.sample_tokens(logits, seeds, 0, top_k=1), logits.argmax(-1))
    toks = sampling.sample_tokens(logits, seeds, 0, top_k=900, top_p=0.96)
    kept = ops.filter_logits_ref(logits, 900, 0.96) > float("-inf")
    # a token exactly at the top-p cut may differ by float summation order: allow a stray one in 16k draws
    assert (~kept.gather(-1, toks.unsqueeze(-1))).sum() <= 2
