"""RMSNorm of LlamaGen, optionally fused with the residual add in front of it.

    residual_rms_norm(x, y, weight, eps) -> (x + y, rms_norm(x + y))     y None: (x, rms_norm(x))
    rms_norm(x, weight, eps) -> rms_norm(x)
rms_norm(x) = (x * rsqrt(mean(x^2) + eps)) in fp32, rounded to x's dtype, THEN times weight (the official
RMSNorm.forward order); the residual sum is rounded to x's dtype before the statistics, so the norm sees exactly
the residual stream that is stored. One program = BLOCK_R whole rows (BLOCK_C = next power of two >= C, tails
masked): x and y read once, both outputs written once. x, y: (N, L, C) or (R, C) with any strides.
Spec: var_rt.ops.residual_rms_norm_ref / rms_norm_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_tensor, interpreting, next_pow2

_OP = "residual_rms_norm"


def _row_tiles(R: int, C: int):
    """(BLOCK_R, BLOCK_C, num_warps): whole rows in registers, about 4096 elements per program."""
    block_c = next_pow2(C)
    target = 16384 if interpreting() else 4096
    block_r = max(1, min(next_pow2(R), target // block_c, 64))
    tile = block_r * block_c
    warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8
    return block_r, block_c, warps


@triton.jit
def _rms_kernel(X, Y, W, XO, HO,
                R, L, C,
                sxn, sxl, sxc, syn, syl, syc, son, sol, soc, shn, shl, shc,
                eps,
                HAS_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = rows // L
    l = rows % L
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < R)[:, None] & c_ok[None, :]
    x = tl.load(X + (n * sxn + l * sxl)[:, None] + cols[None, :] * sxc, mask=mask, other=0.0)
    if HAS_Y:
        y = tl.load(Y + (n * syn + l * syl)[:, None] + cols[None, :] * syc, mask=mask, other=0.0)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(X.dtype.element_ty)   # the stored residual stream
        tl.store(XO + (n * son + l * sol)[:, None] + cols[None, :] * soc, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / C + eps)
    xn = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)        # rounded to x's dtype first
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    h = xn * w[None, :]
    tl.store(HO + (n * shn + l * shl)[:, None] + cols[None, :] * shc, h.to(HO.dtype.element_ty), mask=mask)


def _as3d(t):
    return t.unsqueeze(0) if t.dim() == 2 else t


def residual_rms_norm(x, y, weight, eps=1e-5):
    """x, y (N, L, C) or (R, C) (y may be None); weight (C,). Returns (x + y in x's dtype, normed in
    torch.result_type(x, weight)); with y None the first is x itself."""
    check_tensor(_OP, "x", x, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_device(_OP, dev)
    check(x.dim() in (2, 3), _OP, f"x must be (N, L, C) or (R, C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if y is not None:
        check_tensor(_OP, "y", y, dtypes=FLOAT_DTYPES, device=dev)
        check(tuple(y.shape) == tuple(x.shape) and y.dtype == x.dtype, _OP,
              f"y is {tuple(y.shape)} {y.dtype}, expected {tuple(x.shape)} {x.dtype}")
    check_tensor(_OP, "weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
    check(weight.shape[0] == C and weight.stride(0) == 1, _OP, f"weight must be a contiguous ({C},) vector, "
                                                                f"got {tuple(weight.shape)}")
    check(float(eps) >= 0.0, _OP, f"eps must be >= 0, got {eps}")
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format) if y is not None else x
    h_out = torch.empty(x.shape, device=dev, dtype=torch.result_type(x, weight))
    x3, xo3, ho3 = _as3d(x), _as3d(x_out), _as3d(h_out)
    y3 = _as3d(y) if y is not None else x3
    N, L, _ = x3.shape
    R = N * L
    if R == 0 or C == 0:
        return x_out, h_out
    block_r, block_c, warps = _row_tiles(R, C)
    _rms_kernel[(triton.cdiv(R, block_r),)](
        x3, y3, weight, xo3, ho3,
        R, L, C,
        *x3.stride(), *y3.stride(), *xo3.stride(), *ho3.stride(),
        float(eps),
        HAS_Y=y is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return x_out, h_out


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm alone: residual_rms_norm without the add."""
    return residual_rms_norm(x, None, weight, eps)[1]
