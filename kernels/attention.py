"""VAR attention (attn_l2_norm) fused with its KV-pool write: one launch per layer per step.

Input is the qkv GEMM's output (bias included), (N, l, 3, H, D) in the official packing (q | k | v, head-major
inside each). One program = one (batch row, head) x BLOCK_M queries. q is L2-normalised in fp32, times
scale_mul[h] and log2(e) (the softmax runs on exp2). Keys come in two ranges:
  [0, start)          earlier scales, read from the pool, where they were stored already normalised;
  [start, start + l)  this step's keys, read from qkv and normalised here (rounded to the pool's dtype, so they
                      are bit-identical to what the pool holds); the programs with pid_m == 0 also store them
                      (normalised k, raw v) into the pool at [start, start + l). No program of this launch reads
                      those pool slots, so there is no race, and no separate copy kernel.
Online softmax in fp32; the output is stored as (N, l, H * D), the layout the proj GEMM reads (no transpose copy).
Spec: var_rt.ops.var_attention_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INT_DTYPES, check, check_device, check_out, check_tensor, interpreting, next_pow2

_OP = "var_attention"
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_tile(q, kt, v, visible, m_i, l_i, acc, F32_DOT: tl.constexpr):
    """One key tile: kt (D, BN) normalised keys, v (BN, D); returns the updated (m_i, l_i, acc)."""
    if F32_DOT:  # fp32 inputs (exact "ieee" dot), or the interpreter emulating a bf16/fp16 dot (rounded operands)
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if F32_DOT:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _var_attn_kernel(
    QKV, KP, VP, O, SM, QS, KS,
    sxn, sxl, sxw, sxh, sxd,          # qkv (N, l, 3, H, D)
    skn, skh, skm, skd,               # k pool (N, H, Lmax, D)
    svn, svh, svm, svd,               # v pool
    son, sol, soh, sod,               # out (N, l, H, D)
    s_sm, H, Lq, start,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # (batch, head) on axis 0: its limit is 2^31, axis 1 holds the few query blocks
    pid_m = tl.program_id(1)
    n = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < Lq
    dt = KP.dtype.element_ty

    x_base = QKV + n * sxn + h * sxh
    q = tl.load(x_base + offs_m[:, None] * sxl + offs_d[None, :] * sxd, mask=m_ok[:, None], other=0.0).to(tl.float32)
    q_norm = tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)
    sm = tl.load(SM + h * s_sm).to(tl.float32)
    q = (q * ((sm * 1.4426950408889634) / q_norm)[:, None]).to(dt)
    if BLOCK_CAUSAL:
        q_sc = tl.load(QS + offs_m, mask=m_ok, other=0)

    kp_base = KP + n * skn + h * skh
    vp_base = VP + n * svn + h * svh
    # finite start for the running max: a row whose keys are all masked ends with l = 0 -> NaN, as the reference
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    # earlier scales: normalised keys straight from the pool
    for start_n in range(0, start, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < start
        kt = tl.load(kp_base + cols[None, :] * skm + offs_d[:, None] * skd, mask=n_ok[None, :], other=0.0)  # (D, BN)
        v = tl.load(vp_base + cols[:, None] * svm + offs_d[None, :] * svd, mask=n_ok[:, None], other=0.0)  # (BN, D)
        visible = n_ok[None, :]
        if BLOCK_CAUSAL:
            k_sc = tl.load(KS + cols, mask=n_ok, other=0)
            visible = visible & (k_sc[None, :] <= q_sc[:, None])
        m_i, l_i, acc = _online_softmax_tile(q, kt, v, visible, m_i, l_i, acc, F32_DOT)
    # this step's keys: normalised here, stored into the pool once (by the first query block)
    k_src = QKV + n * sxn + sxw + h * sxh
    v_src = QKV + n * sxn + 2 * sxw + h * sxh
    for start_n in range(0, Lq, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < Lq
        kf = tl.load(k_src + cols[None, :] * sxl + offs_d[:, None] * sxd, mask=n_ok[None, :], other=0.0).to(tl.float32)
        kt = (kf / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=0)), 1e-12)[None, :]).to(dt)  # (D, BN)
        v = tl.load(v_src + cols[:, None] * sxl + offs_d[None, :] * sxd, mask=n_ok[:, None], other=0.0).to(dt)
        if pid_m == 0:
            pos = start + cols
            tl.store(kp_base + pos[None, :] * skm + offs_d[:, None] * skd, kt, mask=n_ok[None, :])
            tl.store(vp_base + pos[:, None] * svm + offs_d[None, :] * svd, v, mask=n_ok[:, None])
        visible = n_ok[None, :]
        if BLOCK_CAUSAL:
            k_sc = tl.load(KS + start + cols, mask=n_ok, other=0)
            visible = visible & (k_sc[None, :] <= q_sc[:, None])
        m_i, l_i, acc = _online_softmax_tile(q, kt, v, visible, m_i, l_i, acc, F32_DOT)
    o = acc / l_i[:, None]
    o_ptrs = O + n * son + offs_m[:, None] * sol + h * soh + offs_d[None, :] * sod
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None])


def _check_args(qkv, kv, start, scale_mul, q_scale, k_scale):
    check_tensor(_OP, "qkv", qkv, ndim=3, dtypes=FLOAT_DTYPES)
    dev = qkv.device
    check_device(_OP, dev)
    check_tensor(_OP, "kv", kv, ndim=5, dtypes=(qkv.dtype,), device=dev)
    two, N, H, Lmax, D = kv.shape
    Nq, Lq, C3 = qkv.shape
    check(two == 2, _OP, f"kv has shape {tuple(kv.shape)}, expected (2, N, H, Lmax, D)")
    check(Nq == N and C3 == 3 * H * D, _OP, f"qkv has shape {tuple(qkv.shape)}, expected (N={N}, l, 3*H*D={3 * H * D})")
    check(qkv.stride(2) == 1, _OP, "qkv's last dim must be contiguous (the GEMM output)")
    check(D in (16, 32, 64, 128), _OP, f"head dim D={D} not supported (a power of two in 16..128)")
    check(isinstance(start, int) and 0 <= start and start + Lq <= Lmax, _OP,
          f"start={start} with {Lq} queries does not fit the pool's {Lmax} slots")
    check_tensor(_OP, "scale_mul", scale_mul, dtypes=FLOAT_DTYPES, device=dev)
    check(scale_mul.numel() == H, _OP, f"scale_mul has {scale_mul.numel()} elements, expected one per head (H={H})")
    check((q_scale is None) == (k_scale is None), _OP, "give both q_scale and k_scale (block-causal) or neither")
    if q_scale is not None:
        check(start == 0, _OP, "block-causal attention is a prefill: start must be 0")
        check_tensor(_OP, "q_scale", q_scale, dtypes=INT_DTYPES, device=dev)
        check_tensor(_OP, "k_scale", k_scale, dtypes=INT_DTYPES, device=dev)
        check(q_scale.numel() == Lq and k_scale.numel() == Lq, _OP,
              f"q_scale / k_scale have {q_scale.numel()} / {k_scale.numel()} elements, expected l={Lq}")
    return N, H, Lq, D


def _tiles(dtype, Lq: int, Lk: int, D: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for Lq queries over Lk keys."""
    if interpreting():  # the interpreter runs programs one by one: few, large tiles are fastest there
        return max(16, min(64, next_pow2(Lq))), max(16, min(128, next_pow2(Lk))), 4, 1
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles keep them in registers
        return max(16, min(32, next_pow2(Lq))), max(16, min(32, next_pow2(Lk))), 4, 2
    # bf16 / fp16 tensor cores; VAR's scales have Lq = pn^2 in 1..256 and Lk up to 680
    big = D <= 64 and triton.cdiv(Lq, 128) * 128 <= triton.cdiv(Lq, 64) * 64  # 128 rows when no more padding
    block_m = 128 if big else max(16, min(64, next_pow2(Lq)))
    warps = 8 if block_m >= 128 or D >= 128 else 4
    return block_m, max(16, min(64, next_pow2(Lk))), warps, 3 if D <= 64 else 2


