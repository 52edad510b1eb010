"""Resampling of token maps (B, C, h, w) -> (B, C, size, size), exactly F.interpolate's semantics.

bicubic (align_corners=False): src = (dst + 0.5) * in / out - 0.5 (not clamped), A = -0.75 cubic convolution,
the 4 taps floor(src) - 1 .. floor(src) + 2 clamped to [0, in - 1].
area (= adaptive_avg_pool2d): output o averages input [floor(o * in / out), ceil((o + 1) * in / out)).
One program = BLOCK flattened output elements; taps are gathers (the maps are tiny: <= 32 x 16 x 16 per image).
Spec: var_rt.ops.upsample_bicubic_ref / downsample_area_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_out, check_tensor, interpreting

_BLOCK = 256


@triton.jit
def _cubic_near(t, A: tl.constexpr):  # |t| <= 1
    return ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0


@triton.jit
def _cubic_far(t, A: tl.constexpr):  # 1 < |t| < 2
    return ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A


@triton.jit
def _unflatten(offs, C, OH, OW):
    ox = offs % OW
    t = offs // OW
    oy = t % OH
    t = t // OH
    return t // C, t % C, oy, ox


@triton.jit
def _taps4(row, x0, x1, x2, x3, w0, w1, w2, w3, ok):  # one input row's 4 horizontal taps, weighted
    r = w0 * tl.load(row + x0, mask=ok, other=0.0).to(tl.float32)
    r += w1 * tl.load(row + x1, mask=ok, other=0.0).to(tl.float32)
    r += w2 * tl.load(row + x2, mask=ok, other=0.0).to(tl.float32)
    r += w3 * tl.load(row + x3, mask=ok, other=0.0).to(tl.float32)
    return r


@triton.jit
def _bicubic_kernel(
    X, Y, total, C, H, W, OH, OW,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    scale_h, scale_w,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    b, c, oy, ox = _unflatten(offs, C, OH, OW)
    src_y = scale_h * (oy.to(tl.float32) + 0.5) - 0.5
    src_x = scale_w * (ox.to(tl.float32) + 0.5) - 0.5
    fy = tl.floor(src_y)
    fx = tl.floor(src_x)
    ty = src_y - fy
    tx = src_x - fx
    iy = fy.to(tl.int32)
    ix = fx.to(tl.int32)
    wy0 = _cubic_far(ty + 1.0, -0.75)
    wy1 = _cubic_near(ty, -0.75)
    wy2 = _cubic_near(1.0 - ty, -0.75)
    wy3 = _cubic_far(2.0 - ty, -0.75)
    wx0 = _cubic_far(tx + 1.0, -0.75)
    wx1 = _cubic_near(tx, -0.75)
    wx2 = _cubic_near(1.0 - tx, -0.75)
    wx3 = _cubic_far(2.0 - tx, -0.75)
    x0 = tl.minimum(tl.maximum(ix - 1, 0), W - 1) * sxw
    x1 = tl.minimum(tl.maximum(ix, 0), W - 1) * sxw
    x2 = tl.minimum(tl.maximum(ix + 1, 0), W - 1) * sxw
    x3 = tl.minimum(tl.maximum(ix + 2, 0), W - 1) * sxw
    base = X + b * sxb + c * sxc
    acc = wy0 * _taps4(base + tl.minimum(tl.maximum(iy - 1, 0), H - 1) * sxh, x0, x1, x2, x3, wx0, wx1, wx2, wx3, ok)
    acc += wy1 * _taps4(base + tl.minimum(tl.maximum(iy, 0), H - 1) * sxh, x0, x1, x2, x3, wx0, wx1, wx2, wx3, ok)
    acc += wy2 * _taps4(base + tl.minimum(tl.maximum(iy + 1, 0), H - 1) * sxh, x0, x1, x2, x3, wx0, wx1, wx2, wx3, ok)
    acc += wy3 * _taps4(base + tl.minimum(tl.maximum(iy + 2, 0), H - 1) * sxh, x0, x1, x2, x3, wx0, wx1, wx2, wx3, ok)
    tl.store(Y + b * syb + c * syc + oy * syh + ox * syw, acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _area_kernel(
    X, Y, total, C, H, W, OH, OW,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    b, c, oy, ox = _unflatten(offs, C, OH, OW)
    h0 = (oy * H) // OH
    h1 = ((oy + 1) * H + OH - 1) // OH
    w0 = (ox * W) // OW
    w1 = ((ox + 1) * W + OW - 1) // OW
    base = X + b * sxb + c * sxc
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dy in tl.static_range(KH):  # KH / KW: the largest window, tails masked
        for dx in tl.static_range(KW):
            m = ok & (h0 + dy < h1) & (w0 + dx < w1)
            acc += tl.load(base + (h0 + dy) * sxh + (w0 + dx) * sxw, mask=m, other=0.0).to(tl.float32)
    acc = acc / (h1 - h0).to(tl.float32) / (w1 - w0).to(tl.float32)  # sum / kh / kw, as torch
    tl.store(Y + b * syb + c * syc + oy * syh + ox * syw, acc.to(Y.dtype.element_ty), mask=ok)


def _prepare(op, x, size, out):
    check_tensor(op, "x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_device(op, x.device)
    oh, ow = (size, size) if isinstance(size, int) else tuple(size)
    check(int(oh) >= 1 and int(ow) >= 1, op, f"size must be >= 1, got {size}")
    B, C, H, W = x.shape
    check(H >= 1 and W >= 1, op, f"empty input map {tuple(x.shape)}")
    shape = (B, C, int(oh), int(ow))
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    else:
        check_out(op, out, shape, x.dtype, x.device)
    return out, B * C * shape[2] * shape[3]


def _launch_args(x, out, total):
    B, C, H, W = x.shape
    return (x, out, total, C, H, W, out.shape[2], out.shape[3], *x.stride(), *out.stride())


def _block(total):
    return min(4096 if interpreting() else _BLOCK, max(16, triton.next_power_of_2(total)))


def upsample_bicubic(x, size, out=None):
    """x (B, C, h, w) -> (B, C, size, size) (size may be an (oh, ow) pair), as F.interpolate(mode="bicubic")."""
    out, total = _prepare("upsample_bicubic", x, size, out)
    if total == 0:
        return out
    H, W, OH, OW = x.shape[2], x.shape[3], out.shape[2], out.shape[3]
    block = _block(total)
    _bicubic_kernel[(triton.cdiv(total, block),)](*_launch_args(x, out, total), H / OH, W / OW, BLOCK=block,
                                                    num_warps=4)
    return out


def _max_window(n_in: int, n_out: int) -> int:
    return max(((o + 1) * n_in + n_out - 1) // n_out - (o * n_in) // n_out for o in range(n_out))


def downsample_area(x, size, out=None):
    """x (B, C, h, w) -> (B, C, size, size) (size may be an (oh, ow) pair), as F.interpolate(mode="area")."""
    out, total = _prepare("downsample_area", x, size, out)
    if total == 0:
        return out
    H, W, OH, OW = x.shape[2], x.shape[3], out.shape[2], out.shape[3]
    block = _block(total)
    _area_kernel[(triton.cdiv(total, block),)](*_launch_args(x, out, total), KH=_max_window(H, OH),
                                                 KW=_max_window(W, OW), BLOCK=block, num_warps=4)
    return out
