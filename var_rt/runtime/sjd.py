"""Speculative Jacobi Decoding (SJD; Teng et al., ICLR 2025) for LlamaGen c2i, raster order or with ZipAR.

State per image: the accepted prefix (tokens 0..a-1) and a window of L draft tokens a..a+L-1, each with the
distribution it was drawn from (p_draft). One pass = one forward of the window: L queries (fewer at the end of the
grid) at slots P+a-1 .. P+a+L-2, inputs token a-1 (the class token when a = 0) and drafts a..a+L-2, causal
visibility (a query sees every slot <= its own: all accepted tokens, then the window's earlier drafts, written in
this same pass; slots of rejected drafts are rewritten by a later pass before any accepted token reads them). Query
i gives p_new for position a+i (the official draw's distribution: CFG, cfg_interval, temperature, top-k, top-p).
Drafts are tested left to right: accept x with probability min(1, p_new(x) / p_draft(x)); at the first rejection
the position is resampled from the normalised residual max(0, p_new - p_draft) and testing stops. Accepted drafts
and the resampled token are committed; the rest of the window is redrafted from this pass's p_new at those
positions, and positions new to the window from the last query's p_new. The first window is uniform random tokens.
This is speculative sampling per position, so the output has the distribution of sequential decoding; with
top_k = 1 it is sequential greedy decoding token for token.

Randomness: every draw (acceptance uniform, residual resample, redraft) comes from a generator seeded by
(image seed, pass, raster index, purpose) via ops.mix_seed, and each image runs its own passes with its own KV rows,
so an image does not depend on the batch. SJD runs eagerly, one image at a time (variable acceptance makes every
pass's shape and slots per image dynamic; no CUDA graphs), on the pipeline's backend (Triton attention included;
SJD + ZipAR: the torch reference attention).

SJD + ZipAR (generate_one_zipar, window w, "exact" mask): the target is plain ZipAR's distribution, so with top_k = 1
the tokens are plain ZipAR's (same w). Token (r, c) is drawn by plain ZipAR at pass S_r + c (runtime.zipar) and sees
the rows above as they stand then: counts_at(S_r + c) tokens of each row (its own row: its c predecessors), plus the
placeholder input at (r, 0) when plain ZipAR uses one. Each query here gets exactly those per-query counts (a
(Q, h) Visibility: the torch reference attention; the Triton kernel takes one (h,) row). A row r keeps a window of
up to L drafts after its a accepted tokens; position (r, c) is *testable* when every row above has accepted the
tokens its context needs (the ZipAR rule on accepted tokens: row r-1 has min(c + w, tpr) of them, and so on up),
so a row starts once the row above has w accepted tokens. One forward runs every row's window; each row tests its
testable prefix left to right as above (accept, resample, redraft). Once the row above has started, a row's window
also runs its untestable positions (look-ahead: their p_new only redrafts, their K/V lands on slots that no
testable query reads before they are rewritten), and a row that has not started gets its drafts from the committed
p_new of the row above. K/V: the slot of accepted token (r, j) is exact once the testable query drawing (r, j + 1)
has run (final token and context; no window writes it after (r, j + 1) is committed). Until then a later row does not
read it: it needs (r, j) only where (r, j + 1) is testable too (both are drawn in the same plain-ZipAR pass), and
then row r's window starts at (r, j + 1) and rewrites the slot first, in the same pass. The slot of a
row's last token held the next row's placeholder input: a K/V-only query writes the real token once the next row has
started (until then it reads as not yet accepted). "official" mask: not supported (it reads undecoded slots,
which SJD fills with drafts).

relaxed (off by default, 0): GSD-style relaxed acceptance, an approximation that changes the distribution: a
draft x is also accepted when p_new puts enough mass on its k nearest codebook neighbours (`neighbours`: (V, k)
token ids from the VQ codebook embeddings): the test uses p_new(cluster(x)) in place of p_new(x).
"""
from __future__ import annotations