def var_attention(qkv, kv, start: int, scale_mul, q_scale=None, k_scale=None, out=None):
    """qkv (N, l, 3*H*D) the qkv GEMM's output (bias added); kv (2, N, H, Lmax, D) this layer's pool view;
    start: pool position of this step's first token; scale_mul (H,) = exp(min(scale_mul, ln 100)).
    q_scale / k_scale (l,) int (prefill only, start = 0): query i sees key j iff k_scale[j] <= q_scale[i].
    Writes normalised k and raw v into kv[:, :, :, start:start+l]; returns (N, l, H*D) in qkv's dtype."""
    N, H, Lq, D = _check_args(qkv, kv, start, scale_mul, q_scale, k_scale)
    if out is None:
        out = torch.empty((N, Lq, H * D), device=qkv.device, dtype=qkv.dtype)
    else:
        check_out(_OP, out, (N, Lq, H * D), qkv.dtype, qkv.device)
    if N * H * Lq == 0:
        return out
    x = qkv.view(N, Lq, 3, H, D)
    o = out.view(N, Lq, H, D)
    sm = scale_mul.reshape(-1)
    causal = q_scale is not None
    qs = q_scale.reshape(-1) if causal else sm  # dummies when not block-causal (never read)
    ks = k_scale.reshape(-1) if causal else sm
    block_m, block_n, warps, stages = _tiles(qkv.dtype, Lq, start + Lq, D)
    grid = (N * H, triton.cdiv(Lq, block_m))
    _var_attn_kernel[grid](
        x, kv[0], kv[1], o, sm, qs, ks,
        *x.stride(), *kv[0].stride(), *kv[1].stride(), *o.stride(),
        sm.stride(0), H, Lq, start,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_CAUSAL=causal,
        # the interpreter (triton 3.9) computes bf16 dots wrongly: it gets fp32 dots of bf16-rounded operands
        F32_DOT=qkv.dtype == torch.float32 or interpreting(),
        num_warps=warps, num_stages=stages,
    )
    return out
