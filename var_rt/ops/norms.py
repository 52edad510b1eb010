"""Normalisations, each fused with what surrounds it in the models: VAR's AdaLN (+ the gated residual add before
it), the VQ decoders' GroupNorm (+ SiLU, + the residual add before it), LlamaGen's RMSNorm (+ the residual add)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var_rt.ops import dispatch


@dispatch.kernel("adaln")
def _adaln_kernel():
    from var_rt.kernels.adaln import adaln
    return adaln


@dispatch.kernel("residual_adaln")
def _residual_adaln_kernel():
    from var_rt.kernels.adaln import residual_adaln
    return residual_adaln


_GN_NOTE = "contiguous NCHW or channels_last inputs only (the decoders run channels_last); other strides: reference"


@dispatch.kernel("group_norm_silu", note=_GN_NOTE)
def _group_norm_silu_kernel():
    from var_rt.kernels.groupnorm import group_norm_silu
    return group_norm_silu


@dispatch.kernel("residual_group_norm_silu", note=_GN_NOTE)
def _residual_group_norm_silu_kernel():
    from var_rt.kernels.groupnorm import residual_group_norm_silu
    return residual_group_norm_silu


@dispatch.kernel("rms_norm")
def _rms_norm_kernel():
    from var_rt.kernels.rmsnorm import rms_norm
    return rms_norm


@dispatch.kernel("residual_rms_norm")
def _residual_rms_norm_kernel():
    from var_rt.kernels.rmsnorm import residual_rms_norm
    return residual_rms_norm


# --------------------------------------------------------------------------------------------------------------
# AdaLN (VAR): LayerNorm without affine, then x (1 + scale) + shift
def adaln_ref(x, scale, shift, eps=1e-6, out=None):
    """x (N, L, C); scale, shift (N, 1, C). LayerNorm statistics in fp32; result in x's dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    y = (y * (1 + scale.float()) + shift.float()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def adaln(x, scale, shift, eps=1e-6, out=None, backend=None):
    fn = dispatch.fast_kernel(_adaln_kernel, backend, x.device)
    return (fn or adaln_ref)(x, scale, shift, eps, out=out)


def residual_adaln_ref(x, y, gamma, scale, shift, eps=1e-6):
    """The gated residual add then the next AdaLN: x' = x + y * gamma (in x's dtype); returns (x', adaln(x'))."""
    x = (x.float() + y.float() * gamma.float()).to(x.dtype)
    return x, adaln_ref(x, scale, shift, eps)


def residual_adaln(x, y, gamma, scale, shift, eps=1e-6, backend=None):
    fn = dispatch.fast_kernel(_residual_adaln_kernel, backend, x.device)
    return (fn or residual_adaln_ref)(x, y, gamma, scale, shift, eps)


# --------------------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU) of the VQ decoders
def group_norm_silu_ref(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None):
    """x (B, C, H, W) (any layout); GroupNorm(groups, affine) with fp32 statistics, then SiLU when `silu`;
    x's dtype."""
    y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    y = (F.silu(y) if silu else y).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _gn_dense(x) -> bool:
    """The layouts the GroupNorm kernels read: contiguous NCHW or channels_last (NHWC)."""
    return x.dim() == 4 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None, backend=None):
    """The kernel keeps x's layout (NCHW or channels_last); other strides take the reference."""
    fn = dispatch.fast_kernel(_group_norm_silu_kernel, backend, x.device) if _gn_dense(x) else None
    return (fn or group_norm_silu_ref)(x, weight, bias, groups, eps, silu, out=out)


def residual_group_norm_silu_ref(x, r, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True):
    """The VQ decoders' residual add then the next GroupNorm(+SiLU): s = x + r (x's dtype); returns
    (s, group_norm_silu(s)). s is the block output the next block also keeps as its skip input."""
    s = x + r
    return s, group_norm_silu_ref(s, weight, bias, groups, eps, silu)


def residual_group_norm_silu(x, r, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, backend=None):
    ok = _gn_dense(x) and r.shape == x.shape and r.stride() == x.stride() and r.dtype == x.dtype
    fn = dispatch.fast_kernel(_residual_group_norm_silu_kernel, backend, x.device) if ok else None
    return (fn or residual_group_norm_silu_ref)(x, r, weight, bias, groups, eps, silu)


def decoder_channels_last(device, backend=None) -> bool:
    """Whether the VQ decoders run channels_last (NHWC, cuDNN's fast conv layout) with the fused GroupNorm
    kernels: exactly where group_norm_silu takes its Triton kernel. The torch backend stays the NCHW reference."""
    return dispatch.fast_kernel(_group_norm_silu_kernel, backend, torch.device(device)) is not None


# --------------------------------------------------------------------------------------------------------------
# RMSNorm (LlamaGen), with the residual add before it. Per layer on the fast path: residual_rms_norm, wqkv,
# rope_kv_write, zipar_attention (+ a combine when split), wo, residual_rms_norm, w1|w3, swiglu, w2 -- 9 launches
# (10 when the attention splits its keys).
def rms_norm_ref(x, weight, eps: float = 1e-5):
    """The official RMSNorm: statistics in fp32, the normalised value cast to x's dtype, THEN times weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rms_norm(x, weight, eps: float = 1e-5, backend=None):
    fn = dispatch.fast_kernel(_rms_norm_kernel, backend, x.device)
    return (fn or rms_norm_ref)(x, weight, eps)


def residual_rms_norm_ref(x, y, weight, eps: float = 1e-5):
    """x, y (..., C): the residual add, then the next RMSNorm: returns (x + y, rms_norm(x + y)); y None: (x,
    rms_norm(x)). The sum is in x's dtype (what the residual stream stores)."""
    if y is not None:
        x = x + y
    return x, rms_norm_ref(x, weight, eps)


def residual_rms_norm(x, y, weight, eps: float = 1e-5, backend=None):
    fn = dispatch.fast_kernel(_residual_rms_norm_kernel, backend, x.device)
    return (fn or residual_rms_norm_ref)(x, y, weight, eps)
