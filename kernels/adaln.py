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
    for name, t in (("scale", scale), ("shift", shift)):
        check_tensor(_OP, name, t, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
        check(t.shape[1] == 1 and t.shape[2] == C and t.shape[0] in (1, N), _OP,
              f"{name} has shape {tuple(t.shape)}, expected (N={N}, 1, C={C})")
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
    block_c = next_pow2(C)
    target = 16384 if interpreting() else 4096  # elements per program
    block_r = max(1, min(next_pow2(R), target // block_c, 64))
    tile = block_r * block_c
    warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8 if tile <= 8192 else 16
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