import torch

from var_rt import ops
from var_rt.runtime.llamagen import cfg_on, filter_logits
from var_rt.runtime import zipar
from var_rt.runtime.zipar import Visibility

_STREAM = 0x5D1  # SJD noise streams: mix_seed(mix_seed(mix_seed(seed, _STREAM + pass), raster index), purpose)
_ACCEPT, _RESAMPLE, _DRAFT, _INIT, _BELOW = 1, 2, 3, 4, 5   # each (pass, position, purpose) keys one draw


def check_window(L) -> int:
    if isinstance(L, bool) or not isinstance(L, int) or L < 0:
        raise ValueError(f"sjd_window {L!r}: expected an int >= 0 (0 = off; the number of draft tokens per pass)")
    return L


def _noise(seed: int, i: int, t: int, purpose: int, n: int, device) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(ops.mix_seed(ops.mix_seed(ops.mix_seed(seed, _STREAM + i), t), purpose))
    return torch.empty(n, device=device).exponential_(generator=g)


def _sample(q, seed, i, t, purpose):
    """One token from the (unnormalised) distribution q (V,): argmax(q / Exp(1)) (an exact draw)."""
    return int((q / _noise(seed, i, t, purpose, q.numel(), q.device)).argmax())


def target_probs(logits, steps, settings, use_cfg: bool):
    """logits (N, Q, V) fp32 of one image (N = 2 with CFG: cond, uncond) -> (Q, V) probabilities of the official
    draw at raster indices `steps` (runtime.llamagen.draw_tokens' distribution)."""
    top_k, top_p, temperature = settings.at(0)
    if use_cfg:
        cond, uncond = logits[:1], logits[1:]
        mixed = uncond + (cond - uncond) * settings.cfg
        on = torch.tensor([cfg_on(t, settings.cfg_interval) for t in steps], device=logits.device).view(1, -1, 1)
        logits = torch.where(on, mixed, cond)
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)[0]


def generate_one(gpt, label: int, seed: int, kv: list, settings, L: int, backend, neighbours=None):
    """SJD for one image. kv: per-layer views (2, N, Hkv, L, D), N = 2 with CFG else 1. Returns
    (tokens (h*w,) int64, passes, accepted drafts, tested drafts)."""
    c = gpt.cfg
    n, P, V, dev = c.grid * c.grid, c.cls_token_num, c.vocab_size, kv[0].device
    if P != 1:
        raise ValueError("SJD supports one class token (c2i)")
    use_cfg = settings.cfg > 1.0
    N = 2 if use_cfg else 1
    cls_ids = torch.tensor([label, c.num_classes][:N], device=dev)
    tokens = torch.zeros(n, dtype=torch.int64, device=dev)
    drafts = torch.zeros(n, dtype=torch.int64, device=dev)
    q_draft = torch.full((n, V), 1.0 / V, device=dev)          # p_draft of each draft; uniform for random ones
    for t in range(min(L, n)):
        drafts[t] = _sample(q_draft[t], seed, 0, t, _INIT)
    counts = torch.zeros(c.grid, dtype=torch.int32, device=dev)
    a = i = accepted = tested = 0
    while a < n:
        m = min(L, n - a)
        if a == 0:
            h = torch.cat([gpt.embed_classes(cls_ids), gpt.embed_tokens(drafts[:m - 1].expand(N, -1))], dim=1)
        else:
            x = torch.cat([tokens[a - 1:a], drafts[a:a + m - 1]])
            h = gpt.embed_tokens(x.expand(N, -1))                                   # (N, m, C)
        slots = torch.arange(P + a - 1, P + a - 1 + m, device=dev)
        vis = Visibility(slots.to(torch.int32), counts, P, c.grid, P + a - 1 + m, official=True)   # causal
        probs = target_probs(gpt.step(h, slots, kv, vis, backend), range(a, a + m), settings, use_cfg)  # (m, V)
        done, ok = _test_window(probs, range(a, a + m), tokens, drafts, q_draft, seed, i, neighbours)
        accepted += ok
        tested += done
        _redraft(probs, a, m, done, min(a + done + L, n), drafts, q_draft, seed, i)
        a += done
        i += 1
    return tokens, i, accepted, tested


