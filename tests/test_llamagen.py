"""LlamaGen c2i GPT + VQ-16: official key names, checkpoint round trips, sampling semantics, sequential == ZipAR
with the full window."""
import os

import torch  # noqa: E402  (torch does not import triton: asking for a GPU here is safe)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest
import torch
import torch.nn.functional as F

from var_rt import ops
from var_rt.checkpoint import CheckpointError, save_state_dict
from var_rt.llamagen_pipeline import LlamaGenPipeline, draw_tokens, filter_logits
from var_rt.models import llamagen, vq16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw):
    base = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, grid=6)
    base.update(kw)
    return llamagen.LlamaGenConfig(**base)


def tiny_pipe(seed=0, **kw):
    return LlamaGenPipeline.random(tiny_cfg(**kw), std=0.3, seed=seed, backend="torch")


# Names read off FoundationVision/LlamaGen gpt.py (Transformer, TransformerBlock, Attention, FeedForward,
# LabelEmbedder) for a 2-layer model, and vq_model.py (VQModel, Decoder) for the decode side.
OFFICIAL_GPT_KEYS = {
    "cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight",
    *(f"layers.{i}.{n}.weight" for i in range(2) for n in (
        "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
        "attention_norm", "ffn_norm")),
}
OFFICIAL_VQ_SHAPES = {  # full VQ-16 (ch 128, ch_mult 1,1,2,2,4, z 256, codebook 16384 x 8)
    "quantize.embedding.weight": (16384, 8),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.1.q.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.0.attn.2.proj_out.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.conv_blocks.4.res.2.norm2.weight": (128,),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}


def official_freqs_cis(grid, head_dim, base=10000.0, cls=1):
    """The official 2-D RoPE table, restated: pair k < D/4 turns by row * theta_k, pair D/4 + k by col * theta_k,
    theta_k = base^(-2k / (D/2)); class-token rows are zero."""
    q = head_dim // 4
    theta = base ** (-torch.arange(q, dtype=torch.float64) * 2 / (head_dim // 2))
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang = torch.cat([r.reshape(-1, 1) * theta, c.reshape(-1, 1) * theta], dim=1)         # (g^2, D/2)
    tab = torch.stack([ang.cos(), ang.sin()], dim=-1).float()
    return torch.cat([torch.zeros(cls, head_dim // 2, 2), tab])


def test_official_names_and_sizes():
    assert set(tiny_pipe().gpt.state_dict()) == OFFICIAL_GPT_KEYS
    with torch.device("meta"):
        full = vq16.VQ16()
    sd = full.state_dict()
    for k, shape in OFFICIAL_VQ_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in sd)
    # official parameter counts (gpt.py comments) and FFN widths find_multiple(int(8 C / 3), 256)
    for name, params, ffn in (("B", 111e6, 2048), ("L", 343e6, 2816), ("XL", 775e6, 3584), ("XXL", 1.4e9, 4096),
                              ("3B", 3.1e9, 8704)):
        cfg = llamagen.config_for(name, 384)
        assert cfg.ffn_hidden == ffn and cfg.grid == 24
        n = sum(p.numel() for p in llamagen.build_meta(cfg).parameters())
        assert abs(n - params) / params < 0.03, (name, n)


def test_rope_table_and_rotation_match_official_formula():
    for grid, D in ((4, 16), (3, 100)):
        torch.testing.assert_close(llamagen.rope_2d_table(grid, D), official_freqs_cis(grid, D), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 4, 16)
    tab = official_freqs_cis(4, 16)[1:4]
    rot = torch.view_as_complex(torch.stack([tab[..., 0], tab[..., 1]], -1).contiguous())   # cos + i sin
    want = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 4, 8, 2)) * rot.view(1, 3, 1, 8)).flatten(3)
    torch.testing.assert_close(ops.apply_rope(x, tab), want, atol=1e-5, rtol=1e-5)


def full_forward_logits(gpt, label, ids):
    """An independent non-cached forward: class token + ids, causal attention over the whole sequence."""
    c = gpt.cfg
    h = torch.cat([gpt.cls_embedding.embedding_table.weight[label][None, None], gpt.tok_embeddings.weight[ids][None]], 1)
    tab = official_freqs_cis(c.grid, c.head_dim)[: h.shape[1]]
    for blk in gpt.layers:
        x = blk.attention_norm(h)
        q, k, v = blk.attention.wqkv(x).split(c.dim, -1)
        q, k, v = (t.view(1, -1, c.n_head, c.head_dim) for t in (q, k, v))
        q, k = ops.apply_rope(q, tab), ops.apply_rope(k, tab)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + blk.attention.wo(o.transpose(1, 2).reshape(1, -1, c.dim))
        x = blk.ffn_norm(h)
        h = h + blk.feed_forward.w2(F.silu(blk.feed_forward.w1(x)) * blk.feed_forward.w3(x))
    return gpt.output(gpt.norm(h)).float()[0]


def test_cached_sequential_logits_equal_full_forward():
    pipe = tiny_pipe(grid=3)
    gpt = pipe.gpt
    ids = pipe.generate_tokens([4], cfg=1.0, top_k=0, seed=1)[0]
    kv = [torch.zeros(gpt.kv_shape(1)) for _ in gpt.layers]
    want = full_forward_logits(gpt, 4, ids[:-1])                                    # (9, V)
    for t, p in enumerate(pipe.plan(None)):
        h = gpt.embed_classes(torch.tensor([4])) if p.prefill else gpt.embed_tokens(ids[p.inputs][None])
        got = gpt.step(h, p.slots, kv, p.vis)[0, -1]
        torch.testing.assert_close(got, want[t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(cfg=4.0, top_k=20), dict(cfg=2.0, top_k=0, top_p=0.8, temperature=1.3),
                                dict(cfg=1.0, top_k=5, cfg_interval=3), dict(cfg=3.0, cfg_interval=5)])
def test_zipar_full_window_equals_sequential(kw):
    pipe = tiny_pipe(grid=6)
    seq = pipe.generate_tokens([1, 7, 3], seed=11, **kw).clone()
    assert pipe.last_forward_passes == 36
    zip_full = pipe.generate_tokens([1, 7, 3], seed=11, zipar_window=6, **kw)
    assert pipe.last_forward_passes == 36
    assert torch.equal(seq, zip_full)
    # a shorter window takes fewer passes and, with this model, draws other tokens (the test is not vacuous)
    zip2 = pipe.generate_tokens([1, 7, 3], seed=11, zipar_window=2, **kw)
    assert pipe.last_forward_passes == 2 * 6 + 4 * 2
    assert not torch.equal(seq, zip2)
    assert torch.equal(seq[:, :12], zip2[:, :12])  # rows 0 and 1 see the same context as in sequential decoding


def test_first_token_is_official_cfg_then_draw():
    pipe = tiny_pipe()
    gpt, B, cfg = pipe.gpt, 2, 4.0
    labels = torch.tensor([3, 8])
    ids = pipe.generate_tokens(labels.tolist(), cfg=cfg, top_k=10, top_p=0.9, temperature=0.7, seed=5)
    kv = [torch.zeros(gpt.kv_shape(2 * B)) for _ in gpt.layers]
    p = pipe.plan(None)[0]
    logits = gpt.step(gpt.embed_classes(torch.cat([labels, torch.full_like(labels, 10)])), p.slots, kv, p.vis)
    cond, uncond = logits[:B], logits[B:]                                            # conditional rows first
    mixed = uncond + (cond - uncond) * cfg
    seeds = torch.tensor([ops.mix_seed(5, i) for i in range(B)])
    assert torch.equal(draw_tokens(mixed, seeds, [0], 10, 0.9, 0.7)[:, 0], ids[:, 0])


def test_cfg_interval_turns_guidance_off_after_token_interval_plus_one():
    pipe = tiny_pipe()
    full = pipe.generate_tokens([2, 5], cfg=4.0, top_k=0, seed=3).clone()
    assert torch.equal(pipe.generate_tokens([2, 5], cfg=4.0, top_k=0, seed=3, cfg_interval=100), full)
    part = pipe.generate_tokens([2, 5], cfg=4.0, top_k=0, seed=3, cfg_interval=0)
    assert torch.equal(part[:, :2], full[:, :2]) and not torch.equal(part, full)


def test_filter_and_temperature_order_follow_official():
    # top-p keeps the first token past the threshold
    kept = filter_logits(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0, 0.6)
    assert torch.isfinite(kept).tolist() == [[True, True, False]]
    assert torch.isfinite(filter_logits(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), 2, 1.0)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(torch.tensor([[3.0, 1.0]]), 99, 1.0)).all()     # top_k clamped to V
    # temperature before top-p: [2,1,0] / 0.5 leaves one token at top_p 0.8 (two without the temperature)
    logits = torch.tensor([[[2.0, 1.0, 0.0]]]).expand(64, 1, 3)
    seeds = torch.arange(64)
    assert (draw_tokens(logits, seeds, [0], 0, 0.8, 0.5) == 0).all()
    assert (draw_tokens(logits, seeds, [0], 0, 0.8, 1.0) == 1).any()


def test_images_batch_independence_and_determinism():
    pipe = tiny_pipe()
    a = pipe([1, 2, 3], seed=9, zipar_window=3)
    ta = pipe.last_tokens.clone()
    assert a.shape == (3, 3, pipe.image_size, pipe.image_size) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    b = pipe([1], seed=9, zipar_window=3, progress=True)
    assert torch.equal(pipe.last_tokens[0], ta[0])
    torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-5)   # conv batching may round differently
    c = pipe([1, 2, 3], seed=10, zipar_window=3)
    assert not torch.equal(pipe.last_tokens, ta)


