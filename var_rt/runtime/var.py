"""The VAR engine: runs a VAR schedule: step inputs -> model step -> CFG mix -> sampler -> residual-VQ update.

One engine for plain VAR and CoDe: a phase either continues scale by scale with the KV cache, or (CoDe's
refiner) first prefills the inputs of scales 0..N in one block-causal pass and samples scale N from its tail.
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


def run_var(models: dict, vae, schedule: list[Phase], labels: torch.Tensor, seeds: torch.Tensor,
            params: SamplingSettings, pool: KVPool, progress=None):
    """labels, seeds (B,) int64 on the models' device; params: one value per scale (SamplingSettings.build with
    steps = K); progress: a tqdm bar or None. Returns f_hat (B, Cvae, H, H) fp32 and the sampled token ids of
    every scale [(B, pn^2)]. No host sync on the fast backend: a whole call is captured as one CUDA graph."""
    cfg0 = next(iter(models.values())).cfg
    pns, K = cfg0.patch_nums, len(cfg0.patch_nums)
    bounds = cfg0.scale_bounds()
    B = labels.numel()
    device = labels.device
    labels2 = torch.cat((labels, torch.full_like(labels, cfg0.num_classes)))  # conditional rows first
    f_hat = torch.zeros(B, vae.cfg.cvae, pns[-1], pns[-1], device=device, dtype=torch.float32)
    codebook = vae.quantize.embedding.weight
    rows: list = [None] * K  # rows[s]: input of scale s, (B, pn_s^2, Cvae)
    tokens: list = [None] * K

    def sample(model, state, s, hidden):
        logits = model.logits(hidden)  # (2B, l, V) in the model's dtype, conditional rows first
        t = params.cfg * s / (K - 1)  # the sampler mixes (1 + t) * cond - t * uncond in fp32 as it reads them
        top_k, top_p, temperature = params.at(s)  # temperature as drawn: max(temperature, 1e-5)
        idx = ops.sample_tokens(logits, seeds, s, top_k, top_p, temperature, guidance=t)  # (B, pn^2)
        tokens[s] = idx
        phi = vae.phi(s, K)
        rows_next = ops.rvq_step(idx, codebook, phi.weight, phi.bias, f_hat, pns[s], pns[s + 1] if s + 1 < K else None)
        if s + 1 < K:
            rows[s + 1] = rows_next
        if progress is not None:
            progress.update(1)

    for phase in schedule:
        model, kv = models[phase.model], pool.views[phase.model]
        state = model.prepare(labels2)
        todo = list(phase.scales)
        if phase.prefill:  # CoDe refiner: one block-causal pass over scales 0..N fills its KV cache
            x = torch.cat([model.scale_input(s, state, rows[s]) for s in phase.prefill], dim=1)
            ids = torch.cat([torch.full((pns[s] ** 2,), s, dtype=torch.int32, device=device) for s in phase.prefill])
            hidden = model.forward_tokens(x, state, kv, 0, ids, ids)
            s = todo.pop(0)
            sample(model, state, s, hidden[:, bounds[s][0]:bounds[s][1]])
        for s in todo:
            hidden = model.forward_tokens(model.scale_input(s, state, rows[s]), state, kv, bounds[s][0])
            sample(model, state, s, hidden)
    return f_hat, tokens
