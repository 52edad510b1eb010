"""ZipAR schedule for LlamaGen c2i: which rows are active at each forward pass, the KV slot and input token of
every query, and what each query may see (`Visibility`). Pure: the attention over those queries is the op
`var_rt.ops.zipar_attention` (torch reference `zipar_attention_ref`, Triton kernel `kernels/zipar_attention.py`).

Grid: h rows x tpr tokens per row, raster index t = r * tpr + c. KV slot of raster position t = P + t, where P
is the class-prefix length (1 for c2i: slot 0 holds the class token). A query at slot p predicts the token at
raster index p - P + 1 (next-token prediction), so the query that draws (r, c) sits at the slot of the raster
predecessor of (r, c) and takes that predecessor's token as input.

Schedule (read off ThisisBillhe/ZipAR `generate_zipar.py`, window w = `zipar_window_size`):
  * row 0 is decoded token by token and is complete before row 1 starts (the official code runs plain
    decoding for the whole first row, then its ZipAR loop);
  * row r >= 1 starts at pass S_r = tpr + (r - 1) * w, i.e. the pass after row r-1 has drawn w tokens, and draws
    (r, c) at pass S_r + c; every active row draws one token per pass;
  * total passes = S_{h-1} + tpr = 2 * tpr + (h - 2) * w for h >= 2 (tpr for h == 1); w = tpr is exactly
    sequential decoding (h * tpr passes). The official code accepts 2 <= w < tpr (w = 1 trips an assert, w = tpr
    writes one slot twice in a pass); this schedule is defined for every 1 <= w <= tpr.
Queries of a pass (all written to the KV cache before attention, as the official code does):
  * (r, c), c > 0: slot of (r, c-1), input token (r, c-1), drawn by the previous pass;
  * (r, 0): slot of (r-1, tpr-1). If row r-1 is complete its last token is the input. Otherwise (w < tpr, r >= 2)
    the official *placeholder*: the newest drawn token of row r-2 stands in for the undrawn (r-1, tpr-1);
  * KV-only: the pass after a row r >= 1 draws its last token (r, tpr-1), one extra query feeds that token at its
    slot so its true K/V replace the placeholder's (the official code does the same and drops its logits).
    Not needed when the next row's first query already fed it (row 0; w = tpr).

Visibility (the rule the kernel computes from positions; no dense mask tensor): with n[r] = tokens of row r
drawn before this pass, a query at slot p sees key slot j iff
    (j <= p and (j < P or col(j) < n[row(j)]))  or  j == p
i.e. the class prefix, plus exactly the tokens drawn before this pass that precede the drawn token in raster
order (its decoded predecessors), plus itself (its own K/V; only matters for a placeholder query, whose slot is
not a drawn token). The official code instead lets every slot <= p through: undrawn slots are zero K/V and a
placeholder's K/V stays visible to later rows until its row finishes. We mask both by default
(zipar_mask="exact"); zipar_mask="official" (Visibility.official) reproduces the official rule, j <= p, over a
KV cache zeroed at the start of each generation (runtime.llamagen.decode_passes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from var_rt import ops


@dataclass(frozen=True)
class Query:
    slot: int          # KV slot written and attended from
    token: int         # raster index of the input token; -1: the class prefix token at `slot`
    target: int        # raster index this query draws; -1: KV-only (logits unused)
    placeholder: bool  # input token stands in for the undrawn raster predecessor


@dataclass(frozen=True)
class Pass:
    queries: tuple
    counts: tuple      # (h,) tokens of each row drawn before this pass


def row_start(r: int, tpr: int, w: int) -> int:
    """Pass at which row r draws its first token."""
    return 0 if r == 0 else tpr + (r - 1) * w


def counts_at(t: int, h: int, tpr: int, w: int) -> tuple:
    """(h,) tokens of each row drawn before pass t of ZipAR with window w."""
    return tuple(min(max(t - row_start(r, tpr, w), 0), tpr) for r in range(h))


def num_passes(h: int, tpr: int, w: int) -> int:
    return tpr if h == 1 else row_start(h - 1, tpr, w) + tpr


MASKS = ("exact", "official")


def check_mask(mask) -> str:
    if mask not in MASKS:
        raise ValueError(f"zipar_mask {mask!r}: expected 'exact' (decoded predecessors only, the default) or "
                         f"'official' (every slot <= the query's, as the official ZipAR code)")
    return mask


def check_window(w, tpr: int) -> int:
    if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= tpr:
        raise ValueError(f"zipar_window {w!r}: expected an int in [1, {tpr}] (tokens per row; {tpr} = sequential)")
    return w


def zipar_schedule(h: int, tpr: int, w: int, prefix: int = 1) -> list:
    """All passes of ZipAR with window w; w = tpr gives sequential decoding."""
    check_window(w, tpr)
    P = prefix
    starts = [row_start(r, tpr, w) for r in range(h)]
    passes = []
    for t in range(num_passes(h, tpr, w)):
        n = counts_at(t, h, tpr, w)
        qs = []
        for r in range(1, h):  # KV-only query of a row that finished last pass (unless fed by the next row's start)
            if t == starts[r] + tpr and not (r + 1 < h and starts[r + 1] == t):
                qs.append(Query(P + r * tpr + tpr - 1, r * tpr + tpr - 1, -1, False))
        for r in range(h):
            c = t - starts[r]
            if not 0 <= c < tpr:
                continue
            tgt = r * tpr + c
            if tgt == 0:
                qs.extend(Query(i, -1, 0 if i == P - 1 else -1, False) for i in range(P))
            elif c > 0 or n[r - 1] == tpr:
                qs.append(Query(P + tgt - 1, tgt - 1, tgt, False))
            else:  # row r-1 unfinished: the newest drawn token of row r-2 stands in for (r-1, tpr-1)
                qs.append(Query(P + tgt - 1, (r - 2) * tpr + n[r - 2] - 1, tgt, True))
        passes.append(Pass(tuple(qs), n))
    return passes


def sequential_schedule(h: int, tpr: int, prefix: int = 1) -> list:
    """Plain next-token decoding, written independently of zipar_schedule: pass t draws raster token t."""
    passes = []
    for t in range(h * tpr):
        n = tuple(min(max(t - r * tpr, 0), tpr) for r in range(h))
        if t == 0:
            qs = tuple(Query(i, -1, 0 if i == prefix - 1 else -1, False) for i in range(prefix))
        else:
            qs = (Query(prefix + t - 1, t - 1, t, False),)
        passes.append(Pass(qs, n))
    return passes


class Visibility(NamedTuple):
    """What the attention of one pass needs to derive each query's visible keys."""
    q_slot: torch.Tensor   # (Q,) int32
    counts: torch.Tensor   # (h,) int32 tokens of each row drawn before this pass; (Q, h) per query (SJD + ZipAR,
    prefix: int            # runtime.sjd; the torch reference attention only)
    tpr: int
    n_keys: int            # max(q_slot) + 1: keys beyond it are never visible
    official: bool = False  # zipar_mask="official": every key slot j <= p is visible (a plain causal mask)


def visibility_mask(vis: Visibility, n_keys: int | None = None) -> torch.Tensor:
    """(Q, n_keys) bool: the visibility rule of the module docstring, as a dense mask (reference and tests)."""
    return ops.zipar_visibility_mask(vis.q_slot, vis.counts, vis.prefix, vis.tpr,
                                     vis.n_keys if n_keys is None else n_keys, official=vis.official)


apply_rope = ops.apply_rope   # the official apply_rotary_emb; kept here for var_rt.demo.train_llamagen
