"""LlamaGen class-conditional GPT (FoundationVision/LlamaGen `autoregressive/models/gpt.py`), inference only.

Parameter names are the official ones, so `c2i_{B,L,XL,XXL,3B}_{256,384}.pt` load strictly:
    cls_embedding.embedding_table.weight (num_classes + 1, C)   last row = the null class (CFG)
    tok_embeddings.weight (V, C)
    layers.{i}.attention.wqkv.weight ((H + 2 Hkv) D, C), layers.{i}.attention.wo.weight (C, C)
    layers.{i}.feed_forward.w1 / w3 .weight (F, C), w2 .weight (C, F)    SwiGLU: w2(silu(w1 x) * w3 x)
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight (C,)   RMSNorm, eps 1e-5
    norm.weight (C,), output.weight (V, C)
No biases. 2-D RoPE on q and k (precompute_freqs_cis_2d + apply_rotary_emb); the class prefix gets a zero
(cos, sin) table, exactly as the official code, which zeroes its q and k. One `step()` runs any set of queries
(prefill, one sequential token, or one query per active ZipAR row; or, batched SJD, per-row slots) against a
preallocated KV cache.

Every op goes through var_rt.ops (backend torch = the official semantics, the spec; the fast backend = Triton).
A layer of `step()` is 9 launches on the fast path: residual add + attention_norm (the previous layer's FFN
residual folded in), wqkv, RoPE on k + KV write, ZipAR attention (RoPE on q; its output lands in (N, Q, H*D) for
wo; + a combine launch when it splits the keys), wo, residual add + ffn_norm, w1|w3 as one GEMM, SwiGLU, w2; the
last layer's residual is folded into the final `norm`. `fuse_weights_()` (called once by LlamaGenPipeline) makes
w1.weight / w3.weight views of one (2F, C) tensor for that single GEMM; the parameter names stay official.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from var_rt import ops

# Official GPT_* sizes (c2i uses B, L, XL, XXL, 3B); FFN hidden = find_multiple(int(8 C / 3), 256).
GPT_CONFIGS = {
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
    "3B": dict(n_layer=24, n_head=32, dim=3200),
}
HEADS_BY_DIM = {768: 12, 1024: 16, 1280: 20, 1536: 24, 3200: 32, 2048: 32, 2560: 40, 4096: 32}

# Keys the official code may save that sampling does not use: the RoPE table and causal mask (older versions
# registered them) and the KV caches of setup_caches().
IGNORED_KEYS = (r"freqs_cis", r"causal_mask", r"layers\.\d+\.attention\.kv_cache\.[kv]_cache")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class LlamaGenConfig:
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: int | None = None
    vocab_size: int = 16384
    num_classes: int = 1000
    grid: int = 24                 # tokens per side: image_size // 16
    cls_token_num: int = 1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return find_multiple(h, self.multiple_of)

    @property
    def seq_len(self) -> int:      # KV slots: class prefix + grid^2 image tokens
        return self.cls_token_num + self.grid * self.grid


def config_for(name: str, image_size: int = 256, **over) -> LlamaGenConfig:
    key = name.upper().removeprefix("GPT-").removeprefix("LLAMAGEN-")
    if key not in GPT_CONFIGS:
        raise ValueError(f"LlamaGen model {name!r}: expected one of {list(GPT_CONFIGS)}")
    return LlamaGenConfig(**GPT_CONFIGS[key], grid=image_size // 16, **over)


def config_from_state_dict(sd, grid: int | None = None, n_head: int | None = None) -> LlamaGenConfig:
    """Sizes read off an official state dict. Grid: argument, else the saved freqs_cis length; heads: argument,
    else freqs_cis width, else the official size table, else head dim 64."""
    for k in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"):
        if k not in sd:
            raise ValueError(f"not a LlamaGen c2i GPT state dict: no {k!r} (keys: {sorted(sd)[:6]} ...)")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = sum(1 for k in sd if k.startswith("layers.") and k.endswith(".attention.wqkv.weight"))
    fc = sd.get("freqs_cis")
    if n_head is None and fc is not None and fc.dim() == 3:
        n_head = dim // (2 * fc.shape[1])
    n_head = n_head or HEADS_BY_DIM.get(dim) or (dim // 64 if dim % 64 == 0 else None)  # else head dim 64
    if n_head is None:
        raise ValueError(f"cannot tell the head count of a width-{dim} GPT; pass n_head")
    if grid is None and fc is not None:
        g = math.isqrt(fc.shape[0] - 1)
        grid = g if g * g == fc.shape[0] - 1 else None
    if grid is None:
        raise ValueError("the checkpoint does not say its token grid: pass image_size (256 or 384)")
    hd = dim // n_head
    rows = sd["layers.0.attention.wqkv.weight"].shape[0] if n_layer else 3 * dim
    n_kv = (rows - dim) // (2 * hd)
    return LlamaGenConfig(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=None if n_kv == n_head else n_kv,
                          vocab_size=vocab, num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1,
                          grid=grid)


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, prefix: int = 1) -> torch.Tensor:
    """(prefix + grid^2, head_dim/2, 2) fp32 (cos, sin): the first head_dim/4 pairs rotate with the row index,
    the next head_dim/4 with the column; prefix rows are all zero (as the official table)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))   # (D/4,)
    t = torch.arange(grid, dtype=torch.float32)
    f = torch.outer(t, freqs)                                                          # (g, D/4)
    ang = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)], dim=-1)
    tab = torch.stack([ang.cos(), ang.sin()], dim=-1).flatten(0, 1)                   # (g^2, D/2, 2)
    return torch.cat([torch.zeros(prefix, half, 2), tab])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # statistics in fp32, result back in x's dtype, then the weight (official order)
        return ops.rms_norm_ref(x, self.weight, self.eps)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.H, self.Hkv, self.D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = ops.Linear(cfg.dim, (self.H + 2 * self.Hkv) * self.D, bias=False)
        self.wo = ops.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, kv, slots, rope, vis, backend="torch"):
        """x (N, Q, C) normed; kv (2, N, Hkv, L, D) this layer's cache view; slots (Q,) or (N, Q) int64; rope
        (L, D/2, 2); vis: runtime.zipar.Visibility (or ops.RowsVisibility). Returns wo(attention) (N, Q, C)."""
        N, Q, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        qkv = self.wqkv(x)                                                    # (N, Q, (H + 2 Hkv) D)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        o = torch.empty(N, Q, H * D, dtype=qkv.dtype, device=qkv.device)     # wo's input layout, written in place
        # k rotated and k, v written at their slots (no cat); q is rotated inside the attention
        ops.rope_kv_write(k.view(N, Q, Hkv, D), v.view(N, Q, Hkv, D), kv[0], kv[1], slots, rope, backend=backend)
        ops.zipar_attention(q.view(N, Q, H, D).transpose(1, 2), kv[0], kv[1], vis, rope=rope,
                            out=o.view(N, Q, H, D).transpose(1, 2), backend=backend)
        return self.wo(o)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = ops.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = ops.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = ops.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self._fused = None   # (w13, w1.weight, w3.weight) after fuse_weights_()

    @torch.no_grad()
    def fuse_weights_(self):
        """Make w1.weight / w3.weight views of one (2F, C) tensor (rows w1 then w3), for one GEMM on the fast
        path. The names (and state_dict) stay official; the old tensors are released, so no extra memory."""
        if self.fused_weight() is not None:
            return self
        w1, w3 = self.w1.weight, self.w3.weight
        w13 = torch.cat([w1, w3])
        self.w1.weight = nn.Parameter(w13[: w1.shape[0]], requires_grad=w1.requires_grad)
        self.w3.weight = nn.Parameter(w13[w1.shape[0]:], requires_grad=w3.requires_grad)
        self._fused = (w13, self.w1.weight, self.w3.weight)
        return self

    def fused_weight(self):
        """The (2F, C) w1|w3 tensor while w1.weight / w3.weight are still views of it (not after a .to() or a
        parameter swap), else None."""
        if self._fused is None:
            return None
        w13, p1, p3 = self._fused
        if self.w1.weight is not p1 or self.w3.weight is not p3:
            return None
        if {p1.dtype, p3.dtype} != {w13.dtype} or {p1.device, p3.device} != {w13.device}:
            return None
        if w13.device.type != "meta" and (p1.data_ptr() != w13.data_ptr()
                                          or p3.data_ptr() != w13[p1.shape[0]:].data_ptr()):
            return None
        return w13

    def forward(self, x, backend="torch"):
        """w2(silu(w1 x) * w3 x). Called directly (training, tests) it is the official reference; step() passes
        its backend: on the fast one w1 and w3 are one GEMM (when fused) and the gate one SwiGLU kernel."""
        w13 = self.fused_weight() if backend != "torch" else None
        if w13 is not None:
            a, b = ops.linear(x, w13).chunk(2, dim=-1)                          # (N, Q, F) views of (N, Q, 2F)
        else:
            a, b = self.w1(x), self.w3(x)
        return self.w2(ops.swiglu(a, b, backend=backend))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, y, kv, slots, rope, vis, backend="torch"):
        """x (N, Q, C) the residual stream before the previous block's FFN output y (None for the first block) is
        added: that add is fused into attention_norm. Returns (residual stream, this block's FFN output)."""
        x, xn = ops.residual_rms_norm(x, y, self.attention_norm.weight, self.attention_norm.eps, backend=backend)
        x, xn = ops.residual_rms_norm(x, self.attention(xn, kv, slots, rope, vis, backend), self.ffn_norm.weight,
                                      self.ffn_norm.eps, backend=backend)
        return x, self.feed_forward(xn, backend)