def generate_one_zipar(gpt, label: int, seed: int, kv: list, settings, L: int, w: int, backend, neighbours=None):
    """SJD + ZipAR (window w, "exact" mask) for one image: every row that may run keeps its own window of up to L
    drafts after its accepted prefix, one forward evaluates all of them (module docstring). kv, returns: as
    generate_one."""
    c = gpt.cfg
    h = tpr = c.grid
    n, P, V, dev = h * tpr, c.cls_token_num, c.vocab_size, kv[0].device
    if P != 1:
        raise ValueError("SJD supports one class token (c2i)")
    zipar.check_window(w, tpr)
    S = [zipar.row_start(r, tpr, w) for r in range(h)]
    need = [[zipar.counts_at(S[r] + col, h, tpr, w) for col in range(tpr)] for r in range(h)]  # context of (r, col)
    holder = [r >= 2 and need[r][0][r - 1] < tpr for r in range(h)]   # (r, 0) fed a placeholder, as in ZipAR
    use_cfg = settings.cfg > 1.0
    N = 2 if use_cfg else 1
    cls_ids = torch.tensor([label, c.num_classes][:N], device=dev)
    tokens = torch.zeros(n, dtype=torch.int64, device=dev)
    drafts = torch.zeros(n, dtype=torch.int64, device=dev)
    q_draft = torch.full((n, V), 1.0 / V, device=dev)
    for t in range(n):
        drafts[t] = _sample(q_draft[t], seed, 0, t, _INIT)
    for layer in kv:       # look-ahead queries read slots not written yet: zeros, not an earlier image's K/V
        layer.zero_()
    acc = [0] * h          # accepted tokens of each row
    fed = [False] * h      # slot (r, tpr-1) holds its real K/V (it held (r+1, 0)'s placeholder input)
    i = accepted = tested = 0
    while acc[h - 1] < tpr:   # a row completes only after the row above it
        seen = list(acc)       # tokens of each row whose K/V later queries of this pass may read
        q_slot, q_in, q_cnt, wins = [], [], [], []
        for r in range(h):
            a = acc[r]
            if a == tpr:
                if r + 1 < h and holder[r + 1] and not fed[r]:
                    if acc[r + 1] >= 1:   # KV-only: the real last token over (r+1, 0)'s placeholder input
                        q_slot.append(P + r * tpr + tpr - 1)
                        q_in.append(r * tpr + tpr - 1)
                        q_cnt.append(zipar.counts_at(S[r] + tpr, h, tpr, w))
                        fed[r] = True
                    else:                   # (r+1, 0) feeds its placeholder there this pass: not readable yet
                        seen[r] = tpr - 1
                continue
            m = 0   # testable: every row above holds the context plain ZipAR gives (r, a + m)
            while m < L and a + m < tpr and all(seen[q] >= need[r][a + m][q] for q in range(r)):
                m += 1
            # look-ahead (once the row above has started): the rest of the L positions run too, on whatever the
            # slots above hold, only to redraft; their K/V writes land on slots no valid query reads this pass
            M = m if r and not acc[r - 1] else min(L, tpr - a)
            lo = a + (m == 0 and a == 0)   # (r, 0)'s slot is the placeholder / fed slot of row r-1: only if valid
            if lo >= a + M:
                continue
            wins.append((r, a, m, lo, a + M, len(q_slot)))
            for col in range(lo, a + M):
                t = r * tpr + col
                q_slot.append(P + t - 1)
                q_cnt.append(need[r][col])
                if t == 0:
                    q_in.append(-1)                                        # the class token
                elif col == 0 and holder[r]:
                    q_in.append((r - 2) * tpr + need[r][0][r - 2] - 1)   # ZipAR's placeholder input
                else:
                    q_in.append(t - 1)
        x = torch.tensor(q_in, device=dev).clamp(min=0)          # input raster indices: accepted token or draft
        x = torch.where(x % tpr < torch.tensor(acc, device=dev)[x // tpr], tokens[x], drafts[x])
        emb = gpt.embed_tokens(x.expand(N, -1))                                        # (N, Q, C)
        if q_in[0] < 0:
            emb = torch.cat([gpt.embed_classes(cls_ids), emb[:, 1:]], dim=1)
        slots = torch.tensor(q_slot, device=dev)
        vis = Visibility(slots.to(torch.int32), torch.tensor(q_cnt, dtype=torch.int32, device=dev), P, tpr,
                         int(slots.max()) + 1)
        logits = gpt.step(emb, slots, kv, vis, backend)                                # (N, Q, V)
        active = {w_[0] for w_ in wins}
        for r, a, m, lo, hi, q0 in wins:
            t0, t1 = r * tpr + lo, r * tpr + hi
            probs = target_probs(logits[:, q0:q0 + hi - lo], range(t0, t1), settings, use_cfg)   # (hi - lo, V)
            done = ok = 0
            if m:
                done, ok = _test_window(probs[:m], range(t0, t0 + m), tokens, drafts, q_draft, seed, i, neighbours)
            accepted += ok
            tested += done
            _redraft(probs, t0, hi - lo, done, r * tpr + min(a + done + L, tpr), drafts, q_draft, seed, i)
            if r + 1 < h and acc[r + 1] == 0 and r + 1 not in active:   # the row below, not started: drafts
                for k in range(done):                                     # from the p_new above them
                    q_draft[t0 + tpr + k] = probs[k]
                    drafts[t0 + tpr + k] = _sample(probs[k], seed, i, t0 + tpr + k, _BELOW)
            acc[r] += done
        i += 1
    return tokens, i, accepted, tested


def _test_window(probs, targets, tokens, drafts, q_draft, seed, i, neighbours):
    """The speculative test of one window, left to right: probs (m, V) p_new at raster indices `targets` (m). Commits
    accepted drafts and, at the first rejection, the residual resample into tokens. Returns (committed, accepted)."""
    for k, t in enumerate(targets):
        x = int(drafts[t])
        pn, pd = probs[k], q_draft[t]
        p_acc = pn[neighbours[x]].sum() if neighbours is not None else pn[x]
        u = float(torch.exp(-_noise(seed, i, t, _ACCEPT, 1, pn.device)))
        if u * float(pd[x]) <= float(p_acc):
            tokens[t] = x
            continue
        res = (pn - pd).clamp(min=0)
        tokens[t] = _sample(res if float(res.sum()) > 0 else pn, seed, i, t, _RESAMPLE)
        return k + 1, k
    return len(targets), len(targets)


def _redraft(probs, a, m, done, end, drafts, q_draft, seed, i):
    """After testing the window of m queries at raster a.. (done committed): redraft its untested rest from this
    pass's p_new at those positions, and positions a+m .. end-1 (new to the window) from the last query's p_new."""
    for k in range(done, m):
        q_draft[a + k] = probs[k]
        drafts[a + k] = _sample(probs[k], seed, i, a + k, _DRAFT)
    for t in range(a + m, end):
        q_draft[t] = probs[m - 1]
        drafts[t] = _sample(probs[m - 1], seed, i, t, _DRAFT)


def codebook_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, D) codebook embeddings -> (V, k) ids of each entry's k nearest entries (itself first), by L2 distance."""
    d = torch.cdist(codebook.float(), codebook.float())
    d.fill_diagonal_(-1.0)
    return d.topk(min(k, codebook.shape[0]), dim=-1, largest=False).indices
