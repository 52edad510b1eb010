"""VAR attention (attn_l2_norm): q, k L2-normalised per head, q times scale_mul[h], softmax scale 1.

One program = one (batch, head) pair x BLOCK_M queries; it streams the keys in BLOCK_N tiles with an online
softmax (fp32 running max / sum / accumulator). k and v are read through their strides, so a view of a bigger
KV pool (pool[:, :, :Lk]) is used as it is, never copied. Spec: var_rt.ops.var_attention_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INT_DTYPES, check, check_device, check_out, check_tensor, interpreting, next_pow2

_OP = "var_attention"


@triton.jit
def _var_attn_kernel(
    Q, K, V, O, SM, QS, KS,
    sqn, sqh, sqm, sqd,
    skn, skh, skm, skd,
    svn, svh, svm, svd,
    son, soh, som, sod,
    s_sm, H, Lq, Lk,
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

    # q: L2-normalise in fp32, fold scale_mul[h] and log2(e) in (the softmax then runs on exp2)
    q = tl.load(Q + n * sqn + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=m_ok[:, None], other=0.0)
    qf = q.to(tl.float32)
    q_norm = tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), 1e-12)
    sm = tl.load(SM + h * s_sm).to(tl.float32)
    q = (qf * ((sm * 1.4426950408889634) / q_norm)[:, None]).to(Q.dtype.element_ty)
    if F32_DOT:  # fp32 inputs (exact "ieee" dot), or the interpreter emulating a bf16/fp16 dot (rounded operands)
        q = q.to(tl.float32)
    if BLOCK_CAUSAL:
        q_sc = tl.load(QS + offs_m, mask=m_ok, other=0)

    k_base = K + n * skn + h * skh
    v_base = V + n * svn + h * svh
    # finite start for the running max: a row whose keys are all masked ends with l = 0 -> NaN, as the reference
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < Lk
        kt = tl.load(k_base + cols[None, :] * skm + offs_d[:, None] * skd, mask=n_ok[None, :], other=0.0)  # (D, BN)
        kf = kt.to(tl.float32)
        inv_k = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=0)), 1e-12)  # k's norm applied to s's columns
        if F32_DOT:
            s = tl.dot(q, kf, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * inv_k[None, :]
        visible = n_ok[None, :]
        if BLOCK_CAUSAL:
            k_sc = tl.load(KS + cols, mask=n_ok, other=0)
            visible = visible & (k_sc[None, :] <= q_sc[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svm + offs_d[None, :] * svd, mask=n_ok[:, None], other=0.0)  # (BN, D)
        if F32_DOT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    o = acc / l_i[:, None]
    o_ptrs = O + n * son + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=m_ok[:, None])


def _check_args(q, k, v, scale_mul, q_scale, k_scale):
    check_tensor(_OP, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    dev = q.device
    check_device(_OP, dev)
    N, H, Lq, D = q.shape
    check_tensor(_OP, "k", k, ndim=4, dtypes=(q.dtype,), device=dev)
    check_tensor(_OP, "v", v, ndim=4, dtypes=(q.dtype,), device=dev)
    Lk = k.shape[2]
    check(tuple(k.shape) == (N, H, Lk, D), _OP, f"k has shape {tuple(k.shape)}, expected (N={N}, H={H}, Lk, D={D})")
    check(tuple(v.shape) == tuple(k.shape), _OP, f"v has shape {tuple(v.shape)}, expected k's {tuple(k.shape)}")
    check(Lk >= 1, _OP, "no keys (Lk = 0)")
    check(D in (16, 32, 64, 128), _OP, f"head dim D={D} not supported (a power of two in 16..128)")
    check_tensor(_OP, "scale_mul", scale_mul, dtypes=FLOAT_DTYPES, device=dev)
    check(scale_mul.numel() == H, _OP, f"scale_mul has {scale_mul.numel()} elements, expected one per head (H={H})")
    check((q_scale is None) == (k_scale is None), _OP, "give both q_scale and k_scale (block-causal) or neither")
    if q_scale is not None:
        check_tensor(_OP, "q_scale", q_scale, dtypes=INT_DTYPES, device=dev)
        check_tensor(_OP, "k_scale", k_scale, dtypes=INT_DTYPES, device=dev)
        check(q_scale.numel() == Lq, _OP, f"q_scale has {q_scale.numel()} elements, expected Lq={Lq}")
        check(k_scale.numel() == Lk, _OP, f"k_scale has {k_scale.numel()} elements, expected Lk={Lk}")
    return N, H, Lq, Lk, D


def _flat(t):
    """(n,) view with its stride; a non-1-D tensor of n elements is reshaped (copied only if it must be)."""
    t = t.reshape(-1)
    return t, t.stride(0)


def var_attention(q, k, v, scale_mul, q_scale=None, k_scale=None, out=None):
    """q (N, H, Lq, D); k, v (N, H, Lk, D), any strides; scale_mul (H,) = exp(min(scale_mul, ln 100)).
    q_scale (Lq,) / k_scale (Lk,) int: query i sees key j iff k_scale[j] <= q_scale[i]. Returns (N, H, Lq, D)
    in q's dtype (written into `out` when given)."""
    N, H, Lq, Lk, D = _check_args(q, k, v, scale_mul, q_scale, k_scale)
    if out is None:
        out = torch.empty((N, H, Lq, D), device=q.device, dtype=q.dtype)
    else:
        check_out(_OP, out, (N, H, Lq, D), q.dtype, q.device)
    if N * H * Lq == 0:
        return out
    sm, s_sm = _flat(scale_mul)
    causal = q_scale is not None
    qs = q_scale.reshape(-1) if causal else sm  # dummies when not block-causal (never read)
    ks = k_scale.reshape(-1) if causal else sm
    if interpreting():  # the interpreter runs programs one by one: few, large tiles are fastest there
        block_m = max(16, min(64, next_pow2(Lq)))
        block_n = max(16, min(128, next_pow2(Lk)))
        warps, stages = 4, 1
    elif q.dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles keep them in registers
        block_m = max(16, min(32, next_pow2(Lq)))
        block_n = max(16, min(32, next_pow2(Lk)))
        warps, stages = 4, 2
    else:  # bf16 / fp16 tensor cores; VAR's scales have Lq = pn^2 in 1..256 and Lk up to 680
        big = D <= 64 and triton.cdiv(Lq, 128) * 128 <= triton.cdiv(Lq, 64) * 64  # 128 rows when no more padding
        block_m = 128 if big else max(16, min(64, next_pow2(Lq)))
        block_n = max(16, min(64, next_pow2(Lk)))
        warps = 8 if block_m >= 128 or D >= 128 else 4
        stages = 3 if D <= 64 else 2
    grid = (N * H, triton.cdiv(Lq, block_m))
    _var_attn_kernel[grid](
        q, k, v, out, sm, qs, ks,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        s_sm, H, Lq, Lk,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_CAUSAL=causal,
        # the interpreter (triton 3.9) computes bf16 dots wrongly: it gets fp32 dots of bf16-rounded operands
        F32_DOT=q.dtype == torch.float32 or interpreting(),
        num_warps=warps, num_stages=stages,
    )
    return out
