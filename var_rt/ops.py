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
    "zipar_attention": ("zipar_attention", "zipar_attention"),   # reference: zipar_attention_ref
    "group_norm_silu": ("groupnorm", "group_norm_silu"),
    "residual_group_norm_silu": ("groupnorm", "residual_group_norm_silu"),
    "rms_norm": ("rmsnorm", "rms_norm"),
    "residual_rms_norm": ("rmsnorm", "residual_rms_norm"),
    "rope_kv_write": ("rope_kv", "rope_kv_write"),
    "swiglu": ("swiglu", "swiglu"),
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
# attention over a scale's queries and the KV cache (VAR, attn_l2_norm), fused with the KV-pool write
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
    fn = _dispatch("var_attention", backend, qkv.device)
    return (fn or var_attention_ref)(qkv, kv, start, scale_mul, q_scale, k_scale, out=out)


# --------------------------------------------------------------------------------------------------------------
# the FFN's first GEMM with its tanh-GELU
def linear_gelu_ref(x, weight, bias):
    """x (..., C) -> gelu_tanh(x @ weight.T + bias), (..., hidden) in x's dtype."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gelu(x, weight, bias, backend=None):
    """On CUDA the fast path is one cuBLASLt GEMM with a bias + tanh-GELU epilogue (torch._addmm_activation; its
    CPU kernel uses the erf GELU, so the CPU keeps the reference). `meta` counts as CUDA for the cost model."""
    backend = backend or default_backend(x.device)
    if backend == "torch" or x.device.type not in ("cuda", "meta") or not x.is_contiguous():
        return linear_gelu_ref(x, weight, bias)
    y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], weight.shape[0])


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
    """x (B, C, H, W) (any layout); GroupNorm(groups, affine) with fp32 statistics, then SiLU when `silu`;
    x's dtype."""
    y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    y = (F.silu(y) if silu else y).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _gn_dense(x) -> bool:
    """The layouts the GroupNorm kernels read: contiguous NCHW or channels_last (NHWC)."""
    return x.dim() == 4 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, out=None, backend=None):
    """The kernel keeps x's layout (NCHW or channels_last); other strides take the reference."""
    fn = _dispatch("group_norm_silu", backend, x.device) if _gn_dense(x) else None
    return (fn or group_norm_silu_ref)(x, weight, bias, groups, eps, silu, out=out)


def residual_group_norm_silu_ref(x, r, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True):
    """The VQ decoders' residual add then the next GroupNorm(+SiLU): s = x + r (x's dtype); returns
    (s, group_norm_silu(s)). s is the block output the next block also keeps as its skip input."""
    s = x + r
    return s, group_norm_silu_ref(s, weight, bias, groups, eps, silu)


def residual_group_norm_silu(x, r, weight, bias, groups: int, eps: float = 1e-6, silu: bool = True, backend=None):
    ok = _gn_dense(x) and r.shape == x.shape and r.stride() == x.stride() and r.dtype == x.dtype
    fn = _dispatch("residual_group_norm_silu", backend, x.device) if ok else None
    return (fn or residual_group_norm_silu_ref)(x, r, weight, bias, groups, eps, silu)


def decoder_channels_last(device, backend=None) -> bool:
    """Whether the VQ decoders run channels_last (NHWC, cuDNN's fast conv layout) with the fused GroupNorm
    kernels: exactly where group_norm_silu takes its Triton kernel. The torch backend stays the NCHW reference."""
    return _dispatch("group_norm_silu", backend, torch.device(device)) is not None


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
    fn = _dispatch("sample_tokens", backend, logits.device)
    return (fn or sample_tokens_ref)(logits, seeds, step, top_k, top_p, temperature, guidance=guidance)


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


# --------------------------------------------------------------------------------------------------------------
# LlamaGen layer: RMSNorm (+ the residual add before it), 2-D RoPE + KV-cache write, ZipAR attention, SwiGLU.
# Per layer on the fast path: residual_rms_norm, wqkv, rope_kv_write, zipar_attention (+ a combine when split),
# wo, residual_rms_norm, w1|w3, swiglu, w2 -- 9 launches (10 when the attention splits its keys).
def rms_norm_ref(x, weight, eps: float = 1e-5):
    """The official RMSNorm: statistics in fp32, the normalised value cast to x's dtype, THEN times weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rms_norm(x, weight, eps: float = 1e-5, backend=None):
    fn = _dispatch("rms_norm", backend, x.device)
    return (fn or rms_norm_ref)(x, weight, eps)


def residual_rms_norm_ref(x, y, weight, eps: float = 1e-5):
    """x, y (..., C): the residual add, then the next RMSNorm: returns (x + y, rms_norm(x + y)); y None: (x,
    rms_norm(x)). The sum is in x's dtype (what the residual stream stores)."""
    if y is not None:
        x = x + y
    return x, rms_norm_ref(x, weight, eps)


