"""Fused kernels against their ops references (TRITON_INTERPRET=1 on the CPU): GroupNorm(+SiLU) and the gated
residual add fused with the next AdaLN."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from var_rt import ops

gn = pytest.importorskip("var_rt.kernels.groupnorm")


@pytest.mark.parametrize("shape,groups", [((2, 64, 5, 7), 32), ((1, 96, 16, 16), 32), ((3, 64, 1, 3), 32), ((2, 12, 9, 3), 4)])
@pytest.mark.parametrize("silu", [True, False])
def test_matches_reference_fp32(shape, groups, silu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    got = gn.group_norm_silu(x, w, b, groups, 1e-6, silu)
    want = ops.group_norm_silu_ref(x, w, b, groups, 1e-6, silu)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_torch(dtype):
    g = torch.Generator().manual_seed(1)
    x32 = torch.randn(2, 64, 6, 6, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    ref = F.silu(F.group_norm(x32, 32, w, b, 1e-6))
    x = x32.to(dtype)
    got = gn.group_norm_silu(x, w.to(dtype), b.to(dtype), 32, 1e-6, True).float()
    torch_lp = F.silu(F.group_norm(x.float(), 32, w.to(dtype).float(), b.to(dtype).float(), 1e-6)).to(dtype).float()
    ulp = torch.finfo(dtype).eps * ref.abs().max()
    assert (got - ref).abs().max() <= 2 * (torch_lp - ref).abs().max() + ulp


def test_out_and_bad_input():
    x = torch.randn(1, 32, 4, 4)
    w, b = torch.ones(32), torch.zeros(32)
    out = torch.empty_like(x)
    assert gn.group_norm_silu(x, w, b, 32, out=out) is out
    with pytest.raises(ValueError, match="groups"):
        gn.group_norm_silu(x, w, b, 5)
    with pytest.raises(ValueError, match="contiguous"):
        gn.group_norm_silu(x.transpose(2, 3), w, b, 32)


def test_decoder_fast_path_equals_reference():
    from conftest import tiny_vae
    vae = tiny_vae()
    f = torch.randn(2, vae.cfg.cvae, 4, 4)
    with ops.use_backend("torch"):
        want = vae.fhat_to_img(f)
    with ops.use_backend("triton"):
        got = vae.fhat_to_img(f)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- the gated residual add fused with the next AdaLN (kernels/adaln.py) ------------------------------------
@pytest.mark.parametrize("N,L,C", [(2, 5, 48), (1, 1, 64), (3, 13, 96)])
def test_residual_adaln_matches_reference(N, L, C):
    from var_rt.kernels.adaln import residual_adaln
    g = torch.Generator().manual_seed(N * L + C)
    x, y = torch.randn(N, L, C, generator=g), torch.randn(N, L, C, generator=g)
    gamma, sc, sh = (torch.randn(N, 1, C, generator=g) for _ in range(3))
    xo, ho = residual_adaln(x, y, gamma, sc, sh, 1e-6)
    xr, hr = ops.residual_adaln_ref(x, y, gamma, sc, sh, 1e-6)
    torch.testing.assert_close(xo, xr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ho, hr, atol=1e-5, rtol=1e-5)


def test_residual_adaln_bf16_stream_rounded_like_reference():
    from var_rt.kernels.adaln import residual_adaln
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(2, 7, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    gamma, sc, sh = (torch.randn(2, 1, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    xo, ho = residual_adaln(x, y, gamma, sc, sh)
    xr, hr = ops.residual_adaln_ref(x, y, gamma, sc, sh)
    assert (xo.float() - xr.float()).abs().max() <= 2 ** -7 * xr.float().abs().max()
    assert (ho.float() - hr.float()).abs().max() <= 2 * 2 ** -7 * hr.float().abs().max()