def test_vq_decode_uses_l2_normalised_codebook():
    pipe = tiny_pipe()
    vq = pipe.vq
    ids = torch.randint(0, 64, (2, 36))
    z = vq.codebook_entry(ids)
    assert z.shape == (2, 8, 6, 6)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 6, 6))
    w = F.normalize(vq.quantize.embedding.weight, dim=-1)
    torch.testing.assert_close(z[1, :, 2, 5], w[ids[1, 2 * 6 + 5]])
    img = vq.decode_tokens(ids)
    assert img.shape == (2, 3, 12, 12) and img.abs().max() <= 1


def official_vq_file_dict(vq):
    """Our VQ weights plus what the official file also holds: encoder, quant_conv, the usage buffer."""
    sd = dict(vq.state_dict())
    sd["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    sd["quant_conv.weight"] = torch.randn(8, 32, 1, 1)
    sd["quant_conv.bias"] = torch.zeros(8)
    sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


@pytest.mark.parametrize("fmt", ["pt_model", "pt_raw_freqs", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    pipe = tiny_pipe(seed=3)
    sd = dict(pipe.gpt.state_dict())
    assert set(sd) == OFFICIAL_GPT_KEYS
    kw = {}
    if fmt == "pt_model":
        path = tmp_path / "c2i_T.pt"
        save_state_dict(sd, path, wrap="model")
        kw.update(image_size=6 * 16, n_head=4)   # a non-official width: the head count is not in the file
    elif fmt == "pt_raw_freqs":   # FSDP-style raw dict; grid read off the saved freqs_cis
        path = tmp_path / "c2i_T_fsdp.pt"
        sd["freqs_cis"] = official_freqs_cis(6, 16)
        save_state_dict(sd, path)
    else:
        path = tmp_path / "c2i_T.safetensors"
        save_state_dict(sd, path)
        kw.update(image_size=96, n_head=4)
    vq_path = tmp_path / "vq_ds16_c2i.pt"
    save_state_dict(official_vq_file_dict(pipe.vq), vq_path, wrap="model")
    loaded = LlamaGenPipeline.from_checkpoints(gpt=path, vq=vq_path, backend="torch", **kw)
    assert loaded.cfg == pipe.cfg
    a = pipe([4, 0], seed=2, zipar_window=2, top_k=30)
    b = loaded([4, 0], seed=2, zipar_window=2, top_k=30)
    assert torch.equal(pipe.last_tokens, loaded.last_tokens) and torch.equal(a, b)


def test_bad_checkpoints_name_the_key(tmp_path):
    pipe = tiny_pipe()
    vq_path = tmp_path / "vq.pt"
    save_state_dict(official_vq_file_dict(pipe.vq), vq_path, wrap="model")
    cases = {
        "layers.1.feed_forward.w2.weight": lambda sd: sd.pop("layers.1.feed_forward.w2.weight"),
        "norm.weight": lambda sd: sd.__setitem__("norm.weight", torch.ones(65)),
        "layers.0.attention.kv_cache_x": lambda sd: sd.__setitem__("layers.0.attention.kv_cache_x", torch.ones(1)),
        "tok_embeddings.weight": lambda sd: sd.pop("tok_embeddings.weight"),
    }
    for key, edit in cases.items():
        sd = dict(pipe.gpt.state_dict())
        edit(sd)
        path = tmp_path / "gpt.pt"
        save_state_dict(sd, path, wrap="model")
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            LlamaGenPipeline.from_checkpoints(gpt=path, vq=vq_path, image_size=96, n_head=4)
    good = tmp_path / "good.pt"
    save_state_dict(pipe.gpt.state_dict(), good)
    with pytest.raises(CheckpointError, match="image_size"):      # no freqs_cis, no size in the name
        LlamaGenPipeline.from_checkpoints(gpt=good, vq=vq_path)
    vsd = official_vq_file_dict(pipe.vq)
    vsd["decoder.conv_out.bias"] = torch.zeros(4)
    save_state_dict(vsd, vq_path, wrap="model")
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias"):
        LlamaGenPipeline.from_checkpoints(gpt=good, vq=vq_path, image_size=96, n_head=4)


def test_bad_sampling_inputs_are_value_errors():
    pipe = tiny_pipe()
    for kw, msg in ((dict(class_labels=[10]), "outside"), (dict(class_labels=[-1]), "outside"),
                    (dict(class_labels=[]), "empty"), (dict(cfg=-0.5), "cfg"), (dict(top_p=0.0), "top_p"),
                    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(zipar_window=0), "zipar_window"),
                    (dict(zipar_window=7), "zipar_window"), (dict(temperature=-1.0), "temperature")):
        args = dict(class_labels=[1], seed=0)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            pipe(**args)
