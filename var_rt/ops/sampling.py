"""Sampling: CFG mix, top-k, top-p, temperature, categorical draw by exponential-noise argmax (no host sync), and
the per-request random streams (mix_seed) every draw uses."""
from __future__ import annotations

import torch

from var_rt.ops import dispatch


@dispatch.kernel("sample_tokens")
def _sample_tokens_kernel():
    from var_rt.kernels.sampling import sample_tokens
    return sample_tokens


_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, stream: int) -> int:
    """splitmix64 of (seed, stream) -> a 63-bit seed; used for every per-image / per-step random stream."""
    z = (seed * 0x9E3779B97F4A7C15 + stream + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def exponential_noise(seeds: torch.Tensor, step: int, shape, device) -> torch.Tensor:
    """Exp(1) noise (B, *shape), row b drawn from its own generator seeded by (seeds[b], step) only, so a
    request's tokens do not depend on what else is in the batch."""
    rows = []
    for s in seeds.tolist():
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(int(s), step))
        rows.append(torch.empty(shape, device=device).exponential_(generator=g))
    return torch.stack(rows)


def filter_logits_ref(logits, top_k: int, top_p: float):
    """The official VAR/CoDe filter on (..., V) fp32 logits: keep the top_k largest (0 = all), then drop the
    smallest tokens whose cumulative probability is <= 1 - top_p (the largest always stays; 0 = off)."""
    logits = logits.clone()
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits.masked_fill_(drop.scatter(-1, sorted_idx, drop), float("-inf"))
    return logits


def guide_logits_ref(logits, guidance=None):
    """The CFG mix in fp32: logits (2B, l, V) in any float dtype, conditional rows first; guidance a float t or
    an (l,) fp32 tensor of per-position t -> (1 + t) * cond - t * uncond, (B, l, V) fp32. None: logits.float()."""
    x = logits.float()
    if guidance is None:
        return x
    B = x.shape[0] // 2
    t = guidance.float().view(1, -1, 1) if isinstance(guidance, torch.Tensor) else float(guidance)
    return (1 + t) * x[:B] - t * x[B:]


def sample_tokens_ref(logits, seeds, step, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                      guidance=None):
    """logits (B, l, V) (fp32 / bf16 / fp16, read as fp32), or (2B, l, V) mixed first by guide_logits_ref when
    `guidance` (float t or (l,) tensor) is given; seeds (B,) int64 per-request seeds. step: an int (the noise of
    all l positions is exponential_noise(seeds, step, (l, V))) or an (l,) int tensor (position i draws
    exponential_noise(seeds, steps[i], (V,)): per-position streams, e.g. LlamaGen's raster indices).
    Order as CoDe: top-k, top-p, then / temperature, softmax, draw. Returns (B, l) int64."""
    x = guide_logits_ref(logits, guidance)
    B, l, V = x.shape
    probs = (filter_logits_ref(x, top_k, top_p) / temperature).softmax(-1)
    if isinstance(step, torch.Tensor):
        noise = torch.stack([exponential_noise(seeds, int(t), (V,), x.device) for t in step.reshape(-1).tolist()], 1)
    else:
        noise = exponential_noise(seeds, int(step), (l, V), x.device)
    return (probs / noise.view(B, l, V)).argmax(-1)


def sample_tokens(logits, seeds, step, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                  guidance=None, backend=None):
    """See sample_tokens_ref; the Triton path (var_rt.kernels.sampling) reads the logits once in their own
    dtype, mixes the guidance in-kernel and never syncs with the host (CUDA-graph safe)."""
    fn = dispatch.fast_kernel(_sample_tokens_kernel, backend, logits.device)
    return (fn or sample_tokens_ref)(logits, seeds, step, top_k, top_p, temperature, guidance=guidance)
