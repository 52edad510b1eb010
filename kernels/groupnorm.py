"""GroupNorm (affine) with the SiLU that follows it in the VQVAE decoder fused in: one read, one write.

One program = one (batch, group): a first pass over the group's C/G * H * W contiguous elements accumulates
fp32 sum and sum of squares, a second normalises, applies the per-channel weight/bias and SiLU, and writes.
x must be contiguous NCHW (the decoder's layout). Spec: var_rt.ops.group_norm_silu_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_out, check_tensor, interpreting

_OP = "group_norm_silu"


@triton.jit
def _gn_kernel(X, W, B, Y, G, CPG, HW, eps, SILU: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # = b * G + g
    g = pid % G
    n = CPG * HW  # elements of this (batch, group), contiguous in NCHW
    base = pid * n
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    acc2 = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        i = start + offs
        x = tl.load(X + base + i, mask=i < n, other=0.0).to(tl.float32)
        acc += x
        acc2 += x * x
    mean = tl.sum(acc, axis=0) / n
    var = tl.maximum(tl.sum(acc2, axis=0) / n - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    for start in range(0, n, BLOCK):
        i = start + offs
        ok = i < n
        c = g * CPG + i // HW
        x = tl.load(X + base + i, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + c, mask=ok, other=1.0).to(tl.float32)
        b = tl.load(B + c, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + base + i, y.to(Y.dtype.element_ty), mask=ok)


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None):
    """x (B, C, H, W) contiguous; weight, bias (C,). GroupNorm(groups) then SiLU when `silu`. Same dtype as x."""
    check_tensor(_OP, "x", x, ndim=4, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_device(_OP, dev)
    check(x.is_contiguous(), _OP, "x must be contiguous NCHW")
    Bn, C, H, W = x.shape
    check(groups > 0 and C % groups == 0, _OP, f"{C} channels do not split into {groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(_OP, name, t, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        check(t.shape[0] == C, _OP, f"{name} has {t.shape[0]} entries, expected C={C}")
    if out is None:
        out = torch.empty_like(x)
    else:
        check_out(_OP, out, x.shape, x.dtype, dev)
        check(out.is_contiguous(), _OP, "out must be contiguous")
    if x.numel() == 0:
        return out
    cpg = C // groups
    block = 4096 if interpreting() else 2048
    _gn_kernel[(Bn * groups,)](x, weight, bias, out, groups, cpg, H * W, float(eps), SILU=bool(silu),
                               BLOCK=block, num_warps=8)
    return out
