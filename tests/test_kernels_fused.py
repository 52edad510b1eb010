"""Fused kernels against their ops references (TRITON_INTERPRET=1 on the CPU): GroupNorm(+SiLU) and the gated
residual add fused with the next AdaLN."""
import os

import torch  # noqa: E402  (torch does not import triton: asking for a GPU here is safe)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest
import torch
import torch.nn.functional as F

from var_rt import ops

gn = pytest.importorskip("var_rt.kernels.groupnorm")

# ---- GroupNorm(+SiLU), NCHW and channels_last, with and without the fused residual add (kernels/groupnorm.py) --
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
CL = torch.channels_last
LAYOUTS = ("nchw", "nhwc")
# C = 32 k over 32 groups (2, 3 and 5 channels a group: the official VQVAE's 160 k), odd H x W, batch 1 and 3
GN_SHAPES = [((1, 64, 5, 7), 32), ((3, 96, 5, 7), 32), ((3, 160, 3, 5), 32), ((1, 64, 1, 3), 32), ((3, 12, 9, 3), 4)]


def _as(t, layout):
    return t.contiguous(memory_format=CL) if layout == "nhwc" else t.contiguous()


def _gn_inputs(shape, seed, dtype=torch.float32, layout="nchw"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    return _as(x.to(DEV, dtype), layout), w.to(DEV, dtype), b.to(DEV, dtype)


def _same_layout(y, x):
    return y.is_contiguous() if x.is_contiguous() else y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", GN_SHAPES)
def test_matches_reference_fp32(shape, groups, layout):
    x, w, b = _gn_inputs(shape, 0, layout=layout)
    for silu in (True, False):
        got = gn.group_norm_silu(x, w, b, groups, 1e-6, silu)
        assert _same_layout(got, x)
        torch.testing.assert_close(got, ops.group_norm_silu_ref(x, w, b, groups, 1e-6, silu), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("block_hw,splits", [(4, 3), (8, 2), (2, 100)])
def test_nhwc_split_over_hw(block_hw, splits):
    """Several tiles per split, several splits (partial sums reduced by the finalize kernel), masked last tile."""
    x, w, b = _gn_inputs((3, 160, 5, 7), 1, layout="nhwc")
    assert gn.nhwc_geometry(3, 160, 35, 4, block_hw, splits)[4] > 1
    _, got = gn._group_norm(x, None, w, b, 32, 1e-6, True, block_hw=block_hw, splits=splits)
    torch.testing.assert_close(got, ops.group_norm_silu_ref(x, w, b, 32, 1e-6, True), atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # masked lanes, interpreter only
def test_large_mean_keeps_fp32_variance():
    """Shifted sums: |mean| / std = 1e3 still gives fp32-accurate statistics on both layouts."""
    x, w, b = _gn_inputs((2, 64, 5, 7), 2)
    x = (x.double() * 1e-3 + 7.0).float()
    want = ops.group_norm_silu_ref(x.double(), w.double(), b.double(), 32, 1e-6, True)
    for layout in LAYOUTS:
        got = gn.group_norm_silu(_as(x, layout), w, b, 32, 1e-6, True)
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_torch(dtype, layout):
    x32, w, b = _gn_inputs((3, 64, 5, 7), 1)
    ref = F.silu(F.group_norm(x32, 32, w, b, 1e-6))
    x = _as(x32.to(dtype), layout)
    got = gn.group_norm_silu(x, w.to(dtype), b.to(dtype), 32, 1e-6, True)
    assert got.dtype == dtype and _same_layout(got, x)
    torch_lp = F.silu(F.group_norm(x.float(), 32, w.to(dtype).float(), b.to(dtype).float(), 1e-6)).to(dtype).float()
    ulp = torch.finfo(dtype).eps * ref.abs().max()
    assert (got.float() - ref).abs().max() <= 2 * (torch_lp - ref).abs().max() + ulp


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_add_fused(layout, dtype):
    """(s, y) = (x + r, GroupNorm+SiLU(x + r)); s rounded to x's dtype (the interpreter's float->bf16 cast
    truncates where the GPU rounds to nearest: 1 ulp)."""
    shape = (3, 96, 5, 7)
    x, w, b = _gn_inputs(shape, 3, dtype, layout)
    r = _as(torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(DEV, dtype), layout)
    s, y = gn.residual_group_norm_silu(x, r, w, b, 32, 1e-6, True)
    s_ref, y_ref = ops.residual_group_norm_silu_ref(x, r, w, b, 32, 1e-6, True)
    assert _same_layout(s, x) and _same_layout(y, x)
    ulp = torch.finfo(dtype).eps * s_ref.float().abs()
    assert ((s.float() - s_ref.float()).abs() <= ulp).all()
    want = ops.group_norm_silu_ref(s, w, b, 32, 1e-6, True)  # GroupNorm of the kernel's own s
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, want, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)


def test_out_layouts_and_bad_input():
    x, w, b = _gn_inputs((1, 32, 4, 5), 5)
    for layout in LAYOUTS:
        xl = _as(x, layout)
        out = torch.empty_like(xl)
        assert gn.group_norm_silu(xl, w, b, 32, out=out) is out
        torch.testing.assert_close(out, ops.group_norm_silu_ref(x, w, b, 32), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        gn.group_norm_silu(x, w, b, 5)
    with pytest.raises(ValueError, match="contiguous"):
        gn.group_norm_silu(x.transpose(2, 3), w, b, 32)
    with pytest.raises(ValueError, match="layout"):
        gn.group_norm_silu(x, w, b, 32, out=torch.empty_like(x, memory_format=CL))
    with pytest.raises(ValueError, match="strides"):
        gn.residual_group_norm_silu(x, _as(x, "nhwc"), w, b, 32)


def test_ops_takes_the_kernel_for_channels_last(monkeypatch):
    """ops.group_norm_silu no longer falls back to the reference for channels_last; other strides still do."""
    x, w, b = _gn_inputs((1, 64, 3, 5), 6, layout="nhwc")
    want = ops.group_norm_silu_ref(x, w, b, 32)
    monkeypatch.setattr(ops, "group_norm_silu_ref", lambda *a, **k: pytest.fail("reference used"))
    got = ops.group_norm_silu(x, w, b, 32, backend="fast")
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    monkeypatch.undo()
    xt = x.permute(0, 1, 3, 2)  # neither layout: the reference
    torch.testing.assert_close(ops.group_norm_silu(xt, w, b, 32, backend="fast"),
                               ops.group_norm_silu_ref(xt, w, b, 32))


# ---- the VQ decoders: channels_last fast path against the NCHW reference ----------------------------------
def _tiny_vq16():
    from var_rt.models import vq16
    cfg = vq16.VQ16Config(codebook_size=64, embed_dim=8, z_channels=64, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
    return vq16.init_random_(vq16.VQ16(cfg), 0).eval().requires_grad_(False).to(DEV)


def _decoders():
    from conftest import tiny_vae
    vae = tiny_vae().to(DEV)
    f = torch.randn(3, vae.cfg.cvae, 3, 5, generator=torch.Generator().manual_seed(0)).to(DEV)
    vq = _tiny_vq16()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1)).to(DEV)
    return {"vqvae": (vae, lambda: vae.fhat_to_img(f)), "vq16": (vq, lambda: vq.decode_tokens(ids))}


def _run_checked(model, decode, monkeypatch):
    """The fast decode, asserting every conv reads channels_last, no GroupNorm falls back to the reference,
    and the decoder's image is contiguous NCHW."""
    seen, hooks = [], []
    for name, m in model.decoder.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.append((name, inp[0].is_contiguous(memory_format=CL)))))
    m_out = model.decoder.register_forward_hook(lambda mod, inp, out: seen.append(("image", out.is_contiguous())))
    with monkeypatch.context() as mp:
        for ref in ("group_norm_silu_ref", "residual_group_norm_silu_ref"):
            mp.setattr(ops, ref, lambda *a, **k: pytest.fail("GroupNorm fell back to the reference"))
        mp.setattr(torch.nn.GroupNorm, "forward", lambda *a, **k: pytest.fail("nn.GroupNorm on the fast path"))
        with ops.use_backend("fast"):
            img = decode()
    for h in hooks + [m_out]:
        h.remove()
    assert seen and all(ok for _, ok in seen), [n for n, ok in seen if not ok]
    return img


@pytest.mark.parametrize("which", ["vqvae", "vq16"])
def test_decoder_fast_path_equals_reference(which, monkeypatch):
    model, decode = _decoders()[which]
    with ops.use_backend("torch"):
        assert not ops.decoder_channels_last(DEV)
        want = decode()
    got = _run_checked(model, decode, monkeypatch)
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["vqvae", "vq16"])
def test_decoder_fast_path_bf16(which, monkeypatch):
    """bf16 decoder: the channels_last path's error against the fp32 reference is at most twice torch's own bf16."""
    model, decode = _decoders()[which]
    with ops.use_backend("torch"):
        want = decode()
        model.decoder.bfloat16()
        torch_bf16 = decode()
    got = _run_checked(model, decode, monkeypatch)
    assert got.is_contiguous()
    assert (got - want).abs().max() <= 2 * (torch_bf16 - want).abs().max() + 2 ** -8


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
