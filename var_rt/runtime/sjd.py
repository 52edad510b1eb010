"""Speculative Jacobi Decoding (SJD; Teng et al., ICLR 2025) for LlamaGen c2i, sequential raster order.

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
pass's shape and slots per image dynamic; no CUDA graphs), on the pipeline's backend (Triton attention included).

relaxed (off by default, 0): GSD-style relaxed acceptance, an approximation that changes the distribution: a
draft x is also accepted when p_new puts enough mass on its k nearest codebook neighbours (`neighbours`: (V, k)
token ids from the VQ codebook embeddings): the test uses p_new(cluster(x)) in place of p_new(x).
"""
from __future__ import annotations

import torch

from var_rt import ops
from var_rt.runtime.llamagen import cfg_on, filter_logits
from var_rt.runtime.zipar import Visibility

_STREAM = 0x5D1  # SJD noise streams: mix_seed(mix_seed(mix_seed(seed, _STREAM + pass), raster index), purpose)
_ACCEPT, _RESAMPLE, _DRAFT, _INIT = 1, 2, 3, 4   # each (pass, position, purpose) keys one draw


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
        done = m
        for k in range(m):
            t, x = a + k, int(drafts[a + k])
            pn, pd = probs[k], q_draft[t]
            p_acc = pn[neighbours[x]].sum() if neighbours is not None else pn[x]
            u = float(torch.exp(-_noise(seed, i, t, _ACCEPT, 1, dev)))
            tested += 1
            if u * float(pd[x]) <= float(p_acc):
                tokens[t] = x
                accepted += 1
                continue
            res = (pn - pd).clamp(min=0)
            tokens[t] = _sample(res if float(res.sum()) > 0 else pn, seed, i, t, _RESAMPLE)
            done = k + 1
            break
        for k in range(done, m):                    # redraft the rest of the window from this pass's p_new
            q_draft[a + k] = probs[k]
            drafts[a + k] = _sample(probs[k], seed, i, a + k, _DRAFT)
        for t in range(a + m, min(a + done + L, n)):  # positions new to the window: the last query's p_new
            q_draft[t] = probs[m - 1]
            drafts[t] = _sample(probs[m - 1], seed, i, t, _DRAFT)
        a += done
        i += 1
    return tokens, i, accepted, tested


def codebook_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, D) codebook embeddings -> (V, k) ids of each entry's k nearest entries (itself first), by L2 distance."""
    d = torch.cdist(codebook.float(), codebook.float())
    d.fill_diagonal_(-1.0)
    return d.topk(min(k, codebook.shape[0]), dim=-1, largest=False).indices
