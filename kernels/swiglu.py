"""SwiGLU gate of the LlamaGen FFN: silu(a) * b, one read of each, one write.

    swiglu(a, b) -> (..., F)      a, b (N, L, F) or (R, F), any strides (typically the two halves of the one
                                  w1|w3 GEMM output (N, L, 2F): a = g[..., :F], b = g[..., F:])
Rounding as the official F.silu(w1 x) * w3 x: silu in fp32 rounded to the input dtype, then the product rounded.
Spec: var_rt.ops.swiglu_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_tensor, interpreting, next_pow2

_OP = "swiglu"


@triton.jit
def _swiglu_kernel(A, B, O, R, L, F, n_fblk,
                   san, sal, saf, sbn, sbl, sbf, son, sol, sof,
                   BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // n_fblk).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_fblk) * BLOCK_F + tl.arange(0, BLOCK_F)
    n = rows // L
    l = rows % L
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    a = tl.load(A + (n * san + l * sal)[:, None] + cols[None, :] * saf, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + (n * sbn + l * sbl)[:, None] + cols[None, :] * sbf, mask=mask, other=0.0).to(tl.float32)
    s = (a / (1.0 + tl.exp(-a))).to(O.dtype.element_ty).to(tl.float32)    # F.silu, rounded like torch's
    tl.store(O + (n * son + l * sol)[:, None] + cols[None, :] * sof, (s * b).to(O.dtype.element_ty), mask=mask)


def _as3d(t):
    return t.unsqueeze(0) if t.dim() == 2 else t


def swiglu(a, b, out=None):
    """a, b (N, L, F) or (R, F), same shape and dtype. Returns silu(a) * b, contiguous, in a's dtype."""
    check_tensor(_OP, "a", a, dtypes=FLOAT_DTYPES)
    dev = a.device
    check_device(_OP, dev)
    check(a.dim() in (2, 3), _OP, f"a must be (N, L, F) or (R, F), got shape {tuple(a.shape)}")
    check_tensor(_OP, "b", b, dtypes=FLOAT_DTYPES, device=dev)
    check(tuple(b.shape) == tuple(a.shape) and b.dtype == a.dtype, _OP,
          f"b is {tuple(b.shape)} {b.dtype}, expected {tuple(a.shape)} {a.dtype}")
    if out is None:
        out = torch.empty(a.shape, device=dev, dtype=a.dtype)
    else:
        check_tensor(_OP, "out", out, device=dev)
        check(tuple(out.shape) == tuple(a.shape) and out.dtype == a.dtype, _OP,
              f"out is {tuple(out.shape)} {out.dtype}, expected {tuple(a.shape)} {a.dtype}")
    a3, b3, o3 = _as3d(a), _as3d(b), _as3d(out)
    N, L, F = a3.shape
    R = N * L
    if R == 0 or F == 0:
        return out
    block_f = min(next_pow2(F), 1024)
    block_r = max(1, min(next_pow2(R), (16384 if interpreting() else 4096) // block_f))
    n_fblk = triton.cdiv(F, block_f)
    tile = block_r * block_f
    warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 4096 else 8
    _swiglu_kernel[(triton.cdiv(R, block_r) * n_fblk,)](
        a3, b3, o3, R, L, F, n_fblk,
        *a3.stride(), *b3.stride(), *o3.stride(),
        BLOCK_R=block_r, BLOCK_F=block_f, num_warps=warps)
    return out
