"""Resampling of token maps (B, C, h, w): exactly F.interpolate's bicubic (align_corners=False, A=-0.75) and area."""
from __future__ import annotations

import torch.nn.functional as F

from var_rt.ops import dispatch


@dispatch.kernel("upsample_bicubic")
def _upsample_bicubic_kernel():
    from var_rt.kernels.resample import upsample_bicubic
    return upsample_bicubic


@dispatch.kernel("downsample_area")
def _downsample_area_kernel():
    from var_rt.kernels.resample import downsample_area
    return downsample_area


def upsample_bicubic_ref(x, size: int, out=None):
    """x (B, C, h, w) -> (B, C, size, size), F.interpolate(mode="bicubic"), x's dtype (into `out` when given)."""
    y = F.interpolate(x, size=(size, size), mode="bicubic")
    if out is not None:
        out.copy_(y)
        return out
    return y


def upsample_bicubic(x, size: int, out=None, backend=None):
    fn = dispatch.fast_kernel(_upsample_bicubic_kernel, backend, x.device)
    return (fn or upsample_bicubic_ref)(x, size, out=out)


def downsample_area_ref(x, size: int, out=None):
    """x (B, C, h, w) -> (B, C, size, size), F.interpolate(mode="area"), x's dtype (into `out` when given)."""
    y = F.interpolate(x, size=(size, size), mode="area")
    if out is not None:
        out.copy_(y)
        return out
    return y


def downsample_area(x, size: int, out=None, backend=None):
    fn = dispatch.fast_kernel(_downsample_area_kernel, backend, x.device)
    return (fn or downsample_area_ref)(x, size, out=out)
