"""The ONE dispatch point for every op var_rt's models call.

Each op has a torch reference (`backend="torch"`): it is the spec, and every fast path is tested against it.
A fast path is a Triton kernel (`var_rt.kernels.<module>.<fn>`, same signature) or the C++/CUDA extension
(`var_rt._C`). `VAR_RT_BACKEND=torch|triton|cuda` (or the `backend=` argument) forces a path; a fast path that
cannot load falls back to the reference with one warning per op, never silently wrong.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton", "cuda")
# op name -> (kernel module under var_rt.kernels, function name); the Triton fast paths.
TRITON_OPS = {
    "var_attention": ("attention", "var_attention"),
    "adaln": ("adaln", "adaln"),
    "residual_adaln": ("adaln", "residual_adaln"),
    "upsample_bicubic": ("resample", "upsample_bicubic"),
    "downsample_area": ("resample", "downsample_area"),
    "sample_tokens": ("sampling", "sample_tokens"),
    "zipar_attention": ("zipar_attention", "zipar_attention"),
    "group_norm_silu": ("groupnorm", "group_norm_silu"),  # reference: var_rt.runtime.zipar.attention_ref
}
_warned: set = set()
_forced: list = []  # stack of backends forced by `use_backend`


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force a backend for the ops called inside the block (None: keep the default)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def default_backend(device: torch.device | str | None = None) -> str:
    """Backend picked when none is asked for: VAR_RT_BACKEND, else triton on CUDA, else torch."""
    if _forced and _forced[-1] is not None:
        return _forced[-1]
    env = os.environ.get("VAR_RT_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"VAR_RT_BACKEND={env!r}: expected one of {BACKENDS}")
        return env
    dev = torch.device(device) if device is not None else None
    return "triton" if dev is not None and dev.type == "cuda" else "torch"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_fn(op: str, device: torch.device):
    """The Triton implementation of `op` for tensors on `device`, or None (with one warning) if unusable."""
    if device.type != "cuda" and not _interpret():
        _warn_once(f"{op}:cpu", f"var_rt: Triton {op} needs a CUDA device (or TRITON_INTERPRET=1); using the torch reference")
        return None
    mod_name, fn_name = TRITON_OPS[op]
    try:
        mod = importlib.import_module(f"var_rt.kernels.{mod_name}")
        return getattr(mod, fn_name)
    except Exception as e:  # triton missing or kernel module broken
        _warn_once(f"{op}:import", f"var_rt: Triton {op} unavailable ({type(e).__name__}: {e}); using the torch reference")
        return None


def _dispatch(op: str, backend: str | None, device: torch.device):
    backend = backend or default_backend(device)
    if backend == "torch" or op not in TRITON_OPS:
        return None
    return triton_fn(op, device)


# --------------------------------------------------------------------------------------------------------------
# attention over a scale's queries and the KV cache (VAR, attn_l2_norm)
def var_attention_ref(q, k, v, scale_mul, q_scale=None, k_scale=None, out=None):
    """q (N, H, Lq, D); k, v (N, H, Lk, D); scale_mul (H,) fp32 = exp(min(scale_mul_1H11, ln 100)).
    q and k are L2-normalised per head, q times scale_mul, softmax scale 1, fp32 softmax.
    q_scale (Lq,) / k_scale (Lk,) int: when given, query i sees key j iff k_scale[j] <= q_scale[i] (block-causal,
    the refiner's prefill); else every query sees every key. Returns (N, H, Lq, D) in q's dtype."""
    qf = F.normalize(q.float(), dim=-1) * scale_mul.float().view(1, -1, 1, 1)
    kf = F.normalize(k.float(), dim=-1)
    s = qf @ kf.transpose(-1, -2)  # (N, H, Lq, Lk)
    if q_scale is not None:
        visible = k_scale.view(1, -1) <= q_scale.view(-1, 1)
        s = s.masked_fill(~visible, float("-inf"))
    o = (s.softmax(-1) @ v.float()).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def var_attention(q, k, v, scale_mul, q_scale=None, k_scale=None, out=None, backend=None):
    fn = _dispatch("var_attention", backend, q.device)
    return (fn or var_attention_ref)(q, k, v, scale_mul, q_scale, k_scale, out=out)


# --------------------------------------------------------------------------------------------------------------
# AdaLN: LayerNorm without affine, then x (1 + scale) + shift
def adaln_ref(x, scale, shift, eps=1e-6, out=None):
    """x (N, L, C); scale, shift (N, 1, C). LayerNorm statistics in fp32; result in x's dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    y = (y * (1 + scale.float()) + shift.float()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def adaln(x, scale, shift, eps=1e-6, out=None, backend=None):
    fn = _dispatch("adaln", backend, x.device)
    return (fn or adaln_ref)(x, scale, shift, eps, out=out)


def residual_adaln_ref(x, y, gamma, scale, shift, eps=1e-6):
    """The gated residual add then the next AdaLN: x' = x + y * gamma (in x's dtype); returns (x', adaln(x'))."""
    x = (x.float() + y.float() * gamma.float()).to(x.dtype)
    return x, adaln_ref(x, scale, shift, eps)


def residual_adaln(x, y, gamma, scale, shift, eps=1e-6, backend=None):
    fn = _dispatch("residual_adaln", backend, x.device)
    return (fn or residual_adaln_ref)(x, y, gamma, scale, shift, eps)


# --------------------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU) of the VQVAE decoder
def group_norm_silu_ref(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None):
    """x (B, C, H, W); GroupNorm(groups, affine) with fp32 statistics, then SiLU when `silu`; x's dtype."""
    y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    y = (F.silu(y) if silu else y).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None, backend=None):
    fn = _dispatch("group_norm_silu", backend, x.device) if x.is_contiguous() else None
    return (fn or group_norm_silu_ref)(x, weight, bias, groups, eps, silu, out=out)