class LlamaGenGPT(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        if cfg.dim % cfg.n_head or cfg.head_dim % 4:
            raise ValueError(f"dim {cfg.dim} / {cfg.n_head} heads: head dim must be an integer multiple of 4")
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = ops.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope = {}

    def rope_table(self, device) -> torch.Tensor:
        """(L, D/2, 2) fp32 on `device`, built once per device (not a parameter: models are built on meta)."""
        device = torch.device(device)
        if device not in self._rope:
            c = self.cfg
            self._rope[device] = rope_2d_table(c.grid, c.head_dim, c.rope_base, c.cls_token_num).to(device)
        return self._rope[device]

    def kv_shape(self, batch: int) -> tuple:
        """One layer's cache: (2, N, Hkv, L, D), K rotated, written by slot."""
        c = self.cfg
        return (2, batch, c.kv_heads, c.seq_len, c.head_dim)

    def embed_classes(self, labels):   # (N,) int64 -> (N, 1, C); label num_classes = the null class
        return self.cls_embedding.embedding_table(labels).unsqueeze(1)

    def embed_tokens(self, ids):       # (N, Q) int64 -> (N, Q, C)
        return self.tok_embeddings(ids)

    def fuse_weights_(self) -> "LlamaGenGPT":
        """Once after loading: each FFN's w1 / w3 become views of one fused weight (see FeedForward)."""
        for layer in self.layers:
            layer.feed_forward.fuse_weights_()
        return self

    def step(self, h, slots, kv_layers, vis, backend=None):
        """h (N, Q, C) input embeddings; slots (Q,) int64 KV slots (= positions) of the queries;
        kv_layers: per-layer cache views (2, N, Hkv, L, D); vis: runtime.zipar.Visibility of the queries.
        slots may also be (N, Q), one row of slots per batch row (batched SJD; vis ignored, pass None): causal
        visibility per row (key j <= the query's slot) over the whole cache (static shapes), RoPE and KV write by
        each row's slots, through the same ops (the fast kernels take per-row slots). Returns logits (N, Q, V)
        fp32."""
        rope = self.rope_table(h.device)
        backend = backend or ops.default_backend(h.device)
        if slots.dim() == 2:
            vis = ops.rows_visibility(slots, kv_layers[0].shape[-2], self.cfg.cls_token_num, self.cfg.grid)
        x, y = h, None
        for layer, kv in zip(self.layers, kv_layers):
            x, y = layer(x, y, kv, slots, rope, vis, backend)
        _, xn = ops.residual_rms_norm(x, y, self.norm.weight, self.norm.eps, backend=backend)   # last residual
        return self.output(xn).float()


def build_meta(cfg: LlamaGenConfig) -> LlamaGenGPT:
    with torch.device("meta"):
        return LlamaGenGPT(cfg)


@torch.no_grad()
def init_random_(model: LlamaGenGPT, seed: int = 0, std: float = 0.02) -> LlamaGenGPT:
    """Official init (normal(0, 0.02) for Linear/Embedding, ones for norms) but a random `output` head too
    (the official zero head would make every logit equal)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:  # one generator per tensor on its own device: fast at full size, reproducible per device
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
    return model


def with_grid(cfg: LlamaGenConfig, grid: int) -> LlamaGenConfig:
    return replace(cfg, grid=grid)
