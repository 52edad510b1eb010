"""Checkpoints in the official key names and formats load strictly through the user's code path."""
import pytest
import torch

from var_rt import checkpoint
from var_rt.loaders import load_var, load_vqvae
from var_rt.pipeline import VARPipeline

from conftest import official_vae_state_dict, official_var_state_dict, tiny_vae, tiny_var

# From FoundationVision/VAR models/var.py + basic_var.py: the keys of `VAR(depth=2, shared_aln=False).state_dict()`.
OFFICIAL_VAR_KEYS_D2 = {
    "pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking",
    "word_embed.weight", "word_embed.bias", "class_emb.weight", "lvl_embed.weight",
    "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
} | {f"blocks.{i}.{k}" for i in range(2) for k in (
    "attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias", "attn.mat_qkv.weight",
    "attn.proj.weight", "attn.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
    "ada_lin.1.weight", "ada_lin.1.bias")}
# shared AdaLN (VAR-d36-s): per block `ada_gss` instead of `ada_lin`, plus one `shared_ada_lin`.
OFFICIAL_VAR_KEYS_D2_SHARED = {k for k in OFFICIAL_VAR_KEYS_D2 if ".ada_lin.1." not in k or k.startswith("head_nm")} \
    | {"blocks.0.ada_gss", "blocks.1.ada_gss", "shared_ada_lin.1.weight", "shared_ada_lin.1.bias"}
# From models/vqvae.py, quant.py, basic_vae.py (decoder ch_mult=(1,2,2), num_res_blocks=1, attention at the lowest res).
OFFICIAL_VAE_DECODER_KEYS = {
    "quantize.embedding.weight", "post_quant_conv.weight", "post_quant_conv.bias",
    "decoder.conv_in.weight", "decoder.conv_out.weight", "decoder.norm_out.weight", "decoder.mid.attn_1.qkv.weight",
    "decoder.mid.attn_1.proj_out.bias", "decoder.mid.block_2.norm2.bias", "decoder.up.2.attn.1.norm.weight",
    "decoder.up.2.block.1.conv2.weight", "decoder.up.1.block.0.conv1.weight", "decoder.up.0.block.0.nin_shortcut.weight",
    "decoder.up.1.upsample.conv.weight", "decoder.up.2.upsample.conv.bias",
} | {f"quantize.quant_resi.qresi_ls.{i}.{w}" for i in range(4) for w in ("weight", "bias")}


def test_key_names_are_the_official_ones():
    assert set(official_var_state_dict(tiny_var())) == OFFICIAL_VAR_KEYS_D2
    assert set(official_var_state_dict(tiny_var(shared_aln=True))) == OFFICIAL_VAR_KEYS_D2_SHARED
    keys = set(tiny_vae().state_dict())
    assert OFFICIAL_VAE_DECODER_KEYS <= keys
    assert "decoder.up.0.upsample.conv.weight" not in keys  # level 0 has no upsample in the official tree


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors"])
def test_round_trip_through_files(tmp_path, fmt):
    var, vae = tiny_var(seed=3), tiny_vae(seed=4)
    sd_var, sd_vae = official_var_state_dict(var), official_vae_state_dict(vae)
    if fmt == "safetensors":
        vp, ap = tmp_path / "var.safetensors", tmp_path / "vae.safetensors"
        checkpoint.save_state_dict(sd_var, vp)
        checkpoint.save_state_dict(sd_vae, ap)
    else:
        vp, ap = tmp_path / "var.pth", tmp_path / "vae.pth"
        wrap = "model" if fmt == "wrapped" else None
        checkpoint.save_state_dict(sd_var, vp, wrap=wrap)
        checkpoint.save_state_dict(sd_vae, ap, wrap=wrap)
    pipe = VARPipeline.from_checkpoints(var=vp, vae=ap, dtype="fp32")
    assert pipe.cfg == var.cfg and pipe.vae.cfg == vae.cfg
    want = VARPipeline(vae, var=var)([1, 2], seed=0)
    assert torch.equal(pipe([1, 2], seed=0), want)


def test_dtype_cast_on_load_keeps_latent_side_fp32(tiny_files):
    m = load_var(tiny_files["var"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    v = load_vqvae(tiny_files["vae"], dtype=torch.float16)
    assert v.quantize.embedding.weight.dtype == torch.float32 and v.post_quant_conv.weight.dtype == torch.float32
    assert v.decoder.conv_in.weight.dtype == torch.float16
    pipe = VARPipeline.from_checkpoints(var=tiny_files["var"], vae=tiny_files["vae"], dtype="bf16")
    im = pipe([0], seed=0)
    assert im.dtype == torch.float32 and torch.isfinite(im).all()


def test_every_problem_is_reported_at_once(tmp_path, tiny_files):
    sd = official_var_state_dict(tiny_files["var_model"])
    del sd["head.bias"]
    sd["blocks.1.ffn.fc1.weight"] = torch.zeros(3, 3)
    sd["blocks.0.attn.extra_thing"] = torch.zeros(1)
    p = tmp_path / "broken.pth"
    torch.save(sd, p)
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_var(p)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "head.bias" in msg
    assert "unexpected keys (1)" in msg and "blocks.0.attn.extra_thing" in msg
    assert "blocks.1.ffn.fc1.weight: expected [256, 64], found [3, 3]" in msg


def test_wrong_family_and_missing_file(tmp_path, tiny_files):
    with pytest.raises(checkpoint.CheckpointError, match="is a VAR VQVAE checkpoint; expected a VAR transformer"):
        load_var(tiny_files["vae"])
    with pytest.raises(checkpoint.CheckpointError, match="is a VAR transformer checkpoint; expected a VAR VQVAE"):
        load_vqvae(tiny_files["var"])
    with pytest.raises(FileNotFoundError):
        load_var(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError):
        load_var(junk)


def test_config_is_read_off_the_file(tmp_path):
    from var_rt.models.var import PATCH_NUMS_512
    var = tiny_var(depth=3, shared_aln=True, patch_nums=PATCH_NUMS_512)  # a tiny "d36-s": 512 px pyramid
    p = tmp_path / "d36s.pth"
    torch.save(official_var_state_dict(var), p)
    m = load_var(p)
    assert m.cfg == var.cfg and m.cfg.shared_aln and m.cfg.patch_nums == PATCH_NUMS_512


def test_load_does_not_keep_a_second_copy(tiny_files):
    """Models are built on meta and assigned tensor by tensor: parameters are the cast file tensors."""
    m = load_var(tiny_files["var"], dtype=torch.float32)
    assert not any(p.is_meta for p in m.parameters())
