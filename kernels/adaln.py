"""AdaLN: LayerNorm without affine (fp32 statistics), then y * (1 + scale) + shift.

One program = BLOCK_R rows of x (N, L, C), each row whole in registers (BLOCK_C = next power of two >= C,
tails masked), so x is read once and y written once. scale / shift are (N, 1, C) views (e.g. chunks of the
SiLU -> Linear(C, 6C) output): read through their strides. Spec: var_rt.ops.adaln_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_out, check_tensor, interpreting, next_pow2

_OP = "adaln"


def _row_tiles(R: int, C: int):
    """(BLOCK_R, BLOCK_C, num_warps): whole rows in registers, about 4096 elements per program."""
    block_c = next_pow2(C)
    target = 16384 if interpreting() else 4096  # elements per program
    block_r = max(1, min(next_pow2(R), target // block_c, 64))
    tile = block_r * block_c
    warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8 if tile <= 8192 else 16
    return block_r, block_c, warps


def _check_rows(op: str, dev, N: int, C: int, **per_row) -> None:
    """Each named tensor is a (N or 1, 1, C) modulation on `dev`."""
    for name, t in per_row.items():
        check_tensor(op, name, t, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
        check(t.shape[1] == 1 and t.shape[2] == C and t.shape[0] in (1, N), op,
              f"{name} has shape {tuple(t.shape)}, expected (N={N}, 1, C={C})")


@triton.jit
def _adaln_kernel(
    X, SC, SH, Y,
    R, L, C,
    sxn, sxl, sxc, scn, scc, shn, shc, syn, syl, syc,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    n = rows // L
    l = rows % L
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = r_ok[:, None] & c_ok[None, :]
    x = tl.load(X + (n * sxn + l * sxl)[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C  # biased, as F.layer_norm
    rstd = 1.0 / tl.sqrt(var + eps)
    sc = tl.load(SC + (n * scn)[:, None] + cols[None, :] * scc, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(SH + (n * shn)[:, None] + cols[None, :] * shc, mask=mask, other=0.0).to(tl.float32)
    y = (xc * rstd[:, None]) * (1.0 + sc) + sh
    tl.store(Y + (n * syn + l * syl)[:, None] + cols[None, :] * syc, y.to(Y.dtype.element_ty), mask=mask)


def adaln(x, scale, shift, eps=1e-6, out=None):
    """x (N, L, C); scale, shift (N, 1, C) (a leading 1 broadcasts over N). Returns (N, L, C) in x's dtype."""
    check_tensor(_OP, "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_device(_OP, dev)
    N, L, C = x.shape
    _check_rows(_OP, dev, N, C, scale=scale, shift=shift)
    check(float(eps) >= 0.0, _OP, f"eps must be >= 0, got {eps}")
    if out is None:
        out = torch.empty((N, L, C), device=dev, dtype=x.dtype)
    else:
        check_out(_OP, out, (N, L, C), x.dtype, dev)
    R = N * L
    if R == 0 or C == 0:
        return out
    scale = scale.expand(N, 1, C)  # stride 0 over N when it broadcasts
    shift = shift.expand(N, 1, C)
    block_r, block_c, warps = _row_tiles(R, C)
    grid = (triton.cdiv(R, block_r),)
    _adaln_kernel[grid](
        x, scale, shift, out,
        R, L, C,
        x.stride(0), x.stride(1), x.stride(2), scale.stride(0), scale.stride(2), shift.stride(0), shift.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        float(eps),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


@triton.jit
def _residual_adaln_kernel(
    X, YB, G, SC, SH, XO, HO,
    R, L, C,
    sxn, sxl, sxc, syn, syl, syc, sgn, sgc, scn, scc, shn, shc, son, sol, soc, shon, shol, shoc,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    n = rows // L
    l = rows % L
    cols = tl.arange(0, BLOCK_C)
    mask = r_ok[:, None] & (cols < C)[None, :]
    x = tl.load(X + (n * sxn + l * sxl)[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(YB + (n * syn + l * syl)[:, None] + cols[None, :] * syc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + (n * sgn)[:, None] + cols[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
    # the residual stream is rounded to its dtype first: the LayerNorm sees exactly what is stored
    xn = (x + y * g).to(XO.dtype.element_ty)
    tl.store(XO + (n * son + l * sol)[:, None] + cols[None, :] * soc, xn, mask=mask)
    xf = tl.where(mask, xn.to(tl.float32), 0.0)
    mean = tl.sum(xf, axis=1) / C
    xc = tl.where(mask, xf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    sc = tl.load(SC + (n * scn)[:, None] + cols[None, :] * scc, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(SH + (n * shn)[:, None] + cols[None, :] * shc, mask=mask, other=0.0).to(tl.float32)
    h = (xc * rstd[:, None]) * (1.0 + sc) + sh
    tl.store(HO + (n * shon + l * shol)[:, None] + cols[None, :] * shoc, h.to(HO.dtype.element_ty), mask=mask)


def residual_adaln(x, y, gamma, scale, shift, eps=1e-6):
    """x, y (N, L, C); gamma, scale, shift (N, 1, C). Returns (x + y * gamma, adaln of that), one pass.
    Spec: var_rt.ops.residual_adaln_ref."""
    op = "residual_adaln"
    check_tensor(op, "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_device(op, dev)
    N, L, C = x.shape
    check_tensor(op, "y", y, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check(tuple(y.shape) == (N, L, C), op, f"y has shape {tuple(y.shape)}, expected {(N, L, C)}")
    _check_rows(op, dev, N, C, gamma=gamma, scale=scale, shift=shift)
    x_out = torch.empty((N, L, C), device=dev, dtype=x.dtype)
    h_out = torch.empty((N, L, C), device=dev, dtype=x.dtype)
    R = N * L
    if R == 0 or C == 0:
        return x_out, h_out
    gamma, scale, shift = (t.expand(N, 1, C) for t in (gamma, scale, shift))
    block_r, block_c, warps = _row_tiles(R, C)
    _residual_adaln_kernel[(triton.cdiv(R, block_r),)](
        x, y, gamma, scale, shift, x_out, h_out,
        R, L, C,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        gamma.stride(0), gamma.stride(2), scale.stride(0), scale.stride(2), shift.stride(0), shift.stride(2),
        x_out.stride(0), x_out.stride(1), x_out.stride(2), h_out.stride(0), h_out.stride(1), h_out.stride(2),
        float(eps),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return x_out, h_out
