"""ZipAR attention: the active-row queries of one LlamaGen pass against the KV cache, with fused 2-D RoPE on q.

    zipar_attention(q, k_cache, v_cache, q_slot, counts, prefix, tpr, rope=None, out=None, n_keys=None,
                    num_splits=None) -> (N, H, Q, D)
Semantics of the torch reference `var_rt.ops.zipar_attention_ref` (the spec): q (N, H, Q, D) not yet rotated
when `rope` (L', D/2, 2) fp32 (cos, sin) is given; k_cache, v_cache (N, Hkv, L, D), K rotated; q_slot (Q,) int
KV slot of each query, or (N, Q): one row per batch row (batched SJD, with official=True: causal per row); counts (h,) int tokens of each row drawn before this pass. Visibility is computed per key
from its slot, no mask tensor:
    key j visible to the query at slot p  <=>  (j <= p and (j < prefix or col(j) < counts[row(j)])) or j == p
with row(j), col(j) = divmod(j - prefix, tpr) (official=True: j <= p, the official ZipAR code's mask). Softmax scale 1/sqrt(D), fp32 statistics, online softmax.
q and out may be strided views (q a slice of the wqkv output, out a (N, H, Q, D) view of a (N, Q, H*D) buffer).

Layout: one program per (batch row n, KV head, block of BLOCK_M query rows, key split). The rows of a program are
all (query, head) pairs sharing that KV head (GQA group x the pass's queries), so each K/V tile is read once per
pass for all of them, as a 2-D (BLOCK_N, D) tile contiguous in D, and both products are tensor-core dots
(fp32 inputs: exact fp32 dots). q is rotated with a pair-swapped second load (element d ^ 1).
Flash-decoding split: when N * Hkv * row blocks is too few programs to fill the GPU, the keys [0, n_keys) are cut
into `num_splits` chunks, each program writes an unnormalised partial (acc, max, sum) and a combine kernel
merges them (the one extra launch, only when splitting). The split count is picked from the shapes.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import (check, check_device, check_out, check_tensor, interpreting, next_pow2, FLOAT_DTYPES,
                      INT_DTYPES)

OP = "zipar_attention"
_LOG2E = 1.4426950408889634


@triton.jit
def _zipar_attn_kernel(Q, K, V, O, PO, PML, QSLOT, COUNTS, ROPE,
                       sqn, sqh, sqq, sqd, skn, skh, skl, skd, svn, svh, svl, svd, son, soh, soq, sod, spn,
                       N, H, Qn, GROUP, D, prefix, tpr, n_rows, chunk, n_splits, qk_scale,
                       HAS_ROPE: tl.constexpr, SPLIT: tl.constexpr, F32_DOT: tl.constexpr, OFFICIAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_nh = tl.program_id(0)
    Hkv = H // GROUP
    n = (pid_nh // Hkv).to(tl.int64)
    hk = pid_nh % Hkv
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)      # row = (query, head in the group)
    split = tl.program_id(2)
    qi = rm // GROUP
    h = hk * GROUP + rm % GROUP
    m_ok = qi < Qn
    p = tl.load(QSLOT + n * spn + qi, mask=m_ok, other=-1).to(tl.int32)   # each row's query slot; -1: padding
    p_max = tl.max(p, axis=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qmask = m_ok[:, None] & d_ok[None, :]
    qb = Q + n * sqn + h[:, None] * sqh + qi[:, None] * sqq
    qf = tl.load(qb + d[None, :] * sqd, mask=qmask, other=0.0).to(tl.float32)
    if HAS_ROPE:   # official apply_rotary_emb in fp32: out[d] = q[d] cos -+ q[d ^ 1] sin
        qs = tl.load(qb + (d ^ 1)[None, :] * sqd, mask=qmask, other=0.0).to(tl.float32)
        rb = ROPE + tl.maximum(p, 0)[:, None] * D + (d // 2)[None, :] * 2
        cs = tl.load(rb, mask=qmask, other=0.0)
        sn = tl.load(rb + 1, mask=qmask, other=0.0)
        qf = qf * cs + qs * tl.where((d % 2 == 0)[None, :], -sn, sn)
    q = qf.to(K.dtype.element_ty)            # the dot's operand (16-bit inputs: rounded as the official rope)
    lo = split * chunk
    hi = tl.where(split < n_splits - 1, tl.minimum(p_max + 1, lo + chunk), p_max + 1)   # last: to the end
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kb = K + n * skn + hk * skh
    vb = V + n * svn + hk * svh
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        img = tl.maximum(j - prefix, 0)
        row = img // tpr
        cnt = tl.load(COUNTS + row, mask=j_ok & (j >= prefix) & (row < n_rows), other=0)
        drawn = (j < prefix) | (img - row * tpr < cnt)
        if OFFICIAL:   # zipar_mask="official": the plain lower triangle over slots
            vis = j[None, :] <= p[:, None]
        else:
            vis = ((j[None, :] <= p[:, None]) & drawn[None, :]) | (j[None, :] == p[:, None])
        vis = vis & j_ok[None, :]
        kvm = j_ok[:, None] & d_ok[None, :]
        k = tl.load(kb + j[:, None] * skl + d[None, :] * skd, mask=kvm, other=0.0)
        if F32_DOT:   # fp32 inputs (exact dot), or the interpreter emulating a 16-bit dot (rounded operands)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(vis, s * qk_scale, float("-inf"))            # base-2 logits
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # rows that saw nothing yet stay at zero
        alpha = tl.exp2(m_i - m_use)
        pr = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = tl.load(vb + j[:, None] * svl + d[None, :] * svd, mask=kvm, other=0.0)
        if F32_DOT:
            pv = tl.dot(pr.to(V.dtype.element_ty).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(pr.to(V.dtype.element_ty), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLIT:   # unnormalised partial of this key chunk: (S, N, H, Q, D) acc and (S, N, H, Q, 2) (max, sum)
        r = ((split * N + n) * H + h) * Qn + qi
        tl.store(PO + r[:, None] * D + d[None, :], acc, mask=qmask)
        tl.store(PML + r * 2, m_i, mask=m_ok)
        tl.store(PML + r * 2 + 1, l_i, mask=m_ok)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        ob = O + n * son + h[:, None] * soh + qi[:, None] * soq
        tl.store(ob + d[None, :] * sod, o.to(O.dtype.element_ty), mask=qmask)


@triton.jit
def _zipar_combine_kernel(PO, PML, O, R, H, Qn, D, n_splits, son, soh, soq, sod,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)                      # one (n, h, query) row
    n = (r // (H * Qn)).to(tl.int64)
    h = (r // Qn) % H
    qi = r % Qn
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    prow = s.to(tl.int64) * R + r
    m = tl.load(PML + prow * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(PML + prow * 2 + 1, mask=s_ok, other=0.0)
    m_all = tl.max(m, axis=0)                 # finite: the query's own key is in some chunk
    w = tl.exp2(m - m_all)
    acc = tl.load(PO + prow[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(O + n * son + h * soh + qi * soq + d * sod, o.to(O.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132   # the interpreter: plan as for an H100 / H200


def plan_splits(programs: int, n_keys: int, block_n: int, sms: int, num_splits=None):
    """(splits, chunk): key chunks of whole BLOCK_N tiles so that programs * splits about fills `sms` SMs. By
    default a split only when the GPU would be under-filled, and with at least two tiles per chunk (the combine
    is one more launch: not worth it for a few keys)."""
    tiles = max(1, triton.cdiv(n_keys, block_n))
    if num_splits is None:
        num_splits = 1 if programs >= sms else min(tiles // 2, triton.cdiv(sms, programs), 16)
    num_splits = max(1, min(int(num_splits), tiles))
    chunk = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(n_keys, chunk), chunk


def _tiles(dtype, M: int, D: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)."""
    block_m = min(64, max(16, next_pow2(M)))
    block_d = max(16, next_pow2(D))
    if dtype == torch.float32:   # exact fp32 dots run on FMA units: smaller key tiles, 8 warps (no spills)
        return block_m, 32, block_d, 8, 2
    return block_m, 64 if block_d <= 64 else 32, block_d, 4 if block_d <= 64 else 8, 3


