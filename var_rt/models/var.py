"""VAR transformer (next-scale prediction) with the official parameter names; one `forward_tokens` per scale.

Semantics follow FoundationVision/VAR `models/var.py` + `basic_var.py` (see DESIGN.md): AdaLN blocks, attention
with q/k L2-normalisation and a per-head learned scale, CFG as 2B rows (conditional first). The model holds no
loops over scales and no KV cache of its own: the engine passes views of the runtime's KV pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from var_rt import ops

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
MAX_SCALE_MUL = math.log(100)
# keys the official checkpoints save that sampling does not use
IGNORED_KEYS = (r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias")


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    width: int = 1024
    heads: int = 16
    vocab: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    patch_nums: tuple = PATCH_NUMS_256
    shared_aln: bool = False
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @classmethod
    def official(cls, depth: int, **kw) -> "VARConfig":
        """Official sizes: width 64 d, d heads; d36 is the 512 px model with shared AdaLN."""
        if depth == 36:
            kw.setdefault("patch_nums", PATCH_NUMS_512)
            kw.setdefault("shared_aln", True)
        return cls(depth=depth, width=64 * depth, heads=depth, **kw)

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def scale_bounds(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale's tokens in the full sequence."""
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out


class Attention(nn.Module):
    def __init__(self, C: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, C // heads
        self.mat_qkv = ops.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = ops.Linear(C, C)

    def constants(self):
        """(qkv bias, per-head scale): the official q bias / zero k bias / v bias, and exp(min(scale_mul, ln 100))
        (H,) fp32. Weight-only: computed once and kept while the parameters are unchanged (same tensors, same
        version counters), so a generation (and its CUDA graph) does not recompute them; never kept under
        autograd (training reads fresh ones)."""
        params = (self.q_bias, self.v_bias, self.scale_mul_1H11)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = self.__dict__.get("_consts")
        if cached is not None and cached[0] == key:
            return cached[1]
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        consts = bias, self.scale_mul_1H11.view(-1).float().clamp_max(MAX_SCALE_MUL).exp()
        if not torch.is_grad_enabled() and self.q_bias.device.type != "meta":
            self.__dict__["_consts"] = (key, consts)
        return consts

    def forward(self, h, consts, kv, start: int, q_scale=None, k_scale=None):
        """h (N, l, C) AdaLN'd tokens; kv (2, N, H, Lmax, D) pool view. The attention kernel writes this step's
        normalised k and v at [start, start+l) and attends to [0, start+l). Returns (N, l, C) before gamma1."""
        bias, scale_mul = consts
        qkv = ops.linear(h, self.mat_qkv.weight, bias)  # (N, l, 3C), official packing q | k | v
        o = ops.var_attention(qkv, kv, start, scale_mul, q_scale, k_scale)  # (N, l, C)
        return self.proj(o)


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = ops.Linear(C, hidden)
        self.fc2 = ops.Linear(hidden, C)

    def forward(self, h):  # tanh GELU; fc1 + GELU is one GEMM with an epilogue on the fast path
        return self.fc2(ops.linear_gelu(h, self.fc1.weight, self.fc1.bias))


class Block(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.width
        self.C, self.eps, self.shared_aln = C, cfg.eps, cfg.shared_aln
        self.attn = Attention(C, cfg.heads)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))

    def ada_params(self, cond, shared):
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (N, 1, C); constant over a whole generation."""
        if self.shared_aln:
            return (self.ada_gss + shared).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x, h, ada, next_mod, consts, kv, start: int, q_scale=None, k_scale=None):
        """x (N, l, C) residual stream; h = adaln(x) with this block's (scale1, shift1), made by the block before.
        next_mod (scale, shift) of the AdaLN that follows (next block's attention, or the head). Returns (x, h)
        for the next one: each gated residual add is fused with the AdaLN after it, one pass over x."""
        g1, g2, s1, s2, b1, b2 = ada
        a = self.attn(h, consts, kv, start, q_scale, k_scale)
        x, h = ops.residual_adaln(x, a, g1, s2, b2, self.eps)  # x += a * gamma1, then the FFN's AdaLN
        return ops.residual_adaln(x, self.ffn(h), g2, *next_mod, self.eps)  # x += ffn * gamma2, then the next AdaLN


class HeadNorm(nn.Module):  # official AdaLNBeforeHead: only `ada_lin` has weights
    def __init__(self, C: int):
        super().__init__()
        self.C = C
        self.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 2 * C))


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, K = cfg.width, len(cfg.patch_nums)
        self.word_embed = ops.Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: unconditional (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.patch_nums[0] ** 2, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.L, C))
        self.lvl_embed = nn.Embedding(K, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = HeadNorm(C)
        self.head = ops.Linear(C, cfg.vocab)

    # ---- per generation -------------------------------------------------------------------------------------
    def prepare(self, labels2: torch.Tensor) -> dict:
        """labels2 (2B,) = conditional labels then the null class (the CFG pair), or (B,) conditional labels alone
        (scales drawn without guidance: SamplingSettings.cfg_skip_last). Everything constant across scales; every
        tensor has one row per label (N = 2B or B)."""
        cond = self.class_emb(labels2)  # (N, C)
        shared = self.shared_ada_lin(cond).view(-1, 1, 6, self.cfg.width) if self.cfg.shared_aln else None
        scale, shift = self.head_nm.ada_lin(cond).view(-1, 1, 2, self.cfg.width).unbind(2)
        return {
            "cond": cond,
            "ada": [b.ada_params(cond, shared) for b in self.blocks],
            "attn": [b.attn.constants() for b in self.blocks],
            "head": (scale, shift),
        }

    @staticmethod
    def cond_rows(state: dict, B: int) -> dict:
        """The state of prepare(labels2) cut to its first B rows, the conditional half: views (no launches), the
        values prepare(labels) computes. For the scales drawn without guidance after guided ones."""
        return {"cond": state["cond"][:B], "ada": [tuple(t[:B] for t in a) for a in state["ada"]],
                "attn": state["attn"], "head": tuple(t[:B] for t in state["head"])}

    def lvl_pos(self, si: int) -> torch.Tensor:
        """(1, pn^2, C) level + position embedding of scale si."""
        b, e = self.cfg.scale_bounds()[si]
        return self.lvl_embed.weight[si].view(1, 1, -1) + self.pos_1LC[:, b:e]

    def scale_input(self, si: int, state: dict, rows: torch.Tensor | None) -> torch.Tensor:
        """Transformer input of scale si, (N, pn^2, C) for the state's N rows (2B: the CFG pair; B: conditional
        only). rows: (B, pn^2, Cvae) fp32 area-downsampled f_hat (None for scale 0, whose input is the class
        embedding + pos_start)."""
        if si == 0:
            cond = state["cond"]
            return cond.unsqueeze(1) + self.pos_start + self.lvl_pos(0)
        x = self.word_embed(rows.to(self.word_embed.weight.dtype)) + self.lvl_pos(si)
        if state["cond"].shape[0] == x.shape[0]:
            return x  # conditional rows alone (guidance skipped)
        return x.repeat(2, 1, 1)  # same input for the conditional and unconditional halves

    # ---- per step -------------------------------------------------------------------------------------------
    def forward_tokens(self, x, state: dict, kv_layers, start: int, q_scale=None, k_scale=None):
        """x (N, l, C) tokens at sequence positions [start, start+l); kv_layers[i] (2, N, H, Lmax, D) (N = 2B, or B
        with guidance skipped: the pool's conditional rows, kv[:, :B], a strided view). Returns the head's AdaLN of
        the last hidden state, (N, l, C): what `logits` reads."""
        ada, blocks = state["ada"], self.blocks
        mods = [(a[2], a[4]) for a in ada] + [state["head"]]  # (scale1, shift1) of each block, then the head's
        h = ops.adaln(x, *mods[0], self.cfg.eps)
        for i, (blk, consts, kv) in enumerate(zip(blocks, state["attn"], kv_layers)):
            x, h = blk(x, h, ada[i], mods[i + 1], consts, kv, start, q_scale, k_scale)
        return h

    def logits(self, h) -> torch.Tensor:
        """(N, l, C) from forward_tokens -> (N, l, V) in the model's dtype (the sampler reads it as it is)."""
        return self.head(h)

    def kv_shape(self, rows: int, tokens: int | None = None) -> tuple:
        """Per-layer KV tensor shape for `rows` (= 2B) rows and `tokens` slots (default: the whole pyramid; a
        CoDe drafter needs only the tokens of the scales it runs)."""
        return (2, rows, self.cfg.heads, self.cfg.L if tokens is None else tokens, self.cfg.head_dim)


def config_from_state_dict(sd, patch_nums=None, num_classes=None) -> VARConfig:
    """Depth, width, heads, vocab and AdaLN kind read off an official VAR state dict."""
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        C = sd["class_emb.weight"].shape[1]
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
        vocab = sd["head.weight"].shape[0]
        cvae = sd["word_embed.weight"].shape[1]
        n_cls = sd["class_emb.weight"].shape[0] - 1
        L = sd["pos_1LC"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a VAR checkpoint: cannot read its shape ({type(e).__name__}: {e}); "
                         f"first keys: {list(sd)[:8]}") from None
    shared = "shared_ada_lin.1.weight" in sd
    if patch_nums is None and "lvl_1L" in sd:  # the official buffer: the scale index of every position
        counts = torch.bincount(sd["lvl_1L"].flatten().long()).tolist()
        roots = [math.isqrt(c) for c in counts]
        if all(r * r == c for r, c in zip(roots, counts)) and sum(counts) == L:
            patch_nums = tuple(roots)
    if patch_nums is None:
        patch_nums = next((p for p in (PATCH_NUMS_256, PATCH_NUMS_512) if sum(x * x for x in p) == L), None)
        if patch_nums is None:
            raise ValueError(f"VAR checkpoint has {L} tokens per image: pass patch_nums explicitly")
    if num_classes is not None and num_classes != n_cls:
        raise ValueError(f"checkpoint has {n_cls} classes, expected {num_classes}")
    return VARConfig(depth=depth, width=C, heads=heads, vocab=vocab, cvae=cvae, num_classes=n_cls,
                     patch_nums=tuple(patch_nums), shared_aln=shared)


@torch.no_grad()
def init_random_(model: VAR, seed: int = 0) -> VAR:
    """Random weights shaped like a trained model (the official init scheme), for tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    C = model.cfg.width
    std = math.sqrt(1 / C / 3)
    for name, p in model.named_parameters():
        if name.endswith("scale_mul_1H11"):
            p.fill_(math.log(4.0))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g).mul_(std).clamp_(-2 * std, 2 * std))
    for blk in model.blocks:
        w = blk.ada_gss if model.cfg.shared_aln else blk.ada_lin[1].weight
        (w[:, :, :2] if model.cfg.shared_aln else w[: 2 * C]).mul_(1e-1)  # small gammas keep the residual stream tame
    return model
