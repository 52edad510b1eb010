"""LlamaGen's 2-D RoPE, and the KV-cache write of a pass's new keys (rotated) and values."""
from __future__ import annotations

import torch

from var_rt.ops import dispatch


@dispatch.kernel("rope_kv_write")
def _rope_kv_write_kernel():
    from var_rt.kernels.rope_kv import rope_kv_write
    return rope_kv_write


def apply_rope(x, table):
    """x (N, Q, H, D); table (Q, D/2, 2) (cos, sin) per interleaved pair: the official apply_rotary_emb.
    Rotated in fp32, returned in x's dtype."""
    N, Q, H, D = x.shape
    xs = x.float().reshape(N, Q, H, D // 2, 2)
    cos, sin = table[..., 0].view(1, Q, 1, D // 2), table[..., 1].view(1, Q, 1, D // 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).to(x.dtype)


def rotate_rows(x, table):
    """apply_rope with one table per batch row: x (N, Q, H, D); table (N, Q, D/2, 2) (cos, sin). Same arithmetic,
    rotated in fp32, returned in x's dtype."""
    N, Q, H, D = x.shape
    xs = x.float().reshape(N, Q, H, D // 2, 2)
    cos, sin = table[..., 0].view(N, Q, 1, D // 2), table[..., 1].view(N, Q, 1, D // 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).to(x.dtype)


def rope_kv_write_ref(k, v, k_cache, v_cache, slots, rope):
    """k, v (N, Q, Hkv, D) this pass's new keys and values (views of the wqkv output); k_cache, v_cache
    (N, Hkv, L, D); slots (Q,) int, or (N, Q): row n's queries write at slots[n] (batched SJD; duplicates within a
    row: one of them wins, callers repeat only a slot no query of theirs reads); rope (L, D/2, 2) fp32. Writes k
    rotated by rope[slots] and v at their slots."""
    slots = slots.long()
    if slots.dim() == 2:   # one scatter per cache, no host sync
        idx = slots[:, None, :, None].expand(-1, k_cache.shape[1], -1, k_cache.shape[-1])      # (N, Hkv, Q, D)
        k_cache.scatter_(2, idx, rotate_rows(k, rope[slots]).transpose(1, 2).to(k_cache.dtype))
        v_cache.scatter_(2, idx, v.transpose(1, 2).to(v_cache.dtype))
        return
    k_cache.index_copy_(2, slots, apply_rope(k, rope[slots]).transpose(1, 2))
    v_cache.index_copy_(2, slots, v.transpose(1, 2))


def rope_kv_write(k, v, k_cache, v_cache, slots, rope, backend=None):
    fn = dispatch.fast_kernel(_rope_kv_write_kernel, backend, k.device)
    (fn or rope_kv_write_ref)(k, v, k_cache, v_cache, slots, rope)