def zipar_attention(q, k_cache, v_cache, q_slot, counts, prefix: int, tpr: int, rope=None, out=None,
                    n_keys=None, num_splits=None, official=False):
    """official: zipar_mask="official", every key j <= p visible (the official ZipAR code's mask). n_keys: keys [0, n_keys) can be visible (max(q_slot) + 1; default: the whole cache), used only to plan the
    split; num_splits: force the split count (1 = no split), default from the shapes."""
    dev = q.device
    check_device(OP, dev)
    check_tensor(OP, "q", q, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor(OP, "v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check(q_slot.dim() in (1, 2), OP, f"q_slot must be (Q,) or (N, Q), got {tuple(q_slot.shape)}")
    check_tensor(OP, "q_slot", q_slot, ndim=q_slot.dim(), dtypes=INT_DTYPES, device=dev)
    check_tensor(OP, "counts", counts, ndim=1, dtypes=INT_DTYPES, device=dev)
    N, H, Qn, D = q.shape
    _, Hkv, L, Dk = k_cache.shape
    check(tuple(v_cache.shape) == tuple(k_cache.shape), OP, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    check(k_cache.shape[0] == N and Dk == D, OP, f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    check(q.dtype == k_cache.dtype == v_cache.dtype, OP, f"q, k_cache, v_cache dtypes differ: {q.dtype}, "
                                                         f"{k_cache.dtype}, {v_cache.dtype}")
    check(D % 2 == 0 and H % Hkv == 0, OP, f"head dim {D} must be even and {H} heads a multiple of {Hkv} kv heads")
    check(q_slot.shape[-1] == Qn and (q_slot.dim() == 1 or q_slot.shape[0] == N), OP,
          f"q_slot {tuple(q_slot.shape)} does not fit {N} rows x {Qn} queries")
    if rope is not None:
        check_tensor(OP, "rope", rope, ndim=3, dtypes=(torch.float32,), device=dev)
        check(rope.shape[1:] == (D // 2, 2) and rope.shape[0] >= L and rope.is_contiguous(), OP,
              f"rope must be a contiguous ({L}+, {D // 2}, 2) fp32 table, got {tuple(rope.shape)}")
    if out is None:
        out = torch.empty_like(q)
    else:
        check_out(OP, out, q.shape, q.dtype, dev)
    if N * H * Qn == 0:
        return out
    counts = counts.contiguous()
    q_slot = q_slot.contiguous()
    group = H // Hkv
    block_m, block_n, block_d, warps, stages = _tiles(q.dtype, Qn * group, D)
    m_blocks = triton.cdiv(Qn * group, block_m)
    n_keys = L if n_keys is None else max(1, min(int(n_keys), L))
    splits, chunk = plan_splits(N * Hkv * m_blocks, n_keys, block_n, _sm_count(dev), num_splits)
    if splits > 1:
        po = torch.empty((splits, N, H, Qn, D), device=dev, dtype=torch.float32)
        pml = torch.empty((splits, N, H, Qn, 2), device=dev, dtype=torch.float32)
    else:
        po = pml = out   # unused
    _zipar_attn_kernel[(N * Hkv, m_blocks, splits)](
        q, k_cache, v_cache, out, po, pml, q_slot, counts, rope if rope is not None else q_slot,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), q_slot.stride(0) if q_slot.dim() == 2 else 0,
        N, H, Qn, group, D, int(prefix), int(tpr), counts.numel(), chunk, splits,
        (1.0 / math.sqrt(D)) * _LOG2E,
        HAS_ROPE=rope is not None, SPLIT=splits > 1, OFFICIAL=bool(official),
        # the interpreter (triton 3.9) computes 16-bit dots wrongly: fp32 dots of rounded operands instead
        F32_DOT=q.dtype == torch.float32 or interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    if splits > 1:
        _zipar_combine_kernel[(N * H * Qn,)](
            po, pml, out, N * H * Qn, H, Qn, D, splits, *out.stride(),
            BLOCK_S=max(2, next_pow2(splits)), BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2)
    return out
