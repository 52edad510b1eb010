import os

import pytest
import torch  # torch does not import triton: asking for a GPU before setting the mode is safe

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. On a GPU they run compiled unless
# TRITON_INTERPRET=1 is set (make test sets it; benchmarks/run_gpu_suite.sh exports TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from var_rt.models import var as var_model
from var_rt.models import vqvae as vqvae_model

TINY_PN = (1, 2, 3, 4)


def tiny_var_cfg(depth=2, patch_nums=TINY_PN, shared_aln=False, width=64, heads=2, vocab=48, cvae=8, num_classes=10):
    return var_model.VARConfig(depth=depth, width=width, heads=heads, vocab=vocab, cvae=cvae, num_classes=num_classes,
                               patch_nums=tuple(patch_nums), shared_aln=shared_aln)


def tiny_vae_cfg(vocab=48, cvae=8):
    return vqvae_model.VQVAEConfig(vocab=vocab, cvae=cvae, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def tiny_var(seed=0, **kw):
    return var_model.init_random_(var_model.VAR(tiny_var_cfg(**kw)), seed).eval().requires_grad_(False)


def tiny_vae(seed=0, **kw):
    return vqvae_model.init_random_(vqvae_model.VQVAE(tiny_vae_cfg(**kw)), seed).eval().requires_grad_(False)


def official_var_state_dict(model):
    """Our model's weights plus the buffers the official VAR saves (lvl_1L, training mask, zero_k_bias)."""
    cfg = model.cfg
    sd = dict(model.state_dict())
    d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, cfg.L, 1)
    sd["lvl_1L"] = d.transpose(1, 2)[:, 0].contiguous()
    sd["attn_bias_for_masking"] = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, cfg.L, cfg.L)
    for i in range(cfg.depth):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(cfg.width)
    return sd


def official_vae_state_dict(vae, num_scales=4, seed=0):
    """Our VQVAE's weights plus an encoder / quant_conv / ema buffer as the official file has (random here)."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(vae.state_dict())
    c = vae.cfg
    sd["encoder.conv_in.weight"] = torch.randn(c.ch, 3, 3, 3, generator=g)
    sd["encoder.conv_out.weight"] = torch.randn(c.cvae, c.ch * c.ch_mult[-1], 3, 3, generator=g)
    sd["quant_conv.weight"] = torch.randn(c.cvae, c.cvae, 3, 3, generator=g)
    sd["quant_conv.bias"] = torch.zeros(c.cvae)
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(num_scales, c.vocab)
    return sd


@pytest.fixture
def one_thread():
    """Hundreds of tiny forward passes: intra-op threads only add overhead (and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_files(tmp_path):
    """A tiny VAR + VQVAE written in the official formats: raw .pth state dicts."""
    var, vae = tiny_var(), tiny_vae()
    vp, ap = tmp_path / "var_d2.pth", tmp_path / "vae.pth"
    torch.save(official_var_state_dict(var), vp)
    torch.save(official_vae_state_dict(vae), ap)
    return {"var": vp, "vae": ap, "var_model": var, "vae_model": vae}
