"""The inference half of VAR's multi-scale residual VQVAE (`vae_ch160v4096z32.pth`), official parameter names.

Sampling runs the quantizer codebook and its shared Phi convs, post_quant_conv and the decoder. The encoder and
quant_conv are in the official file too: a normal load accepts and drops them (IGNORED_KEYS), so generation never
holds them; zero-shot editing (var_rt.editing) loads them on first use (loaders.load_vqvae_encoder; the modules
and the tokenisation are in vqvae_encoder.py) and attaches them (`VQVAE.attach_encoder`).

The decoder has two paths with one set of weights. The reference (torch backend) is plain NCHW, the spec.
The fast path (wherever ops.group_norm_silu takes its Triton kernel, see ops.decoder_channels_last) runs
channels_last from conv_in to conv_out, cuDNN's native conv layout, so no conv pays NCHW<->NHWC transposes; the
GroupNorm(+SiLU) kernels read and write NHWC, each block's residual add is fused into the next GroupNorm, the
attention's token views are free, and the image is made contiguous NCHW once at the end.
`run_channels_last` is shared with LlamaGen's VQ-16 decoder (models/vq16.py), which has the same structure.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from var_rt import ops

import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODER_KEYS = (r"encoder\..*", r"quant_conv\..*")  # the encoding half: loaded only for editing
IGNORED_KEYS = ENCODER_KEYS + (r"quantize\.ema_vocab_hit_SV",)
KEEP_FP32 = (r"quantize\..*", r"post_quant_conv\..*")  # the latent side stays fp32 whatever the model dtype


@dataclass(frozen=True)
class VQVAEConfig:
    vocab: int = 4096
    cvae: int = 32
    ch: int = 160
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    n_phi: int = 4
    quant_resi: float = 0.5

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def group_norm(norm: nn.GroupNorm, x, silu: bool):
    """GroupNorm (+ SiLU) through ops: one fused Triton kernel on the fast path (NCHW or channels_last)."""
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)


def residual_group_norm(norm: nn.GroupNorm, x, r, silu: bool):
    """(s, GroupNorm(+SiLU)(s)) of s = x + r, the add fused into the norm's kernel; r None: s = x."""
    if r is None:
        return x, group_norm(norm, x, silu)
    return ops.residual_group_norm_silu(x, r, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)


def attention_nhwc(q, k, v):
    """Single-head attention over all positions of channels_last maps q, k, v (B, C, H, W) -> channels_last
    (B, C, H, W). A channels_last map is (B, H, W, C) in memory, so the (B, HW, C) token views and the way back
    are free (no copy to NCHW and back, as the reference's reshape/transpose pair makes)."""
    B, C, H, W = q.shape
    q, k, v = (t.permute(0, 2, 3, 1).reshape(B, 1, H * W, C) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
    return o.reshape(B, H, W, C).permute(0, 3, 1, 2)


def run_channels_last(z, conv_in, stages, norm_out, conv_out):
    """The fast path of both VQ decoders. The running value is carried as a pair (x, r) meaning x + r: each
    stage's `fast(x, r) -> (x', r')` leaves its residual add to the next GroupNorm (residual_group_norm).
    Converts the latent to channels_last once, returns the image as contiguous NCHW."""
    x, r = conv_in(z.contiguous(memory_format=torch.channels_last)), None
    for m in stages:
        x, r = m.fast(x, r)
    return conv_out(residual_group_norm(norm_out, x, r, True)[1]).contiguous()


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(group_norm(self.norm1, x, True))
        h = self.conv2(group_norm(self.norm2, h, True))
        return self.nin_shortcut(x) + h

    def fast(self, x, r=None):
        """Input x + r; returns (shortcut, h), the output being their sum (added by the next GroupNorm)."""
        x, a = residual_group_norm(self.norm1, x, r, True)
        return self.nin_shortcut(x), self.conv2(group_norm(self.norm2, self.conv1(a), True))


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(group_norm(self.norm, x, False))
        q, k, v = qkv.reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))

    def fast(self, x, r=None):
        """Channels_last; input x + r, returns (x + r, proj_out(attention))."""
        x, a = residual_group_norm(self.norm, x, r, False)
        return x, self.proj_out(attention_nhwc(*self.qkv(a).chunk(3, dim=1)))


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def fast(self, x, r=None):
        return self.forward(x if r is None else x + r), None  # nearest 2x keeps channels_last


