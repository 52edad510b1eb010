"""ZipAR attention: the active-row queries of one LlamaGen pass against the KV cache, with fused 2-D RoPE on q.

Same signature and semantics as the torch reference `var_rt.runtime.zipar.attention_ref` (the spec):
    zipar_attention(q, k_cache, v_cache, q_slot, counts, prefix, tpr, rope=None, out=None) -> (N, H, Q, D)
q (N, H, Q, D) not yet rotated when `rope` (L, D/2, 2) fp32 (cos, sin) is given; k_cache, v_cache
(N, Hkv, L, D), K rotated; q_slot (Q,) int KV slot of each query; counts (h,) int tokens of each row drawn
before this pass. Visibility is computed per key from its slot, no mask tensor:
    key j visible to the query at slot p  <=>  (j <= p and (j < prefix or col(j) < counts[row(j)])) or j == p
with row(j), col(j) = divmod(j - prefix, tpr). Softmax scale 1/sqrt(D), fp32 accumulation, online softmax.
One program per (query, batch row, head); keys beyond the query's slot are never read. Head dims are split
into the even/odd members of each RoPE pair, so the rotation needs no data shuffle.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check, check_device, check_out, check_tensor, next_pow2, FLOAT_DTYPES, INT_DTYPES

OP = "zipar_attention"


@triton.jit
def _zipar_attn_kernel(Q, K, V, O, QSLOT, COUNTS, ROPE,
                       sqn, sqh, sqq, sqd, skn, skh, skl, skd, svn, svh, svl, svd, son, soh, soq, sod,
                       H, GROUP, prefix, tpr, n_rows, qk_scale,
                       HAS_ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    qi = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // H
    h = nh % H
    hk = h // GROUP
    p = tl.load(QSLOT + qi).to(tl.int32)
    d = tl.arange(0, BLOCK_H)
    dm = d < HALF
    qb = Q + n * sqn + h * sqh + qi * sqq
    q0 = tl.load(qb + (2 * d) * sqd, mask=dm, other=0.0).to(tl.float32)      # even members of the pairs
    q1 = tl.load(qb + (2 * d + 1) * sqd, mask=dm, other=0.0).to(tl.float32)  # odd members
    if HAS_ROPE:
        cs = tl.load(ROPE + p * (2 * HALF) + 2 * d, mask=dm, other=0.0)
        sn = tl.load(ROPE + p * (2 * HALF) + 2 * d + 1, mask=dm, other=0.0)
        r0 = q0 * cs - q1 * sn
        r1 = q1 * cs + q0 * sn
        q0 = r0
        q1 = r1
    q0 = q0 * qk_scale   # 1/sqrt(D) * log2(e): softmax in base 2
    q1 = q1 * qk_scale
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc0 = tl.zeros([BLOCK_H], tl.float32)
    acc1 = tl.zeros([BLOCK_H], tl.float32)
    kb = K + n * skn + hk * skh
    vb = V + n * svn + hk * svh
    for start in range(0, p + 1, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        img = tl.maximum(j - prefix, 0)
        row = img // tpr
        col = img - row * tpr
        upto = j <= p
        cnt = tl.load(COUNTS + row, mask=upto & (j >= prefix) & (row < n_rows), other=0)
        vis = (upto & ((j < prefix) | (col < cnt))) | (j == p)
        m2 = vis[:, None] & dm[None, :]
        k0 = tl.load(kb + j[:, None] * skl + (2 * d[None, :]) * skd, mask=m2, other=0.0).to(tl.float32)
        k1 = tl.load(kb + j[:, None] * skl + (2 * d[None, :] + 1) * skd, mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(k0 * q0[None, :] + k1 * q1[None, :], axis=1)                 # (BLOCK_N,)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(pr, axis=0)
        v0 = tl.load(vb + j[:, None] * svl + (2 * d[None, :]) * svd, mask=m2, other=0.0).to(tl.float32)
        v1 = tl.load(vb + j[:, None] * svl + (2 * d[None, :] + 1) * svd, mask=m2, other=0.0).to(tl.float32)
        acc0 = acc0 * alpha + tl.sum(pr[:, None] * v0, axis=0)
        acc1 = acc1 * alpha + tl.sum(pr[:, None] * v1, axis=0)
        m_i = m_new
    ob = O + n * son + h * soh + qi * soq
    tl.store(ob + (2 * d) * sod, (acc0 / l_i).to(O.dtype.element_ty), mask=dm)
    tl.store(ob + (2 * d + 1) * sod, (acc1 / l_i).to(O.dtype.element_ty), mask=dm)


def zipar_attention(q, k_cache, v_cache, q_slot, counts, prefix: int, tpr: int, rope=None, out=None):
    dev = q.device
    check_device(OP, dev)
    check_tensor(OP, "q", q, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "q_slot", q_slot, ndim=1, dtypes=INT_DTYPES, device=dev)
    check_tensor(OP, "counts", counts, ndim=1, dtypes=INT_DTYPES, device=dev)
    N, H, Qn, D = q.shape
    _, Hkv, L, Dk = k_cache.shape
    check(tuple(v_cache.shape) == tuple(k_cache.shape), OP, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    check(k_cache.shape[0] == N and Dk == D, OP, f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    check(D % 2 == 0 and H % Hkv == 0, OP, f"head dim {D} must be even and {H} heads a multiple of {Hkv} kv heads")
    check(q_slot.numel() == Qn, OP, f"q_slot has {q_slot.numel()} entries for {Qn} queries")
    if rope is not None:
        check_tensor(OP, "rope", rope, ndim=3, dtypes=(torch.float32,), device=dev)
        check(rope.shape[1:] == (D // 2, 2) and rope.shape[0] >= L and rope.is_contiguous(), OP,
              f"rope must be a contiguous ({L}+, {D // 2}, 2) fp32 table, got {tuple(rope.shape)}")
    if out is None:
        out = torch.empty_like(q)
    else:
        check_out(OP, out, q.shape, q.dtype, dev)
    counts = counts.contiguous()
    q_slot = q_slot.contiguous()
    BLOCK_N = 64 if L >= 64 else max(16, next_pow2(L))
    grid = (Qn, N * H)
    _zipar_attn_kernel[grid](
        q, k_cache, v_cache, out, q_slot, counts, rope if rope is not None else q_slot,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        H, H // Hkv, int(prefix), int(tpr), counts.numel(), (1.0 / math.sqrt(D)) * 1.4426950408889634,
        HAS_ROPE=rope is not None, HALF=D // 2, BLOCK_H=max(16, next_pow2(D // 2)), BLOCK_N=BLOCK_N, num_warps=4)
    return out
