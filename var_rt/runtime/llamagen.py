"""The LlamaGen engine: the pass plan (built from runtime/zipar.py's pure schedule), prefill, one decode pass (one
forward + the draw), the whole generation, and the draw. Free functions over (gpt, kv, plan), as gpt-fast does.

Sampling follows the official `autoregressive/models/generate.py`: CFG when cfg > 1 with the null class (batch
N = 2B, conditional rows first; logits = uncond + (cond - uncond) * cfg), cfg_interval (token t >= 1 drops CFG once
t - 1 > cfg_interval; the first token always uses it), then logits / max(temperature, 1e-5), top-k, top-p
(HF top_k_top_p_filtering), softmax, draw. The draw is the exponential-noise argmax with noise
ops.exponential_noise(seeds, t, ...) where t is the raster index of the drawn token, so any schedule (sequential,
ZipAR with any window) draws the same noise for the same token; w = tokens per row reproduces sequential decoding.
On the fast backend with top_p = 1 the draw is ops.sample_tokens, one launch per pass (Triton: CFG mixed in-kernel
as (1 + t) cond - t uncond with t = cfg - 1, or 0 past cfg_interval; Philox noise keyed by the same seed and each
query's raster index): the same distribution and the same sequential == ZipAR(w = row) identity, other bits than
the torch generator stream. Its filter order (top-k, then / temperature) equals the official one when top-p is off
(top-k commutes with the temperature). With top-p < 1, or on the torch backend, the official-order torch draw.
The official ZipAR code counts cfg_interval in tokens drawn since its first row; we count by raster index so
sequential and ZipAR agree.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from var_rt import ops
from var_rt.runtime import zipar
from var_rt.runtime.settings import SamplingSettings


# ---- the plan: one entry per forward pass, device tensors built once per (window, device) -------------------------
class PassPlan(NamedTuple):
    """One forward pass, as device tensors built once per (window, device)."""
    prefill: bool
    slots: torch.Tensor       # (Q,) int64
    inputs: torch.Tensor      # (Q,) int64 raster index of each query's input token
    vis: zipar.Visibility
    sample_q: torch.Tensor    # (S,) int64 queries whose logits are drawn from
    targets: torch.Tensor     # (S,) int64 raster index each of them draws
    steps: tuple              # the same targets on the host (noise streams, cfg_interval)


def build_plan(passes, prefix: int, tpr: int, device, official: bool = False) -> list:
    """zipar.Pass list (the pure schedule) -> [PassPlan] on `device`. official: zipar_mask="official"
    visibility (every slot <= the query's; runtime.zipar)."""
    plan = []
    for p in passes:
        qs = p.queries
        prefill = all(q.token < 0 for q in qs)
        if not prefill and any(q.token < 0 for q in qs):
            raise ValueError("a pass mixes the class prefix with image tokens")
        slots = torch.tensor([q.slot for q in qs], dtype=torch.int64)
        sq = [i for i, q in enumerate(qs) if q.target >= 0]
        steps = tuple(qs[i].target for i in sq)
        vis = zipar.Visibility(slots.to(device=device, dtype=torch.int32),
                               torch.tensor(p.counts, dtype=torch.int32, device=device),
                               prefix=prefix, tpr=tpr, n_keys=int(slots.max()) + 1,
                               official=official)
        plan.append(PassPlan(prefill, slots.to(device), torch.tensor([max(q.token, 0) for q in qs], device=device),
                             vis, torch.tensor(sq, device=device), torch.tensor(steps, device=device), steps))
    return plan


def plan_for(cfg, zipar_window, device, zipar_mask: str = "exact") -> list:
    """The passes of sequential decoding (zipar_window None) or ZipAR with window w, for a LlamaGenConfig, with the
    "exact" (default) or "official" visibility (runtime.zipar)."""
    zipar.check_mask(zipar_mask)
    h, P = cfg.grid, cfg.cls_token_num
    if zipar_window is not None:
        zipar.check_window(zipar_window, h)
    passes = zipar.sequential_schedule(h, h, P) if zipar_window is None else zipar.zipar_schedule(h, h, zipar_window, P)
    return build_plan(passes, P, h, device, official=zipar_mask == "official")


def cfg_on(step: int, cfg_interval: int) -> bool:
    """Whether the token at raster index `step` gets CFG (official cfg_interval; -1 = always)."""
    return not (cfg_interval > -1 and step - 1 > cfg_interval)


def guidance_tensors(plan: list, cfg: float, cfg_interval: int, device) -> list:
    """Per pass: the fast draw's per-query guidance t, (S,) fp32: cfg - 1 where CFG applies, 0 once cfg_interval
    turns it off ((1 + 0) cond - 0 uncond = cond). A tensor even when all are on, so a token's mix does not depend
    on its pass (sequential == ZipAR(w = row) stays exact). Captured CUDA graphs read them at every replay: the
    caller keeps them alive (LlamaGenPipeline.guidance caches them)."""
    return [torch.tensor([cfg - 1.0 if cfg_on(t, cfg_interval) else 0.0 for t in p.steps], dtype=torch.float32,
                         device=device) for p in plan]


def cfg_masks(plan: list, cfg_interval: int, device) -> list:
    """Per pass, for the torch draw: a (1, S, 1) bool mask of the queries that still get CFG, None when all do."""
    out = []
    for p in plan:
        on = [cfg_on(t, cfg_interval) for t in p.steps]
        out.append(None if all(on) else torch.tensor(on, device=device).view(1, -1, 1))
    return out


# ---- the draw -------------------------------------------------------------------------------------------------------
def filter_logits(logits, top_k: int, top_p: float):
    """The official top_k_top_p_filtering on (..., V) logits: keep the top_k largest (0 = off, clamped to
    [1, V]); then, sorted descending, drop tokens once the cumulative probability exceeds top_p, always
    keeping the first. Returns a new tensor."""
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(max(top_k, 1), V), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], dim=-1)   # shift right: keep first over
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw_tokens(logits, seeds, steps, top_k: int, top_p: float, temperature: float):
    """The torch draw. logits (B, S, V) fp32 (CFG mixed); seeds (B,) int64; steps: S raster indices (noise streams).
    Official order: / max(temperature, 1e-5), filter, softmax; then argmax(probs / Exp(1) noise). Returns (B, S)
    int64."""
    B, S, V = logits.shape
    probs = filter_logits(logits / max(temperature, 1e-5), top_k, top_p).softmax(-1)
    noise = torch.stack([ops.exponential_noise(seeds, int(t), (V,), logits.device) for t in steps], dim=1)
    return (probs / noise).argmax(-1)