def residual_rms_norm(x, y, weight, eps: float = 1e-5, backend=None):
    fn = _dispatch("residual_rms_norm", backend, x.device)
    return (fn or residual_rms_norm_ref)(x, y, weight, eps)


def apply_rope(x, table):
    """x (N, Q, H, D); table (Q, D/2, 2) (cos, sin) per interleaved pair: the official apply_rotary_emb.
    Rotated in fp32, returned in x's dtype."""
    N, Q, H, D = x.shape
    xs = x.float().reshape(N, Q, H, D // 2, 2)
    cos, sin = table[..., 0].view(1, Q, 1, D // 2), table[..., 1].view(1, Q, 1, D // 2)
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).to(x.dtype)


def rope_kv_write_ref(k, v, k_cache, v_cache, slots, rope):
    """k, v (N, Q, Hkv, D) this pass's new keys and values (views of the wqkv output); k_cache, v_cache
    (N, Hkv, L, D); slots (Q,) int; rope (L, D/2, 2) fp32. Writes k rotated by rope[slots] and v at their slots."""
    slots = slots.long()
    k_cache.index_copy_(2, slots, apply_rope(k, rope[slots]).transpose(1, 2))
    v_cache.index_copy_(2, slots, v.transpose(1, 2))


def rope_kv_write(k, v, k_cache, v_cache, slots, rope, backend=None):
    fn = _dispatch("rope_kv_write", backend, k.device)
    (fn or rope_kv_write_ref)(k, v, k_cache, v_cache, slots, rope)


def zipar_visibility_mask(q_slot, counts, prefix: int, tpr: int, n_keys: int):
    """(Q, n_keys) bool, the ZipAR visibility rule (var_rt.runtime.zipar): query at slot p sees key j iff
    (j <= p and (j < prefix or col(j) < counts[row(j)])) or j == p, with row, col = divmod(j - prefix, tpr)."""
    j = torch.arange(n_keys, device=q_slot.device)
    img = (j - prefix).clamp(min=0)
    row = (img // tpr).clamp(max=counts.numel() - 1)
    drawn = (j < prefix) | ((img % tpr) < counts.long()[row])
    p = q_slot.long().view(-1, 1)
    return ((j <= p) & drawn) | (j == p)


def zipar_attention_ref(q, k_cache, v_cache, vis, rope=None, out=None):
    """q (N, H, Q, D) (not yet rotated when `rope` (L, D/2, 2) is given: rotated here by its slot);
    k_cache, v_cache (N, Hkv, L, D) with K already rotated; vis: a runtime.zipar.Visibility (q_slot, counts,
    prefix, tpr, n_keys). Softmax scale 1/sqrt(D), fp32; (N, H, Q, D) in q's dtype (copied into `out`, which may be
    a strided view, e.g. of an (N, Q, H*D) buffer)."""
    N, H, Q, D = q.shape
    L = vis.n_keys
    qf = q.float()
    if rope is not None:
        qf = apply_rope(qf.transpose(1, 2), rope[vis.q_slot.long()]).transpose(1, 2)
    rep = H // k_cache.shape[1]
    k = k_cache[:, :, :L].float().repeat_interleave(rep, dim=1)
    v = v_cache[:, :, :L].float().repeat_interleave(rep, dim=1)
    s = (qf @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))           # (N, H, Q, L)
    s = s.masked_fill(~zipar_visibility_mask(vis.q_slot, vis.counts, vis.prefix, vis.tpr, L), float("-inf"))
    o = (s.softmax(-1) @ v).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def zipar_attention(q, k_cache, v_cache, vis, rope=None, out=None, backend=None, num_splits=None):
    """The Triton kernel (var_rt.kernels.zipar_attention) or the reference. num_splits forces the kernel's
    flash-decoding key split (1 = none; default from the shapes)."""
    fn = _dispatch("zipar_attention", backend, q.device)
    if fn is None:
        return zipar_attention_ref(q, k_cache, v_cache, vis, rope=rope, out=out)
    return fn(q, k_cache, v_cache, vis.q_slot, vis.counts, vis.prefix, vis.tpr, rope=rope, out=out,
              n_keys=vis.n_keys, num_splits=num_splits)


def swiglu_ref(a, b):
    """The SwiGLU gate silu(a) * b (a = w1 x, b = w3 x, official rounding: silu in a's dtype, then the product)."""
    return F.silu(a) * b


def swiglu(a, b, backend=None):
    fn = _dispatch("swiglu", backend, a.device)
    return (fn or swiglu_ref)(a, b)
