"""LlamaGen's VQ-16 image tokenizer (`vq_ds16_c2i.pt`, FoundationVision/LlamaGen
`tokenizer/tokenizer_image/vq_model.py`), decode side only, official parameter names:
    quantize.embedding.weight (16384, 8)        looked up L2-normalised (codebook_l2_norm, get_codebook_entry)
    post_quant_conv.{weight,bias} (256, 8, 1, 1)
    decoder.conv_in, decoder.mid.{0,2} (ResnetBlock), decoder.mid.1 (AttnBlock: norm, q, k, v, proj_out),
    decoder.conv_blocks.{i}.res.{j} (norm1, conv1, norm2, conv2, nin_shortcut when channels change),
    decoder.conv_blocks.{i}.attn.{j} (lowest resolution only), decoder.conv_blocks.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out
The encoder, quant_conv and the codebook usage buffer are in the official file and are accepted and dropped.

As VAR's VQVAE decoder (models/vqvae.py): the reference (torch backend) is plain NCHW with nn.GroupNorm; the fast
path (ops.decoder_channels_last) runs channels_last with the fused GroupNorm(+SiLU) kernels, each residual add
fused into the next GroupNorm, through vqvae.run_channels_last.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from var_rt import ops
from var_rt.models.vqvae import attention_nhwc, group_norm, residual_group_norm, run_channels_last

IGNORED_KEYS = (r"encoder\..*", r"quant_conv\..*", r"quantize\.codebook_used")
KEEP_FP32 = (r"quantize\..*", r"post_quant_conv\..*")


@dataclass(frozen=True)
class VQ16Config:
    codebook_size: int = 16384
    embed_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    l2_norm: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h

    def fast(self, x, r=None):
        """Input x + r; returns (shortcut, h), the output being their sum (added by the next GroupNorm)."""
        x, a = residual_group_norm(self.norm1, x, r, True)
        h = self.conv2(group_norm(self.norm2, self.conv1(a), True))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x), h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, scale C^-1/2."""
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))   # (B, HW, C)
        o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(o.transpose(1, 2).reshape(B, C, H, W))

    def fast(self, x, r=None):
        """Channels_last; input x + r, returns (x + r, proj_out(attention))."""
        x, a = residual_group_norm(self.norm, x, r, False)
        return x, self.proj_out(attention_nhwc(self.q(a), self.k(a), self.v(a)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def fast(self, x, r=None):
        return self.forward(x if r is None else x + r), None  # nearest 2x keeps channels_last


class Decoder(nn.Module):
    def __init__(self, cfg: VQ16Config):
        super().__init__()
        mult, n = cfg.ch_mult, len(cfg.ch_mult)
        cin = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n)):   # lowest resolution first
            blk = nn.Module()
            cout = cfg.ch * mult[level]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(cin, cout))
                cin = cout
                if level == n - 1:
                    attn.append(AttnBlock(cin))
            blk.res, blk.attn = res, attn
            if level != 0:
                blk.upsample = Upsample(cin)
            self.conv_blocks.append(blk)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

    def stages(self) -> list:
        """The modules between conv_in and norm_out, in the order they run."""
        out = list(self.mid)
        for blk in self.conv_blocks:
            for i, r in enumerate(blk.res):
                out += [r, blk.attn[i]] if len(blk.attn) else [r]
            if hasattr(blk, "upsample"):
                out.append(blk.upsample)
        return out

    def forward(self, z):                       # (B, z, h, w) -> (B, 3, h * 2^(n-1), ...), contiguous NCHW
        if ops.decoder_channels_last(z.device):
            return run_channels_last(z, self.conv_in, self.stages(), self.norm_out, self.conv_out)
        h = self.conv_in(z)
        for m in self.stages():
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, cfg: VQ16Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)


class VQ16(nn.Module):
    def __init__(self, cfg: VQ16Config = VQ16Config()):
        super().__init__()
        self.cfg = cfg
        self.quantize = Quantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def codebook_entry(self, ids):
        """ids (B, h*w) int64 -> (B, embed_dim, h, w) fp32 (square grid), L2-normalised as get_codebook_entry."""
        B, L = ids.shape
        g = math.isqrt(L)
        if g * g != L:
            raise ValueError(f"{L} tokens per image is not a square grid")
        emb = self.quantize.embedding.weight.float()
        if self.cfg.l2_norm:
            emb = F.normalize(emb, p=2, dim=-1)
        return emb[ids].view(B, g, g, -1).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode_tokens(self, ids):
        """ids (B, h*w) -> images (B, 3, 16 h, 16 w) in [-1, 1]."""
        z = self.post_quant_conv(self.codebook_entry(ids))
        dt = self.decoder.conv_in.weight.dtype
        return self.decoder(z.to(dt)).float().clamp_(-1, 1)


def config_from_state_dict(sd) -> VQ16Config:
    """Sizes read off an official (or smaller) VQ-16 state dict."""
    if "quantize.embedding.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise ValueError(f"not a LlamaGen VQ state dict: no quantize.embedding.weight / decoder.conv_out.weight "
                         f"(keys: {sorted(sd)[:6]} ...)")
    V, E = sd["quantize.embedding.weight"].shape
    z = sd["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in sd else 256
    ch = sd["decoder.conv_out.weight"].shape[1]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.conv_blocks\.(\d+)\.", k))})
    mult = []
    for i in reversed(levels):  # conv_blocks.0 is the lowest resolution (largest multiplier)
        w = sd.get(f"decoder.conv_blocks.{i}.res.0.conv1.weight")
        if w is None:
            raise ValueError(f"VQ state dict lacks decoder.conv_blocks.{i}.res.0.conv1.weight")
        mult.append(w.shape[0] // ch)
    nres = len({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.conv_blocks\.0\.res\.(\d+)\.", k))}) - 1
    return VQ16Config(codebook_size=V, embed_dim=E, z_channels=z, ch=ch, ch_mult=tuple(mult), num_res_blocks=nres)


@torch.no_grad()
def init_random_(vq: VQ16, seed: int = 0) -> VQ16:
    """Random weights of sensible scale (for tests and timing): Kaiming-like convs, unit norms, random codebook."""
    for i, (name, p) in enumerate(vq.named_parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
        if name.endswith("bias"):
            p.zero_()
        elif ".norm" in name or name.startswith("decoder.norm"):
            p.fill_(1.0)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) / math.sqrt(fan_in))
    return vq