class Sampler(NamedTuple):
    """How one generation draws, fixed for the call (built by `sampler`)."""
    settings: SamplingSettings
    use_cfg: bool        # cfg > 1: N = 2B rows, conditional first
    fast: bool           # ops.sample_tokens, one launch per pass, CFG mixed in-kernel (no host sync)
    backend: str
    masks: list          # per pass, torch draw: (1, S, 1) bool or None (CFG on for all its queries)
    guides: list         # per pass, fast draw with CFG: (S,) fp32 guidance t; else None


def sampler(plan: list, settings: SamplingSettings, backend: str, device, guides=None) -> Sampler:
    """The draw of a call: fast (ops.sample_tokens) on the fast backend when top-p is off, else the torch draw.
    guides: the guidance_tensors of this plan and settings, or a callable returning them (called only when the
    fast draw with CFG needs them; a caller that captures CUDA graphs passes its cached copy); None: built here."""
    use_cfg = settings.cfg > 1.0
    fast = backend != "torch" and settings.top_p[0] >= 1.0
    masks = cfg_masks(plan, settings.cfg_interval, device) if use_cfg and not fast else [None] * len(plan)
    if use_cfg and fast:
        guides = guides() if callable(guides) else guides
        if guides is None:
            guides = guidance_tensors(plan, settings.cfg, settings.cfg_interval, device)
    else:
        guides = [None] * len(plan)
    return Sampler(settings, use_cfg, fast, backend, masks, guides)