class Decoder(nn.Module):
    """Latent (B, Cvae, h, w) -> image (B, 3, h*2^(levels-1), ...); official module tree (`up` stored low->high)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.cvae, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        ups = []
        for lvl in reversed(range(levels)):
            up = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[lvl]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if lvl == levels - 1 and cfg.using_sa:
                    attns.append(AttnBlock(block_in))
            up.block, up.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
            if lvl != 0:
                up.upsample = Upsample2x(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def stages(self) -> list:
        """The modules between conv_in and norm_out, in the order they run."""
        out = [self.mid.block_1, self.mid.attn_1, self.mid.block_2]
        for lvl in reversed(range(len(self.up))):
            up = self.up[lvl]
            for i, blk in enumerate(up.block):
                out += [blk, up.attn[i]] if len(up.attn) else [blk]
            if lvl != 0:
                out.append(up.upsample)
        return [m for m in out if not isinstance(m, nn.Identity)]

    def forward(self, z):
        """z (B, Cvae, h, w) -> image (B, 3, H, W), contiguous NCHW on both paths."""
        if ops.decoder_channels_last(z.device):
            return run_channels_last(z, self.conv_in, self.stages(), self.norm_out, self.conv_out)
        h = self.conv_in(z)
        for m in self.stages():
            h = m(h)
        return self.conv_out(group_norm(self.norm_out, h, True))


def phi_ticks(n_phi: int):
    """The official PhiPartiallyShared ticks: where on [0, 1] each of the n_phi shared Phi convs sits."""
    import numpy as np
    return np.linspace(1 / 3 / n_phi, 1 - 1 / 3 / n_phi, n_phi) if n_phi == 4 else np.linspace(1 / 2 / n_phi, 1 - 1 / 2 / n_phi, n_phi)


def phi_index(si: int, num_scales: int, n_phi: int) -> int:
    """Which of the shared Phi convs scale si uses: the tick nearest to si / (K - 1)."""
    import numpy as np
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(n_phi) - at)))


class PhiConvs(nn.Module):  # official PhiPartiallyShared: `qresi_ls.{i}` are Conv2d(Cvae, Cvae, 3, padding 1)
    def __init__(self, cvae: int, n: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(nn.Conv2d(cvae, cvae, 3, 1, 1) for _ in range(n))


class Quantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab, cfg.cvae)
        self.quant_resi = PhiConvs(cfg.cvae, cfg.n_phi)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.quantize = Quantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.cvae, cfg.cvae, 3, 1, 1)
        self.decoder = Decoder(cfg)
        # The encoding half stays None (not even built) until editing attaches it: generation never holds it.
        self.encoder: nn.Module | None = None     # vqvae_encoder.Encoder
        self.quant_conv: nn.Conv2d | None = None
        self.path: str | None = None          # the file it was loaded from (loaders.load_vqvae): editing loads
        self.random_seed: int | None = None   # the encoder from there, or builds a random one (init_random_)

    def phi(self, si: int, num_scales: int) -> nn.Conv2d:
        return self.quantize.quant_resi.qresi_ls[phi_index(si, num_scales, self.cfg.n_phi)]

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, h, w) fp32 -> image (B, 3, H, W) in [0, 1], fp32."""
        dt = self.decoder.conv_in.weight.dtype
        z = self.post_quant_conv(f_hat.float()).to(dt)
        return self.decoder(z).float().clamp_(-1, 1).add_(1).mul_(0.5)

    # ---- the encoding half (zero-shot editing only) ---------------------------------------------------------------
    def attach_encoder(self, half) -> None:
        """Take the encoder and quant_conv of a loaded EncoderHalf (they then appear in state_dict())."""
        self.encoder, self.quant_conv = half.encoder, half.quant_conv


def config_from_state_dict(sd) -> VQVAEConfig:
    """Read vocab, Cvae, ch, ch_mult, res blocks, attention use and Phi count off a VQVAE state dict."""
    try:
        vocab, cvae = sd["quantize.embedding.weight"].shape
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
        outs = [sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
        ch = outs[0]
        n_blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("decoder.up.0.block."))
        n_phi = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("quantize.quant_resi.qresi_ls."))
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not a VAR VQVAE checkpoint: cannot read its shape ({type(e).__name__}: {e}); "
                         f"first keys: {list(sd)[:8]}") from None
    return VQVAEConfig(
        vocab=vocab, cvae=cvae, ch=ch, ch_mult=tuple(o // ch for o in outs), num_res_blocks=n_blocks - 1,
        using_sa=f"decoder.up.{levels - 1}.attn.0.qkv.weight" in sd,
        using_mid_sa="decoder.mid.attn_1.qkv.weight" in sd, n_phi=n_phi,
    )


@torch.no_grad()
def init_random_(vae: VQVAE, seed: int = 0) -> VQVAE:
    """Random weights with sane activations (default conv init, unit norms, a spread-out codebook)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(vae, VQVAE):
        vae.random_seed = seed  # editing builds a random encoder from it (vqvae_encoder.random_encoder)
    for name, p in vae.named_parameters():
        if re.search(r"norm\w*\.weight$", name):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif p.ndim == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g))
    return vae