# --------------------------------------------------------------------------------------------------------------
# resampling of token maps (B, C, h, w); exactly F.interpolate's bicubic (align_corners=False, A=-0.75) and area
def upsample_bicubic_ref(x, size: int, out=None):
    y = F.interpolate(x, size=(size, size), mode="bicubic")
    if out is not None:
        out.copy_(y)
        return out
    return y


def upsample_bicubic(x, size: int, out=None, backend=None):
    fn = _dispatch("upsample_bicubic", backend, x.device)
    return (fn or upsample_bicubic_ref)(x, size, out=out)


def downsample_area_ref(x, size: int, out=None):
    y = F.interpolate(x, size=(size, size), mode="area")
    if out is not None:
        out.copy_(y)
        return out
    return y


def downsample_area(x, size: int, out=None, backend=None):
    fn = _dispatch("downsample_area", backend, x.device)
    return (fn or downsample_area_ref)(x, size, out=out)


# --------------------------------------------------------------------------------------------------------------
# sampling: top-k, top-p, temperature, categorical draw by exponential-noise argmax (no host sync)
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


def exponential_noise(seeds: torch.Tensor, step: int, shape, device) -> torch.Tensor:
    """Exp(1) noise (B, *shape), row b drawn from its own generator seeded by (seeds[b], step) only, so a
    request's tokens do not depend on what else is in the batch."""
    rows = []
    for s in seeds.tolist():
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(int(s), step))
        rows.append(torch.empty(shape, device=device).exponential_(generator=g))
    return torch.stack(rows)


def sample_tokens_ref(logits, seeds, step: int, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0):
    """logits (B, l, V) fp32 (CFG already mixed); seeds (B,) int64 per-request seeds; step picks the noise
    stream. Order as CoDe: top-k, top-p, then / temperature, softmax, draw. Returns (B, l) int64."""
    B, l, V = logits.shape
    x = filter_logits_ref(logits.float(), top_k, top_p) / temperature
    probs = x.softmax(-1)
    noise = exponential_noise(seeds, step, (l, V), logits.device)
    return (probs / noise).argmax(-1)


def sample_tokens(logits, seeds, step: int, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0, backend=None):
    fn = _dispatch("sample_tokens", backend, logits.device)
    return (fn or sample_tokens_ref)(logits, seeds, step, top_k, top_p, temperature)


_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, stream: int) -> int:
    """splitmix64 of (seed, stream) -> a 63-bit seed; used for every per-image / per-step random stream."""
    z = (seed * 0x9E3779B97F4A7C15 + stream + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------------------
# residual-VQ accumulation (the VQVAE side of one VAR scale)
def phi_ticks(n_phi: int):
    import numpy as np
    return np.linspace(1 / 3 / n_phi, 1 - 1 / 3 / n_phi, n_phi) if n_phi == 4 else np.linspace(1 / 2 / n_phi, 1 - 1 / 2 / n_phi, n_phi)


def phi_index(si: int, num_scales: int, n_phi: int) -> int:
    """Which of the shared Phi convs scale si uses: the tick nearest to si / (K - 1)."""
    import numpy as np
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(n_phi) - at)))


def rvq_step_ref(idx, codebook, phi_w, phi_b, f_hat, pn: int, pn_next: int | None, resi: float = 0.5):
    """One scale of residual-VQ accumulation, in place on f_hat (B, Cv, H, H) fp32.
    idx (B, pn*pn) int64; codebook (V, Cv); phi_w (Cv, Cv, 3, 3), phi_b (Cv,).
    h = codebook[idx] as (B, Cv, pn, pn); upsampled bicubic to H unless pn == H; f_hat += (1-resi) h + resi conv(h).
    Returns the next scale's input rows (B, pn_next^2, Cv) = area-downsample(f_hat), or None for the last scale."""
    B, Cv, H, _ = f_hat.shape
    h = codebook[idx].transpose(1, 2).reshape(B, Cv, pn, pn).float()
    if pn != H:
        h = F.interpolate(h, size=(H, H), mode="bicubic")
    f_hat.add_(h * (1 - resi) + F.conv2d(h, phi_w.float(), phi_b.float(), padding=1) * resi)
    if pn_next is None:
        return None
    nxt = f_hat if pn_next == H else F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
    return nxt.reshape(B, Cv, pn_next * pn_next).transpose(1, 2)


def rvq_step(idx, codebook, phi_w, phi_b, f_hat, pn: int, pn_next: int | None, resi: float = 0.5, backend=None):
    backend = backend or default_backend(f_hat.device)
    if backend != "torch":
        from var_rt import _ext
        fn = _ext.rvq_step_fn(f_hat.device)
        if fn is not None:
            return fn(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi)
    return rvq_step_ref(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi)


def describe_backends(device: torch.device | str = "cpu") -> dict:
    """op -> (backend that will run, why); for `var-rt info`."""
    device = torch.device(device)
    chosen = default_backend(device)
    info = {}
    for op in TRITON_OPS:
        if chosen == "torch":
            info[op] = ("torch", "reference (VAR_RT_BACKEND=torch or no CUDA device)")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = triton_fn(op, device)
            info[op] = ("triton", "kernel loaded") if fn else ("torch", "Triton unusable here: reference")
    from var_rt import _ext
    info["rvq_step"] = _ext.describe(device, chosen)
    return info