def draw(logits, seeds, p: PassPlan, i: int, s: Sampler):
    """logits (N, S, V) fp32 of pass i (p) -> (B, S) int64 tokens; seeds (B,) int64 on the device."""
    top_k, top_p, temperature = s.settings.at(0)
    if s.fast:  # one launch, CFG mixed in-kernel; each query's noise stream is its raster index (p.targets)
        return ops.sample_tokens(logits, seeds, p.targets, top_k, 0.0, temperature, guidance=s.guides[i],
                                 backend=s.backend)
    if s.use_cfg:
        B = seeds.numel()
        cond, uncond = logits[:B], logits[B:]                                      # (B, S, V) each
        mixed = uncond + (cond - uncond) * s.settings.cfg
        logits = mixed if s.masks[i] is None else torch.where(s.masks[i], mixed, cond)
    return draw_tokens(logits, seeds, p.steps, top_k, top_p, temperature)


# ---- decoding -------------------------------------------------------------------------------------------------------
def prefill(gpt, cls_ids, p: PassPlan, i: int, kv: list, seeds, s: Sampler):
    """The class-prefix pass: cls_ids (N,) (null class in the unconditional rows) -> (B, S) first token(s)."""
    h = gpt.embed_classes(cls_ids)                                                  # (N, 1, C)
    logits = gpt.step(h, p.slots, kv, p.vis, s.backend)[:, p.sample_q]             # (N, S, V) fp32
    return draw(logits, seeds, p, i, s)


def decode_pass(gpt, tokens, p: PassPlan, i: int, kv: list, seeds, s: Sampler):
    """One image-token pass: every query reads its input token from tokens (B, h*w), one forward, the draw.
    Returns (B, S) the tokens drawn at p.targets."""
    x = tokens[:, p.inputs]                                                         # (B, Q)
    h = gpt.embed_tokens(torch.cat([x, x]) if s.use_cfg else x)                     # (N, Q, C)
    logits = gpt.step(h, p.slots, kv, p.vis, s.backend)[:, p.sample_q]             # (N, S, V) fp32
    return draw(logits, seeds, p, i, s)


def iter_passes(gpt, plan: list, labels, seeds, kv: list, s: Sampler):
    """The generation one pass at a time: labels, seeds (B,) int64 on the device; kv: per-layer views
    (2, N, Hkv, L, D). Yields (pass index, tokens (B, h*w) int64 in raster order, the tokens drawn so far; the same
    tensor every time, filled in place, undrawn tokens 0) after each pass. Streaming previews read it between
    passes; decode_passes runs it through."""
    c = gpt.cfg
    cls_ids = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if s.use_cfg else labels   # (N,)
    tokens = torch.zeros(labels.numel(), c.grid * c.grid, dtype=torch.int64, device=labels.device)
    if plan[0].vis.official:   # the official visibility sees undecoded slots: they must hold zeros, as the official
        for layer in kv:       # freshly allocated cache does (the pool is reused across calls); inside the graph
            layer.zero_()
    for i, p in enumerate(plan):
        if p.prefill:
            drawn = prefill(gpt, cls_ids, p, i, kv, seeds, s)
        else:
            drawn = decode_pass(gpt, tokens, p, i, kv, seeds, s)
        tokens[:, p.targets] = drawn
        yield i, tokens


def decode_passes(gpt, plan: list, labels, seeds, kv: list, s: Sampler, progress=None):
    """The whole generation: labels, seeds (B,) int64 on the device -> tokens (B, h*w) int64 in raster order.
    kv: per-layer views (2, N, Hkv, L, D). With the fast draw nothing syncs with the host: capturable as one CUDA
    graph (static shapes; plan and guidance tensors outlive the capture). progress: a tqdm bar or None."""
    for _, tokens in iter_passes(gpt, plan, labels, seeds, kv, s):
        if progress is not None:
            progress.update(1)
    return tokens
