"""The encoding half of VAR's multi-scale residual VQVAE, for zero-shot editing (var_rt.editing; also the module
tree examples/shapes10/train_var.py trains): the official Encoder (FoundationVision/VAR models/basic_vae.py) and
quant_conv under their official key names (`encoder.*`, `quant_conv.*`), and the official img_to_idxBl:
quant_conv(encoder(2 img - 1)) tokenised scale by scale as VectorQuantizer2.f_to_idxBl_or_fhat does.

Generation never builds or loads any of this: a normal VQVAE load accepts and drops these keys (vqvae.IGNORED_KEYS);
editing loads them on first use (loaders.load_vqvae_encoder) and attaches them to the VQVAE (attach_encoder).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from var_rt.models.vqvae import AttnBlock, ResnetBlock, VQVAE, VQVAEConfig, _norm, group_norm, init_random_


class Downsample2x(nn.Module):
    """Official: pad right and bottom by one zero row/column, then a 3x3 stride-2 conv without padding."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> (B, Cvae, H / 2^(levels-1), ...); official module tree and order: conv_in;
    per level `down.{i}`: num_res_blocks ResnetBlocks (each followed by an AttnBlock at the last level when
    using_sa), then Downsample2x except at the last level; mid block_1, attn_1, block_2; norm_out, SiLU, conv_out.
    Plain NCHW (the decoder's reference path); GroupNorms through ops like the decoder's."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        block_in, downs = cfg.ch, []
        for lvl in range(levels):
            down = nn.Module()
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[lvl]))
                block_in = cfg.ch * cfg.ch_mult[lvl]
                if lvl == levels - 1 and cfg.using_sa:
                    attns.append(AttnBlock(block_in))
            down.block, down.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
            if lvl != levels - 1:
                down.downsample = Downsample2x(block_in)
            downs.append(down)
        self.down = nn.ModuleList(downs)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.cvae, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl, down in enumerate(self.down):
            for i, blk in enumerate(down.block):
                h = blk(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if lvl != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(group_norm(self.norm_out, h, True))


class EncoderHalf(nn.Module):
    """What editing loads from a VQVAE file: `encoder.*` and `quant_conv.*` under their official names."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.cvae, cfg.cvae, 3, 1, 1)


def random_encoder(cfg: VQVAEConfig, seed: int = 0) -> EncoderHalf:
    """A random encoder half for a random VQVAE (init_random_'s rule, seed + 1000: not the decoder's stream)."""
    return init_random_(EncoderHalf(cfg), seed + 1000)


def img_to_f(vae: VQVAE, img01: torch.Tensor) -> torch.Tensor:
    """img01 (B, 3, H, W) in [0, 1] -> f = quant_conv(encoder(2 img - 1)) (B, Cvae, h, w) fp32 (official
    img_to_idxBl input: normalize_01_into_pm1), with the encoder attached to `vae`. The encoder runs in its weights'
    dtype, quant_conv in fp32."""
    if vae.encoder is None:
        raise ValueError("the VQVAE encoder is not loaded (editing loads it: var_rt.editing.ensure_encoder)")
    x = img01.to(vae.encoder.conv_in.weight.dtype).mul(2).sub(1)
    return vae.quant_conv(vae.encoder(x).float())


@torch.no_grad()
def f_to_tokens(vae: VQVAE, f: torch.Tensor, patch_nums) -> tuple[list, torch.Tensor]:
    """Official VectorQuantizer2.f_to_idxBl_or_fhat (using_znorm=False, as the released VQVAE), f (B, Cvae, H, H)
    fp32 with H = patch_nums[-1]: for each scale s, the residual f_rest area-downsampled to pn x pn (the last
    scale as is), each position's nearest codebook entry in L2 distance (|z|^2 + |e|^2 - 2 z.e, argmin: the
    first of equals), h = its embedding upsampled bicubic to H x H (not at the last scale), through Phi_s
    ((1 - r) h + r conv(h), r = quant_resi = 0.5); f_hat += h, f_rest -= h. Returns ([(B, pn^2) int64 per scale],
    f_hat fp32)."""
    B, C, H, W = f.shape
    K = len(patch_nums)
    if patch_nums[-1] != H or H != W:
        raise ValueError(f"latent {H}x{W} does not fit the last scale {patch_nums[-1]}x{patch_nums[-1]}")
    E = vae.quantize.embedding.weight.float()               # (V, C)
    e2 = E.square().sum(1)                                  # (V,)
    f_rest, f_hat, tokens = f.float().clone(), torch.zeros_like(f, dtype=torch.float32), []
    for s, pn in enumerate(patch_nums):
        z = f_rest if s == K - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, C)            # (B pn^2, C)
        d = z.square().sum(1, keepdim=True) + e2 - 2 * (z @ E.T)
        idx = d.argmin(1).view(B, pn * pn)
        tokens.append(idx)
        h = E[idx].transpose(1, 2).reshape(B, C, pn, pn)
        if s != K - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        phi, r = vae.phi(s, K), vae.cfg.quant_resi
        h = h * (1 - r) + F.conv2d(h, phi.weight.float(), phi.bias.float(), padding=1) * r
        f_hat.add_(h)
        f_rest.sub_(h)
    return tokens, f_hat
