"""2-D RoPE on the new keys and the KV-cache write of one LlamaGen pass, in one launch.

    rope_kv_write(k, v, k_cache, v_cache, slots, rope) -> None
k, v (N, Q, Hkv, D), any strides (views of the wqkv GEMM output); k_cache, v_cache (N, Hkv, L, D); slots (Q,)
int KV slot of each query, or (N, Q): one row of slots per batch row (batched SJD); rope (L', D/2, 2) fp32 (cos, sin) per interleaved pair, L' >= L. Writes
    k_cache[n, h, slots[q]] = apply_rotary_emb(k[n, q, h], rope[slots[q]])    (fp32 rotation, cache dtype)
    v_cache[n, h, slots[q]] = v[n, q, h]                                       (slots[n, q] for (N, Q) slots)
The rotation reads each head row twice, as is and pair-swapped (element d ^ 1), so no even/odd split is needed:
    out[d] = x[d] cos - x[d + 1] sin (d even),  x[d] cos + x[d - 1] sin (d odd)     (official apply_rotary_emb)
One program = one (n, q) and a block of heads. Spec: var_rt.ops.rope_kv_write_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INT_DTYPES, check, check_device, check_tensor, next_pow2

_OP = "rope_kv_write"


@triton.jit
def _rope_kv_kernel(K, V, KC, VC, SLOTS, ROPE,
                    Q, Hkv, D, ssn,
                    skn, skq, skh, skd, svn, svq, svh, svd,
                    kcn, kch, kcl, kcd, vcn, vch, vcl, vcd,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    nq = tl.program_id(0)
    n = nq // Q
    q = nq % Q
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (hs < Hkv)[:, None] & (d < D)[None, :]
    slot = tl.load(SLOTS + n * ssn + q).to(tl.int64)     # ssn = 0: one slot row shared by the batch
    kb = K + n.to(tl.int64) * skn + q * skq + hs[:, None] * skh
    x = tl.load(kb + d[None, :] * skd, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(kb + (d ^ 1)[None, :] * skd, mask=mask, other=0.0).to(tl.float32)    # pair-swapped
    cs = tl.load(ROPE + slot * D + (d // 2) * 2, mask=d < D, other=0.0)
    sn = tl.load(ROPE + slot * D + (d // 2) * 2 + 1, mask=d < D, other=0.0)
    sn = tl.where(d % 2 == 0, -sn, sn)
    kr = x * cs[None, :] + xp * sn[None, :]
    kc = KC + n.to(tl.int64) * kcn + hs[:, None] * kch + slot * kcl
    tl.store(kc + d[None, :] * kcd, kr.to(KC.dtype.element_ty), mask=mask)
    vv = tl.load(V + n.to(tl.int64) * svn + q * svq + hs[:, None] * svh + d[None, :] * svd, mask=mask, other=0.0)
    vc = VC + n.to(tl.int64) * vcn + hs[:, None] * vch + slot * vcl
    tl.store(vc + d[None, :] * vcd, vv.to(VC.dtype.element_ty), mask=mask)


def rope_kv_write(k, v, k_cache, v_cache, slots, rope):
    dev = k.device
    check_device(_OP, dev)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(_OP, name, t, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    check(slots.dim() in (1, 2), _OP, f"slots must be (Q,) or (N, Q), got {tuple(slots.shape)}")
    check_tensor(_OP, "slots", slots, ndim=slots.dim(), dtypes=INT_DTYPES, device=dev)
    check_tensor(_OP, "rope", rope, ndim=3, dtypes=(torch.float32,), device=dev)
    N, Q, Hkv, D = k.shape
    L = k_cache.shape[2]
    check(tuple(v.shape) == (N, Q, Hkv, D), _OP, f"v {tuple(v.shape)} != k {tuple(k.shape)}")
    check(tuple(k_cache.shape) == (N, Hkv, L, D) and tuple(v_cache.shape) == (N, Hkv, L, D), _OP,
          f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit k {tuple(k.shape)}")
    check(k_cache.dtype == v_cache.dtype == k.dtype == v.dtype, _OP, "k, v and the caches must share one dtype")
    check(D % 2 == 0, _OP, f"head dim {D} must be even")
    check(slots.shape[-1] == Q and (slots.dim() == 1 or slots.shape[0] == N), _OP,
          f"slots {tuple(slots.shape)} do not fit {N} rows x {Q} queries")
    check(rope.shape[1:] == (D // 2, 2) and rope.shape[0] >= L and rope.is_contiguous(), _OP,
          f"rope must be a contiguous ({L}+, {D // 2}, 2) fp32 table, got {tuple(rope.shape)}")
    if N * Q * Hkv == 0:
        return
    slots = slots.contiguous()
    block_d = max(2, next_pow2(D))
    block_h = max(1, min(next_pow2(Hkv), 4096 // block_d))
    tile = block_h * block_d
    warps = 1 if tile <= 256 else 2 if tile <= 1024 else 4
    _rope_kv_kernel[(N * Q, triton.cdiv(Hkv, block_h))](
        k, v, k_cache, v_cache, slots, rope,
        Q, Hkv, D, slots.stride(0) if slots.dim() == 2 else 0,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
