"""VAR attention fused with its KV-pool write (kernels/attention.py) against ops.var_attention_ref.

Interpreter on the CPU (TRITON_INTERPRET=1), compiled on a GPU. Each case fills a pool's earlier scales, runs one
step with random qkv, and compares both the output (N, l, H*D) and the pool slots the step wrote.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _t
    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
from var_rt import ops  # noqa: E402
from var_rt.kernels import attention  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
if DEV.type == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows, on purpose
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=4e-3, atol=4e-3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(N, H, D, start, l, dtype, seed=0, extra=5):
    """(qkv (N, l, 3HD), pool (2, N, H, start + l + extra, D) with normalised keys before `start`, scale_mul)."""
    g = _gen(seed)
    qkv = (torch.randn(N, l, 3 * H * D, generator=g) * 2).to(DEV, dtype)
    pool = torch.randn(2, N, H, start + l + extra, D, generator=g)
    pool[0] = F.normalize(pool[0], dim=-1)
    pool[:, :, :, start:] = float("nan")  # slots this step must write (and nothing may read before)
    sm = (torch.rand(H, generator=g) * 99 + 1).to(DEV)  # exp(min(., ln 100)) lies in [1, 100]
    return qkv, pool.to(DEV, dtype), sm


def _lowp_torch(qkv, pool, start, sm, qs=None, ks=None):
    """The official computation in qkv's dtype (normalise, scale, matmul, softmax): the yardstick of low precision."""
    N, l = qkv.shape[:2]
    _, _, H, _, D = pool.shape
    q, k, v = qkv.view(N, l, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    keys = torch.cat((pool[0, :, :, :start], F.normalize(k, dim=-1)), dim=2)
    vals = torch.cat((pool[1, :, :, :start], v), dim=2)
    s = (F.normalize(q, dim=-1) * sm.to(q.dtype).view(1, -1, 1, 1)) @ keys.transpose(-1, -2)
    if qs is not None:
        s = s.masked_fill(~(ks.view(1, -1) <= qs.view(-1, 1)), float("-inf"))
    return (s.softmax(-1) @ vals).transpose(1, 2).reshape(N, l, H * D)


def assert_close_by_dtype(out, qkv, pool, start, sm, qs=None, ks=None):
    """fp32: tight. Low precision: max error at most twice the official low-precision computation's, plus an ulp."""
    ref32 = ops.var_attention_ref(qkv.float(), pool.float().clone(), start, sm, qs, ks)
    if out.dtype == torch.float32:
        return torch.testing.assert_close(out, ref32, **TOL[torch.float32])
    ok = ~ref32.isnan()
    err = (out.float() - ref32)[ok].abs().max().item()
    terr = (_lowp_torch(qkv, pool, start, sm, qs, ks).float() - ref32)[ok].abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref32[ok].abs().max().item()
    assert err <= 2 * terr + ulp, f"kernel error {err:.3g} > 2 x torch's {terr:.3g} + ulp {ulp:.3g}"


def _both(qkv, pool, start, sm, qs=None, ks=None):
    kp, rp = pool.clone(), pool.clone()
    out = attention.var_attention(qkv, kp, start, sm, qs, ks)
    ref = ops.var_attention_ref(qkv, rp, start, sm, qs, ks)
    return out, ref, kp, rp


SHAPES = [(1, 2, 64, 0, 1), (2, 3, 32, 5, 13), (1, 2, 16, 30, 4), (1, 1, 128, 7, 3), (2, 2, 64, 14, 25)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_and_pool_write_match_reference(shape, dtype):
    N, H, D, start, l = shape
    qkv, pool, sm = _case(N, H, D, start, l, dtype, seed=sum(shape))
    out, ref, kp, rp = _both(qkv, pool, start, sm)
    assert out.shape == (N, l, H * D) and out.dtype == dtype
    assert_close_by_dtype(out, qkv, pool, start, sm)
    end = start + l
    torch.testing.assert_close(kp[:, :, :, :end], rp[:, :, :, :end], **TOL[dtype])  # normalised k, raw v
    assert torch.equal(kp[1, :, :, start:end], rp[1, :, :, start:end])
    assert kp[:, :, :, end:].isnan().all()  # nothing past this step is touched


def test_incremental_steps_equal_reference():
    """Scales 1x1, 2x2, 3x3 one after another through the same pool: every step's output and the final pool."""
    N, H, D, pns = 2, 2, 32, (1, 2, 3)
    L = sum(p * p for p in pns)
    kp = torch.zeros(2, N, H, L, D, device=DEV)
    rp = kp.clone()
    g, start = _gen(4), 0
    sm = torch.tensor([3.0, 40.0], device=DEV)
    for p in pns:
        qkv = torch.randn(N, p * p, 3 * H * D, generator=g).to(DEV)
        torch.testing.assert_close(attention.var_attention(qkv, kp, start, sm),
                                   ops.var_attention_ref(qkv, rp, start, sm), rtol=1e-4, atol=2e-5)
        start += p * p
    torch.testing.assert_close(kp, rp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sid_dtype", [torch.int32, torch.int64])
def test_block_causal_prefill(sid_dtype):
    """The refiner's prefill over scales 1x1, 2x2, 3x3: a token of scale s sees every token of scales <= s."""
    sid = torch.cat([torch.full((p * p,), i) for i, p in enumerate((1, 2, 3))]).to(DEV, sid_dtype)
    qkv, pool, sm = _case(2, 2, 32, 0, 14, torch.float32, seed=3)
    out, ref, kp, rp = _both(qkv, pool, 0, sm, sid, sid)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(kp[:, :, :, :14], rp[:, :, :, :14], rtol=1e-5, atol=1e-6)
    v0 = qkv.view(2, 14, 3, 2, 32)[:, 0, 2].reshape(2, 64)  # the first scale's query sees only itself: its own v
    torch.testing.assert_close(out[:, 0], v0, rtol=1e-5, atol=1e-5)


def test_block_causal_random_ids_bf16_and_empty_rows():
    qkv, pool, sm = _case(1, 2, 16, 0, 9, torch.bfloat16, seed=5)
    qs = torch.randint(0, 4, (9,), generator=_gen(1)).to(DEV)
    ks = torch.randint(0, 3, (9,), generator=_gen(2)).to(DEV, torch.int32)
    qs[0] = -1  # a query that sees no key: NaN, as the reference
    out, ref, _, _ = _both(qkv, pool, 0, sm, qs, ks)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close_by_dtype(out, qkv, pool, 0, sm, qs, ks)


def test_out_argument_and_dispatch():
    qkv, pool, sm = _case(1, 2, 32, 6, 5, torch.float32, seed=11)
    out = torch.full((1, 5, 64), float("nan"), device=DEV)
    got = attention.var_attention(qkv, pool.clone(), 6, sm.view(1, 2, 1, 1), out=out)
    assert got is out
    ref = ops.var_attention_ref(qkv, pool.clone(), 6, sm)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(ops.var_attention(qkv, pool.clone(), 6, sm, backend="fast"), ref, rtol=1e-4,
                               atol=2e-5)


def test_argument_checks_name_the_problem():
    qkv, pool, sm = _case(1, 2, 32, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="qkv has shape"):
        attention.var_attention(qkv[..., :-3], pool, 4, sm)
    with pytest.raises(ValueError, match="dtype"):
        attention.var_attention(qkv, pool.half(), 4, sm)
    with pytest.raises(ValueError, match="does not fit"):
        attention.var_attention(qkv, pool, 10, sm)
    with pytest.raises(ValueError, match="both q_scale and k_scale"):
        attention.var_attention(qkv, pool, 0, sm, q_scale=torch.zeros(5, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="scale_mul"):
        attention.var_attention(qkv, pool, 4, sm[:1])
    with pytest.raises(ValueError, match="head dim"):
        attention.var_attention(torch.zeros(1, 5, 3 * 2 * 24, device=DEV), torch.zeros(2, 1, 2, 9, 24, device=DEV),
                                0, sm)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, compiled Triton")
def test_cuda_real_shapes_last_scale_of_d30():
    """VAR-d30's last scale at batch 8 (16 CFG rows): 256 queries over 680 keys, bf16, against the fp32 reference."""
    N, H, D, start, l = 16, 30, 64, 424, 256
    qkv, pool, sm = _case(N, H, D, start, l, torch.bfloat16, seed=1, extra=0)
    out, ref, kp, rp = _both(qkv, pool, start, sm)
    assert_close_by_dtype(out, qkv, pool, start, sm)
    torch.testing.assert_close(kp, rp, **TOL[torch.bfloat16])
