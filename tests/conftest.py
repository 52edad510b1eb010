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


def tiny_llamagen_pipe(seed=0, std=0.3, backend="torch", device="cpu", grid=6, **kw):
    """A random 2-layer LlamaGen pipeline (vocab 64, 10 classes, grid x grid tokens; std 0.3: peaked enough that
    drafts are both accepted and rejected): the SJD tests' model."""
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    from var_rt.models.llamagen import LlamaGenConfig
    cfg = LlamaGenConfig(**{**dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, grid=grid), **kw})
    return LlamaGenPipeline.random(cfg, std=std, seed=seed, backend=backend, device=device)


@torch.no_grad()
def make_predictable_(pipe, token: int = 5):
    """Make a tiny LlamaGen predict `token` everywhere: attention and FFN outputs zeroed, every embedding given a
    large feature 0, and the head reading only that feature (the SJD tests' model where drafts come true)."""
    g = pipe.gpt
    for blk in g.layers:
        blk.attention.wo.weight.zero_()
        blk.feed_forward.w2.weight.zero_()
    g.tok_embeddings.weight[:, 0] = 5.0
    g.cls_embedding.embedding_table.weight[:, 0] = 5.0
    g.norm.weight.zero_()[0] = 1.0
    g.output.weight.zero_()[token, 0] = 10.0
    return pipe


def check_batch_invariance(pipe, labels, seed, **kw):
    """generate_tokens(labels, seed=seed, **kw): image i equals the same image drawn alone (seeds=[mix_seed(seed,
    i)]) with the same per-image pass count, the call is deterministic, and another seed changes it."""
    from var_rt import ops
    a = pipe.generate_tokens(labels, seed=seed, **kw).clone()
    stats = dict(pipe.last_stats)
    for i, lab in enumerate(labels):
        one = pipe.generate_tokens([lab], seeds=[ops.mix_seed(seed, i)], **kw)
        assert torch.equal(one[0], a[i]), i
        assert pipe.last_stats["sjd_passes"][0] == stats["sjd_passes"][i]
    assert torch.equal(pipe.generate_tokens(labels, seed=seed, **kw), a)
    assert not torch.equal(pipe.generate_tokens(labels, seed=seed + 1, **kw), a)


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
