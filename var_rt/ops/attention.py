"""Attention: VAR's (attn_l2_norm, over a scale's queries and the KV pool, fused with the pool write) and ZipAR's
(LlamaGen over its KV cache with the ZipAR visibility rule, fused with q's RoPE)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from var_rt.ops import dispatch
from var_rt.ops.rope import apply_rope, rotate_rows


@dispatch.kernel("var_attention")
def _var_attention_kernel():
    from var_rt.kernels.attention import var_attention
    return var_attention


@dispatch.kernel("zipar_attention")
def _zipar_attention_kernel():
    from var_rt.kernels.zipar_attention import zipar_attention
    return zipar_attention


# --------------------------------------------------------------------------------------------------------------
# VAR: attention over a scale's queries and the KV cache, fused with the KV-pool write
def var_attention_ref(qkv, kv, start: int, scale_mul, q_scale=None, k_scale=None, out=None):
    """qkv (N, l, 3*H*D): the qkv GEMM's output (bias added), official packing q | k | v; kv (2, N, H, Lmax, D)
    this layer's pool view; start: pool position of this step's first token; scale_mul (H,) fp32 =
    exp(min(scale_mul_1H11, ln 100)).
    k is L2-normalised (fp32, then the pool's dtype) and stored with v at kv[:, :, :, start:start+l]; q is
    L2-normalised and times scale_mul; softmax scale 1, fp32, over every pool key in [0, start+l).
    q_scale / k_scale (l,) int (the refiner's prefill, start = 0): query i sees key j iff k_scale[j] <= q_scale[i].
    Returns (N, l, H*D) in qkv's dtype (written into `out` when given)."""
    _, N, H, _, D = kv.shape
    l = qkv.shape[1]
    q, k, v = qkv.view(N, l, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, l, D)
    end = start + l
    kv[0, :, :, start:end] = F.normalize(k.float(), dim=-1).to(kv.dtype)
    kv[1, :, :, start:end] = v
    qf = F.normalize(q.float(), dim=-1) * scale_mul.float().view(1, -1, 1, 1)
    s = qf @ kv[0, :, :, :end].float().transpose(-1, -2)  # (N, H, l, end)
    if q_scale is not None:
        visible = k_scale.view(1, -1) <= q_scale.view(-1, 1)
        s = s.masked_fill(~visible, float("-inf"))
    o = (s.softmax(-1) @ kv[1, :, :, :end].float()).to(qkv.dtype).transpose(1, 2).reshape(N, l, H * D)
    if out is not None:
        out.copy_(o)
        return out
    return o


def var_attention(qkv, kv, start: int, scale_mul, q_scale=None, k_scale=None, out=None, backend=None):
    fn = dispatch.fast_kernel(_var_attention_kernel, backend, qkv.device)
    return (fn or var_attention_ref)(qkv, kv, start, scale_mul, q_scale, k_scale, out=out)


# --------------------------------------------------------------------------------------------------------------
# ZipAR (LlamaGen): several rows decoded at once; a query sees the prefix and the drawn tokens of earlier slots
def zipar_visibility_mask(q_slot, counts, prefix: int, tpr: int, n_keys: int, official: bool = False):
    """(Q, n_keys) bool, the ZipAR visibility rule (var_rt.runtime.zipar): query at slot p sees key j iff
    (j <= p and (j < prefix or col(j) < counts[row(j)])) or j == p, with row, col = divmod(j - prefix, tpr).
    official: the official ZipAR code's plain lower triangle, j <= p (undecoded slots included).
    counts (h,), or (Q, h) per query (SJD + ZipAR: each query sees the rows as plain ZipAR's pass drawing its
    target does; runtime.sjd)."""
    j = torch.arange(n_keys, device=q_slot.device)
    if official:
        return j <= q_slot.long().view(-1, 1)
    img = (j - prefix).clamp(min=0)
    row = (img // tpr).clamp(max=counts.shape[-1] - 1)
    drawn = (j < prefix) | ((img % tpr) < counts.long()[..., row])
    p = q_slot.long().view(-1, 1)
    return ((j <= p) & drawn) | (j == p)


def zipar_attention_ref(q, k_cache, v_cache, vis, rope=None, out=None):
    """q (N, H, Q, D) (not yet rotated when `rope` (L, D/2, 2) is given: rotated here by its slot);
    k_cache, v_cache (N, Hkv, L, D) with K already rotated; vis: a runtime.zipar.Visibility (q_slot, counts,
    prefix, tpr, n_keys). Softmax scale 1/sqrt(D), fp32; (N, H, Q, D) in q's dtype (copied into `out`, which may be
    a strided view, e.g. of an (N, Q, H*D) buffer). vis.q_slot may be (N, Q), one row per batch row (batched
    SJD): then vis.official must be set, query (n, i) sees key j iff j <= q_slot[n, i] (causal per row)."""
    if vis.q_slot.dim() == 2:
        return causal_attention_rows_ref(q, k_cache, v_cache, vis.q_slot, rope, vis.n_keys, out)
    N, H, Q, D = q.shape
    L = vis.n_keys
    qf = q.float()
    if rope is not None:
        qf = apply_rope(qf.transpose(1, 2), rope[vis.q_slot.long()]).transpose(1, 2)
    rep = H // k_cache.shape[1]
    k, v = k_cache[:, :, :L].float(), v_cache[:, :, :L].float()
    if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (qf @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))           # (N, H, Q, L)
    s = s.masked_fill(~zipar_visibility_mask(vis.q_slot, vis.counts, vis.prefix, vis.tpr, L, vis.official),
                     float("-inf"))
    o = (s.softmax(-1) @ v).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


class RowsVisibility(NamedTuple):
    """The visibility of batched SJD queries, in the fields zipar_attention reads (runtime.zipar.Visibility's):
    q_slot (N, Q) int slots, one row per batch row; causal per row (official=True: key j visible iff j <= slot);
    counts unused (a (1,) placeholder); n_keys the cache length (static shapes)."""
    q_slot: torch.Tensor
    counts: torch.Tensor
    prefix: int
    tpr: int
    n_keys: int
    official: bool = True


def rows_visibility(slots: torch.Tensor, n_keys: int, prefix: int, tpr: int) -> RowsVisibility:
    """RowsVisibility of (N, Q) per-row slots over a cache of n_keys slots."""
    return RowsVisibility(slots, torch.zeros(1, dtype=torch.int32, device=slots.device), prefix, tpr, n_keys)


def causal_attention_rows_ref(q, k_cache, v_cache, slots, rope, n_keys: int, out=None):
    """zipar_attention_ref with per-row slots and causal visibility: q (N, H, Q, D) (rotated here by rope[slots]
    when `rope` is given); caches (N, Hkv, L, D), K rotated; slots (N, Q): query (n, i) sees key j < n_keys iff
    j <= slots[n, i]. Every key is scored (static shapes); softmax scale 1/sqrt(D), fp32."""
    N, H, Q, D = q.shape
    qf = q.float()
    if rope is not None:
        qf = rotate_rows(qf.transpose(1, 2), rope[slots.long()]).transpose(1, 2)
    rep = H // k_cache.shape[1]
    k, v = k_cache[:, :, :n_keys].float(), v_cache[:, :, :n_keys].float()
    if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (qf @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))                              # (N, H, Q, L)
    visible = torch.arange(n_keys, device=q.device).view(1, 1, n_keys) <= slots.long().unsqueeze(-1)  # (N, Q, L)
    o = (s.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(-1) @ v).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def zipar_attention(q, k_cache, v_cache, vis, rope=None, out=None, backend=None, num_splits=None):
    """The Triton kernel (var_rt.kernels.zipar_attention) or the reference (always for per-query (Q, h) counts,
    which the kernel does not take). num_splits forces the kernel's flash-decoding key split (1 = none; default from
    the shapes)."""
    fn = dispatch.fast_kernel(_zipar_attention_kernel, backend, q.device)
    if fn is None or vis.counts.dim() == 2:   # per-query counts (SJD + ZipAR): the kernel takes one (h,) row
        return zipar_attention_ref(q, k_cache, v_cache, vis, rope=rope, out=out)
    return fn(q, k_cache, v_cache, vis.q_slot, vis.counts, vis.prefix, vis.tpr, rope=rope, out=out,
              n_keys=vis.n_keys, num_splits=num_splits, official=vis.official)
