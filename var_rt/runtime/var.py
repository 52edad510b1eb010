"""The VAR engine: runs a VAR schedule: step inputs -> model step -> CFG mix -> sampler -> residual-VQ update.

One engine for plain VAR and CoDe: a phase either continues scale by scale with the KV cache, or (CoDe's
refiner) first prefills the inputs of scales 0..N in one block-causal pass and samples scale N from its tail.

Guidance skipping (SamplingSettings.cfg_skip_last = M): the last M scales run the B conditional rows alone
(labels, not the CFG pair; the first B rows of each layer's KV view) and draw from the conditional logits with no
mix (guidance t = 0 instead of cfg * k / (K - 1)). The skipped scales are a suffix, so the unconditional rows'
cache is never read again. CoDe's refiner prefill (scales 0..N, samples N) runs B rows when N is skipped (then so
are all the refiner's later scales), else 2B.
"""
from __future__ import annotations

import torch

from var_rt import ops
from var_rt.runtime.kv_pool import KVPool
from var_rt.runtime.schedule import Phase
from var_rt.runtime.settings import SamplingSettings

# The CoDe paper's evaluation settings (czg1225/CoDe sample_CoDe.py / infer_CoDe.py).
PRESETS = {
    "code-eval": dict(cfg=1.5, top_k=600, top_p=0.96, temperature=[1.1] * 7 + [1.0] * 3),
    "var-demo": dict(cfg=4.0, top_k=900, top_p=0.95, temperature=1.0),
}


def new_state(models: dict, vae, batch: int, device) -> dict:
    """What a generation carries from scale to scale: f_hat (B, Cvae, H, H) fp32 (the residual-VQ sum so far),
    rows[s] (the input of scale s, (B, pn_s^2, Cvae), None until known) and tokens[s] ((B, pn_s^2) int64 ids)."""
    cfg0 = next(iter(models.values())).cfg
    pns, K = cfg0.patch_nums, len(cfg0.patch_nums)
    return {"f_hat": torch.zeros(batch, vae.cfg.cvae, pns[-1], pns[-1], device=device, dtype=torch.float32),
            "rows": [None] * K, "tokens": [None] * K}


def run_var(models: dict, vae, schedule: list[Phase], labels: torch.Tensor, seeds: torch.Tensor,
            params: SamplingSettings, pool: KVPool, progress=None, *, scales=None, state: dict | None = None,
            forced=None):
    """labels, seeds (B,) int64 on the models' device; params: one value per scale (SamplingSettings.build with
    steps = K); progress: a tqdm bar or None. Returns f_hat (B, Cvae, H, H) fp32 and the sampled token ids of
    every scale [(B, pn^2)]. No host sync on the fast backend: a whole call is captured as one CUDA graph.

    scales: the scales this call runs, a contiguous range (default: all K), continuing `state` (new_state, or the
    dict an earlier call for the scales before them filled; updated in place). Running 0..K-1 in pieces is the
    same computation as in one call (streaming previews). forced: None, or per scale s a pair (tokens (B, pn_s^2)
    int64, keep (B, pn_s^2) bool): where keep is True the token is teacher-forced instead of the drawn one (VAR's
    zero-shot editing: the encoder's tokens outside the mask); the draw itself is unchanged.
    params.cfg_skip_last = M > 0: scales K-M..K-1 run B rows and draw without guidance (module docstring)."""
    cfg0 = next(iter(models.values())).cfg
    pns, K = cfg0.patch_nums, len(cfg0.patch_nums)
    bounds = cfg0.scale_bounds()
    B = labels.numel()
    device = labels.device
    todo_scales = range(K) if scales is None else range(min(scales), max(scales) + 1)
    if scales is not None and (list(scales) != list(todo_scales) or todo_scales.start < 0 or todo_scales.stop > K):
        raise ValueError(f"scales={list(scales)}: expected a contiguous range within 0..{K - 1}")
    if state is None:
        if todo_scales.start != 0:
            raise ValueError("scales after the first need the state of the call that ran the ones before them")
        state = new_state(models, vae, B, device)
    labels2 = torch.cat((labels, torch.full_like(labels, cfg0.num_classes)))  # conditional rows first
    f_hat, rows, tokens = state["f_hat"], state["rows"], state["tokens"]
    codebook = vae.quantize.embedding.weight

    def model_rows(name: str, pair: bool, cache: dict):
        """(model state, per-layer KV views) of the CFG pair (2B rows), or of the conditional rows alone (B: the
        first B rows of each layer's (2, 2B, H, Lmax, D) pool view, a strided view; the state cut from the pair's
        when the phase made it, with no launches, else prepared from labels); made once per phase."""
        if pair not in cache:
            model, kv = models[name], pool.views[name]
            if pair:
                cache[pair] = (model.prepare(labels2), kv)
            else:
                st = model.cond_rows(cache[True][0], B) if True in cache else model.prepare(labels)
                cache[pair] = (st, [v[:, :B] for v in kv])
        return cache[pair]

    def sample(model, state, s, hidden):
        logits = model.logits(hidden)  # (2B, l, V) in the model's dtype, conditional rows first; (B, l, V) skipped
        # the sampler mixes (1 + t) * cond - t * uncond in fp32 as it reads them; skipped scales: cond alone
        t = params.cfg * s / (K - 1) if params.guided(s) else None
        top_k, top_p, temperature = params.at(s)  # temperature as drawn: max(temperature, 1e-5)
        idx = ops.sample_tokens(logits, seeds, s, top_k, top_p, temperature, guidance=t)  # (B, pn^2)
        if forced is not None and forced[s] is not None:
            idx = torch.where(forced[s][1], forced[s][0], idx)
        tokens[s] = idx
        phi = vae.phi(s, K)
        rows_next = ops.rvq_step(idx, codebook, phi.weight, phi.bias, f_hat, pns[s], pns[s + 1] if s + 1 < K else None)
        if s + 1 < K:
            rows[s + 1] = rows_next
        if progress is not None:
            progress.update(1)

    for phase in schedule:
        todo = [s for s in phase.scales if s in todo_scales]
        if not todo:
            continue
        model, prepared = models[phase.model], {}
        if phase.prefill and todo[0] == phase.scales[0]:
            # CoDe refiner: one block-causal pass over scales 0..N fills its KV cache and samples scale N (B rows
            # when N is skipped: so are the refiner's later scales, which then never read the unconditional rows)
            mstate, kv = model_rows(phase.model, params.guided(todo[0]), prepared)
            x = torch.cat([model.scale_input(s, mstate, rows[s]) for s in phase.prefill], dim=1)
            ids = torch.cat([torch.full((pns[s] ** 2,), s, dtype=torch.int32, device=device) for s in phase.prefill])
            hidden = model.forward_tokens(x, mstate, kv, 0, ids, ids)
            s = todo.pop(0)
            sample(model, mstate, s, hidden[:, bounds[s][0]:bounds[s][1]])
        for s in todo:
            mstate, kv = model_rows(phase.model, params.guided(s), prepared)
            hidden = model.forward_tokens(model.scale_input(s, mstate, rows[s]), mstate, kv, bounds[s][0])
            sample(model, mstate, s, hidden)
    return f_hat, tokens
