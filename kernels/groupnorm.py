"""GroupNorm (affine) with the SiLU that follows it in the VQVAE decoder fused in, NCHW or channels_last (NHWC),
optionally with the ResNet block's residual add before it fused in too.

Statistics are fp32 sums of (x - k), k one element of the (batch, group) (shifted data: the variance keeps its
precision when |mean| >> std); the output is (x - mean) * rstd * w + b, then SiLU, in x's dtype and x's layout.
The launcher picks the kernel by strides:

- contiguous NCHW: one program per (batch, group); the group's C/G * H * W elements are one contiguous run.
  A first pass accumulates the sums, a second normalises and writes.
- channels_last: a (batch, group) is C/G channels strided by C, so one program per group would read short strided
  runs. Instead programs own (batch, split of the H*W rows, chunk of <= 128 channels) and read full contiguous
  channel runs: `_nhwc_stats` writes per-(split, channel) fp32 partial sums, `_gn_finalize` reduces them to each
  (batch, group)'s mean and rstd, `_nhwc_apply` normalises. Same two reads + one write as the NCHW kernel.

With a residual r (`residual_group_norm_silu`): s = x + r is rounded to x's dtype and written (the block's output,
the next block's skip input) in the first pass, the statistics and the output are of s. That saves the separate
add's re-read: 5 passes instead of 6. Spec: var_rt.ops.group_norm_silu_ref / residual_group_norm_silu_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check, check_device, check_out, check_tensor, interpreting, next_pow2

_OP = "group_norm_silu"
NHWC_MAX_BLOCK_C = 128  # channels per NHWC program (a power of 2; C = 160 k runs as chunks of 32)
NHWC_TARGET_PROGRAMS = 4096  # the H*W split is sized so that (batch, split, chunk) programs fill the GPU


@triton.jit
def _gn_nchw_kernel(X, R, S, W, B, Y, G, CPG, HW, eps, SILU: tl.constexpr, HAS_RES: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # = b * G + g
    g = pid % G
    n = CPG * HW  # elements of this (batch, group), contiguous in NCHW
    base = pid * n
    offs = tl.arange(0, BLOCK)
    k = tl.load(X + base).to(tl.float32)  # the shift: the group's first element (of s = x + r with a residual)
    if HAS_RES:
        k = (k + tl.load(R + base).to(tl.float32)).to(S.dtype.element_ty).to(tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    acc2 = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        i = start + offs
        ok = i < n
        x = tl.load(X + base + i, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            s = (x + tl.load(R + base + i, mask=ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + base + i, s, mask=ok)
            x = s.to(tl.float32)
        d = tl.where(ok, x - k, 0.0)
        acc += d
        acc2 += d * d
    dm = tl.sum(acc, axis=0) / n
    mean = k + dm
    var = tl.maximum(tl.sum(acc2, axis=0) / n - dm * dm, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_RES:
        tl.debug_barrier()  # the second pass reads s written by other threads of this program
        SRC = S
    else:
        SRC = X
    for start in range(0, n, BLOCK):
        i = start + offs
        ok = i < n
        c = g * CPG + i // HW
        x = tl.load(SRC + base + i, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + c, mask=ok, other=1.0).to(tl.float32)
        b = tl.load(B + c, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + base + i, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _nhwc_stats(X, R, S, P, HW, C, CPG, ROWS, NS, NCC, HAS_RES: tl.constexpr, BLOCK_HW: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Program (b, split, chunk): fp32 sums of (x - k_g) and (x - k_g)^2 over rows [split*ROWS, +ROWS) of each
    channel of the chunk, into P (B, NS, 2, C). k_g = s[b, 0, 0, first channel of the group]."""
    pid = tl.program_id(0)
    cc = pid % NCC
    sp = (pid // NCC) % NS
    b = (pid // (NCC * NS)).to(tl.int64)
    base = b * HW * C
    c = cc * BLOCK_C + tl.arange(0, BLOCK_C)
    cok = c < C
    kc = (c // CPG) * CPG
    k = tl.load(X + base + kc, mask=cok, other=0.0).to(tl.float32)
    if HAS_RES:
        k = (k + tl.load(R + base + kc, mask=cok, other=0.0).to(tl.float32)).to(S.dtype.element_ty).to(tl.float32)
    acc = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    acc2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    rows = tl.arange(0, BLOCK_HW)
    for start in range(0, ROWS, BLOCK_HW):
        hw = sp * ROWS + start + rows
        ok = (hw < HW)[:, None] & cok[None, :]
        off = base + hw[:, None] * C + c[None, :]
        x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            s = (x + tl.load(R + off, mask=ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + off, s, mask=ok)
            x = s.to(tl.float32)
        d = tl.where(ok, x - k[None, :], 0.0)
        acc += d
        acc2 += d * d
    p = P + (b * NS + sp) * 2 * C + c
    tl.store(p, tl.sum(acc, axis=0), mask=cok)
    tl.store(p + C, tl.sum(acc2, axis=0), mask=cok)


@triton.jit
def _gn_finalize(P, SRC, MEAN, RSTD, G, HW, C, CPG, NS, eps, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """Program (b, block of BLOCK_G groups): each group's partial sums over splits and its CPG channels -> mean,
    rstd (fp32), from (BLOCK_S splits, BLOCK_G groups, BLOCK_J channels) tiles of P (B, NS, 2, C)."""
    pid = tl.program_id(0)
    ngb = tl.cdiv(G, BLOCK_G)
    b = (pid // ngb).to(tl.int64)
    g = (pid % ngb) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    gj_ok = (g < G)[:, None] & (j < CPG)[None, :]
    gj = g[:, None] * CPG + j[None, :]
    srows = tl.arange(0, BLOCK_S)
    a1 = tl.zeros((BLOCK_S, BLOCK_G, BLOCK_J), tl.float32)
    a2 = tl.zeros((BLOCK_S, BLOCK_G, BLOCK_J), tl.float32)
    for s0 in range(0, NS, BLOCK_S):
        sp = s0 + srows
        ok = (sp < NS)[:, None, None] & gj_ok[None, :, :]
        off = (b * NS + sp[:, None, None]) * 2 * C + gj[None, :, :]
        a1 += tl.load(P + off, mask=ok, other=0.0)
        a2 += tl.load(P + off + C, mask=ok, other=0.0)
    n = HW * CPG * 1.0
    dm = tl.sum(tl.sum(a1, axis=2), axis=0) / n  # (BLOCK_G,)
    gok = g < G
    mean = tl.load(SRC + b * HW * C + g * CPG, mask=gok, other=0.0).to(tl.float32) + dm  # the shift k_g, back
    var = tl.maximum(tl.sum(tl.sum(a2, axis=2), axis=0) / n - dm * dm, 0.0)
    tl.store(MEAN + b * G + g, mean, mask=gok)
    tl.store(RSTD + b * G + g, 1.0 / tl.sqrt(var + eps), mask=gok)


@triton.jit
def _nhwc_apply(SRC, MEAN, RSTD, W, B, Y, G, HW, C, CPG, ROWS, NS, NCC, SILU: tl.constexpr,
                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cc = pid % NCC
    sp = (pid // NCC) % NS
    b = (pid // (NCC * NS)).to(tl.int64)
    base = b * HW * C
    c = cc * BLOCK_C + tl.arange(0, BLOCK_C)
    cok = c < C
    gi = b * G + c // CPG
    mean = tl.load(MEAN + gi, mask=cok, other=0.0)
    rstd = tl.load(RSTD + gi, mask=cok, other=0.0)
    w = tl.load(W + c, mask=cok, other=1.0).to(tl.float32)
    bias = tl.load(B + c, mask=cok, other=0.0).to(tl.float32)
    rows = tl.arange(0, BLOCK_HW)
    for start in range(0, ROWS, BLOCK_HW):
        hw = sp * ROWS + start + rows
        ok = (hw < HW)[:, None] & cok[None, :]
        off = base + hw[:, None] * C + c[None, :]
        x = tl.load(SRC + off, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * rstd[None, :] * w[None, :] + bias[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=ok)


def nhwc_geometry(B: int, C: int, HW: int, elem: int = 2, block_hw: int | None = None, splits: int | None = None):
    """(BLOCK_C, channel chunks, BLOCK_HW, rows per split, splits) of the channels_last kernels; elem: bytes per
    element (tiles of 8 KB: no register spills with the residual's extra tiles, fp32 included)."""
    bc = C & -C  # largest power of 2 dividing C: no masked lanes
    if bc < 16:
        bc = next_pow2(C)
    bc = min(bc, NHWC_MAX_BLOCK_C)
    ncc = triton.cdiv(C, bc)
    bhw = block_hw or max(1, min((8192 if interpreting() else 8192 // elem) // bc, next_pow2(HW)))
    if splits is None:  # enough programs to fill the GPU, each still looping over >= 8 tiles
        splits = 1 if interpreting() else min(triton.cdiv(NHWC_TARGET_PROGRAMS, B * ncc), triton.cdiv(HW, 8 * bhw))
    splits = max(1, min(splits, triton.cdiv(HW, bhw)))
    rows = triton.cdiv(triton.cdiv(HW, splits), bhw) * bhw
    return bc, ncc, bhw, rows, triton.cdiv(HW, rows)


def finalize_geometry(groups: int, cpg: int, splits: int):
    """(BLOCK_S, BLOCK_G, BLOCK_J) of `_gn_finalize`: up to 1024 (group, channel) pairs, 2048 partials a tile."""
    bj = next_pow2(cpg)
    bg = min(next_pow2(groups), max(1, 1024 // bj))
    return min(next_pow2(splits), max(1, 2048 // (bg * bj))), bg, bj


def _layout(x) -> str | None:
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def _group_norm(x, r, weight, bias, groups: int, eps: float, silu: bool, out=None, block_hw=None, splits=None):
    """(s, y): s = x + r in x's dtype (x itself when r is None), y = GroupNorm(+SiLU) of s; y in s's layout."""
    check_tensor(_OP, "x", x, ndim=4, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_device(_OP, dev)
    layout = _layout(x)
    check(layout is not None, _OP, f"x must be contiguous NCHW or channels_last, got strides {x.stride()}")
    Bn, C, H, W = x.shape
    check(groups > 0 and C % groups == 0, _OP, f"{C} channels do not split into {groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(_OP, name, t, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        check(t.shape[0] == C, _OP, f"{name} has {t.shape[0]} entries, expected C={C}")
    if r is not None:
        check_tensor(_OP, "residual", r, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
        check(r.shape == x.shape and r.stride() == x.stride(), _OP,
              f"residual must have x's shape {tuple(x.shape)} and strides {x.stride()}, "
              f"got {tuple(r.shape)} / {r.stride()}")
    if out is None:
        out = torch.empty_like(x)
    else:
        check_out(_OP, out, x.shape, x.dtype, dev)
        ok = out.is_contiguous() if layout == "nchw" else out.is_contiguous(memory_format=torch.channels_last)
        check(ok, _OP, f"out must be contiguous in x's memory layout ({layout})")
    s = x if r is None else torch.empty_like(x)
    if x.numel() == 0:
        return s, out
    cpg, HW = C // groups, H * W
    has_res = r is not None
    rr = x if r is None else r  # unused pointers when there is no residual
    if layout == "nchw":
        block = 4096 if interpreting() else 2048
        _gn_nchw_kernel[(Bn * groups,)](x, rr, s, weight, bias, out, groups, cpg, HW, float(eps), SILU=bool(silu),
                                        HAS_RES=has_res, BLOCK=block, num_warps=8)
        return s, out
    bc, ncc, bhw, rows, ns = nhwc_geometry(Bn, C, HW, x.element_size(), block_hw, splits)
    grid = (Bn * ns * ncc,)
    part = torch.empty(Bn, ns, 2, C, device=dev, dtype=torch.float32)
    _nhwc_stats[grid](x, rr, s, part, HW, C, cpg, rows, ns, ncc, HAS_RES=has_res, BLOCK_HW=bhw, BLOCK_C=bc,
                      num_warps=8)
    mean = torch.empty(Bn * groups, device=dev, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bs, bg, bj = finalize_geometry(groups, cpg, ns)
    _gn_finalize[(Bn * triton.cdiv(groups, bg),)](part, s, mean, rstd, groups, HW, C, cpg, ns, float(eps),
                                                  BLOCK_S=bs, BLOCK_G=bg, BLOCK_J=bj, num_warps=4)
    _nhwc_apply[grid](s, mean, rstd, weight, bias, out, groups, HW, C, cpg, rows, ns, ncc, SILU=bool(silu),
                      BLOCK_HW=bhw, BLOCK_C=bc, num_warps=8)
    return s, out


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None):
    """x (B, C, H, W) contiguous NCHW or channels_last; weight, bias (C,). GroupNorm(groups) then SiLU when
    `silu`. Same dtype and memory layout as x."""
    return _group_norm(x, None, weight, bias, groups, eps, silu, out)[1]


def residual_group_norm_silu(x, r, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True):
    """The ResNet block's residual add fused into the next GroupNorm(+SiLU): returns (s, y), s = x + r in x's
    dtype, y = group_norm_silu(s). r must have x's shape and strides (NCHW or channels_last)."""
    return _group_norm(x, r, weight, bias, groups, eps, silu)
