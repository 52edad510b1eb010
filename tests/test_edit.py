"""VAR zero-shot editing (var_rt.editing, VARPipeline.edit, `var-rt edit`).

The encoder and the multi-scale tokenisation are checked against an independent restatement written here from
the official code (FoundationVision/VAR models/basic_vae.py Encoder, vqvae.py img_to_idxBl, quant.py
VectorQuantizer2.f_to_idxBl_or_fhat), on a raw state dict with the official key names that this file generates
itself (so a wrong module tree in var_rt fails the strict load).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import official_var_state_dict, tiny_var, tiny_vae
from official_ref import phi_conv

from var_rt import checkpoint, editing
from var_rt.images import to_uint8
from var_rt.models import vqvae as vqvae_model
from var_rt.pipeline import VARPipeline

PN = (1, 2, 4, 8)  # 8x8 latent, 32 px images with the tiny VQVAE (downsample 4)
SAMP = dict(cfg=1.5, top_k=0, top_p=0.9)


# ---- an official-format VQVAE file with a full encoder, and the independent reference -----------------------------
def official_encoder_sd(cfg, seed=0):
    """Random `encoder.*` + `quant_conv.*` tensors, named and shaped as the official Encoder(ch, ch_mult,
    num_res_blocks, using_sa, using_mid_sa, z_channels=Cvae) and quant_conv (3x3) of VQVAE."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cin, cout, k):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        sd[name + ".bias"] = 0.1 * torch.randn(cout, generator=g)

    def norm(name, c):
        sd[name + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)

    def res(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        conv(name + ".qkv", c, 3 * c, 1)
        conv(name + ".proj_out", c, c, 1)
    conv("encoder.conv_in", 3, cfg.ch, 3)
    block_in, last = cfg.ch, len(cfg.ch_mult) - 1
    for i, m in enumerate(cfg.ch_mult):
        for j in range(cfg.num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", block_in, cfg.ch * m)
            block_in = cfg.ch * m
            if i == last and cfg.using_sa:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    res("encoder.mid.block_1", block_in, block_in)
    if cfg.using_mid_sa:
        attn("encoder.mid.attn_1", block_in)
    res("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, cfg.cvae, 3)
    conv("quant_conv", cfg.cvae, cfg.cvae, 3)
    return sd


def ref_tokens(sd, img01, patch_nums):
    """Official img_to_idxBl, restated: tokens [(B, pn^2)] and f_hat, from the raw state dict `sd`."""
    def conv(name, h, stride=1, pad=1):
        return F.conv2d(h, sd[name + ".weight"], sd[name + ".bias"], stride=stride, padding=pad)

    def gn(name, h):
        return F.group_norm(h, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def res(name, h):
        t = conv(name + ".conv1", F.silu(gn(name + ".norm1", h)))
        t = conv(name + ".conv2", F.silu(gn(name + ".norm2", t)))
        return (conv(name + ".nin_shortcut", h, pad=0) if name + ".nin_shortcut.weight" in sd else h) + t

    def attn(name, h):
        B, C, H, W = h.shape
        q, k, v = conv(name + ".qkv", gn(name + ".norm", h), pad=0).reshape(B, 3, C, H * W).unbind(1)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)  # (B, HW_q, HW_k)
        return h + conv(name + ".proj_out", torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W), pad=0)

    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    h = conv("encoder.conv_in", img01 * 2 - 1)
    for i in range(levels):
        j = 0
        while f"encoder.down.{i}.block.{j}.conv1.weight" in sd:
            h = res(f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.qkv.weight" in sd:
                h = attn(f"encoder.down.{i}.attn.{j}", h)
            j += 1
        if i != levels - 1:
            h = conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, pad=0)
    h = res("encoder.mid.block_1", h)
    if "encoder.mid.attn_1.qkv.weight" in sd:
        h = attn("encoder.mid.attn_1", h)
    h = res("encoder.mid.block_2", h)
    f = conv("quant_conv", conv("encoder.conv_out", F.silu(gn("encoder.norm_out", h))))
    # VectorQuantizer2.f_to_idxBl_or_fhat, using_znorm=False
    E = sd["quantize.embedding.weight"]
    B, C, H, _ = f.shape
    K = len(patch_nums)
    f_rest, f_hat, out = f.clone(), torch.zeros_like(f), []
    for si, pn in enumerate(patch_nums):
        z = F.adaptive_avg_pool2d(f_rest, pn) if si != K - 1 else f_rest
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = torch.cdist(z, E).argmin(1)
        out.append(idx.view(B, pn * pn))
        hh = E[idx].view(B, pn, pn, C).permute(0, 3, 1, 2)
        if si != K - 1:
            hh = F.interpolate(hh, size=(H, H), mode="bicubic")
        w, b = phi_conv(sd, si, K)
        hh = 0.5 * hh + 0.5 * F.conv2d(hh, w, b, padding=1)
        f_hat, f_rest = f_hat + hh, f_rest - hh
    return out, f_hat


def vae_file(path, vae, encoder=True, seed=0, extra=None, drop=()):
    sd = dict(vae.state_dict())
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(len(PN), vae.cfg.vocab)
    if encoder:
        sd.update(official_encoder_sd(vae.cfg, seed))
    sd.update(extra or {})
    for k in drop:
        sd.pop(k)
    torch.save(sd, path)
    return sd


def make_images(n=2, seed=0, size=32):
    """Smooth random images in [0, 1] (not noise: the tokens then carry structure)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear").clamp(0, 1)


@pytest.fixture
def files(tmp_path):
    var, vae = tiny_var(patch_nums=PN), tiny_vae()
    ref = tiny_var(seed=1, patch_nums=PN, depth=1)
    paths = {"var": tmp_path / "var.pth", "ref": tmp_path / "ref.pth", "vae": tmp_path / "vae.pth"}
    torch.save(official_var_state_dict(var), paths["var"])
    torch.save(official_var_state_dict(ref), paths["ref"])
    sd = vae_file(paths["vae"], vae)
    return paths, sd


def corner_mask(n=2, size=32, side=8):
    m = torch.zeros(n, 1, size, size)
    m[..., :side, :side] = 1
    return m


# ---- (g) the tokenisation, (e) loading only on edit -------------------------------------------------------------
def test_encoder_tokens_match_reference(files, one_thread):
    paths, sd = files
    pipe = VARPipeline.from_checkpoints(var=paths["var"], vae=paths["vae"])
    assert pipe.vae.encoder is None and pipe.vae.quant_conv is None  # a normal load does not hold it
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in pipe.vae.state_dict())
    editing.ensure_encoder(pipe.vae)
    x = make_images(3)
    tokens, f_hat = editing.encode_tokens(pipe.vae, x, PN)
    want, want_fhat = ref_tokens({k: v.float() for k, v in sd.items()}, x, PN)
    for s, (a, b) in enumerate(zip(tokens, want)):
        assert torch.equal(a, b), f"scale {s}: {(a != b).sum()} tokens differ"
    assert len(set(tokens[-1].flatten().tolist())) > 4  # the test sees real structure, not one code everywhere
    torch.testing.assert_close(f_hat, want_fhat, atol=1e-5, rtol=1e-5)


def test_encoder_loaded_only_on_edit(tmp_path, one_thread):
    var, vae = tiny_var(patch_nums=PN), tiny_vae()
    torch.save(official_var_state_dict(var), tmp_path / "var.pth")
    vae_file(tmp_path / "no_enc.pth", vae, encoder=False)
    pipe = VARPipeline.from_checkpoints(var=tmp_path / "var.pth", vae=tmp_path / "no_enc.pth")
    img = pipe([1, 2], seed=0, **SAMP)  # generation needs no encoder
    assert img.shape == (2, 3, 32, 32) and pipe.vae.encoder is None
    with pytest.raises(checkpoint.CheckpointError) as e:
        pipe.edit(make_images(2), corner_mask(2), [1, 2], **SAMP)
    msg = str(e.value)
    n = len(official_encoder_sd(vae.cfg))
    assert "\n" not in msg and f"missing keys ({n}): encoder.conv_in.bias, encoder.conv_in.weight" in msg
    assert "no_enc.pth" in msg and pipe.vae.encoder is None
    # strict: an unexpected encoder key and a mis-shaped one are named too
    vae_file(tmp_path / "bad.pth", vae, extra={"encoder.extra.weight": torch.zeros(3),
                                                "quant_conv.weight": torch.zeros(8, 8, 1, 1)})
    pipe = VARPipeline.from_checkpoints(var=tmp_path / "var.pth", vae=tmp_path / "bad.pth")
    with pytest.raises(checkpoint.CheckpointError) as e:
        pipe.edit(make_images(1), corner_mask(1), [1], **SAMP)
    msg = str(e.value)
    assert "unexpected keys (1): encoder.extra.weight" in msg and "quant_conv.weight: expected [8, 8, 3, 3]" in msg


# ---- (a), (b), (c): forced tokens, untouched region, all-one mask ----------------------------------------------
def affected_cells(keep, patch_nums, H):
    """Latent cells whose f_hat can change when the tokens with keep False are redrawn: a bicubic upsample from pn
    to H reads source indices floor(u)-1 .. floor(u)+2 (clamped), u = (x + 0.5) pn / H - 0.5; Phi's 3x3 conv
    reads one cell around. keep: [(B, pn^2) bool] -> (B, H, H) bool."""
    B = keep[0].shape[0]
    out = torch.zeros(B, H, H, dtype=torch.bool)
    for k, pn in zip(keep, patch_nums):
        A = torch.zeros(H, pn)
        for x in range(H):
            u = math.floor((x + 0.5) * pn / H - 0.5) if pn != H else x
            for j in (range(u - 1, u + 3) if pn != H else [u]):
                A[x, min(max(j, 0), pn - 1)] = 1
        regen = (~k).float().view(B, pn, pn)
        hit = (A @ regen @ A.T) > 0
        out |= F.max_pool2d(hit.float().unsqueeze(1), 3, 1, 1).squeeze(1).bool()
    return out


def test_edit_forces_tokens_and_keeps_the_rest(files, one_thread):
    paths, sd = files
    pipe = VARPipeline.from_checkpoints(var=paths["var"], vae=paths["vae"])
    x, m = make_images(2, seed=1), corner_mask(2)
    m[1] = 0
    m[1, :, 24:, 20:] = 1  # another region for the second image
    f_hat = editing.edit_latents(pipe, x, m, [3, 5], seed=0, **SAMP)
    toks = [t.clone() for t in pipe.last_tokens]
    want, want_fhat = ref_tokens({k: v.float() for k, v in sd.items()}, x, PN)
    keep = editing.token_keep_masks(m, PN)
    # the rule: regenerated iff more than half of the token's pixels are masked (counted here directly)
    for k, pn in zip(keep, PN):
        for i in range(2):
            for t in range(pn * pn):
                r, c = divmod(t, pn)
                win = m[i, 0, r * 32 // pn:(r + 1) * 32 // pn, c * 32 // pn:(c + 1) * 32 // pn]
                assert bool(k[i, t]) == (float(win.mean()) <= 0.5)
    # (a) outside the mask every scale's tokens are the encoder's
    for s in range(len(PN)):
        assert torch.equal(toks[s][keep[s]], want[s][keep[s]]), f"scale {s}"
    assert sum(int((~k).sum()) for k in keep) > 0 and sum(int(k.sum()) for k in keep) > 0
    assert any(not torch.equal(toks[s][~keep[s]], want[s][~keep[s]]) for s in range(len(PN)))  # a real edit
    # (b) latents: bit for bit the encoder's wherever no redrawn token reaches (up to fp32 rounding of two code paths)
    far = affected_cells(keep, PN, 8).logical_not().unsqueeze(1).expand_as(f_hat)
    assert all(float(far[i].float().mean()) > 0.1 for i in range(2))
    torch.testing.assert_close(f_hat[far], want_fhat[far], atol=1e-5, rtol=1e-5)
    assert (f_hat - want_fhat).abs().amax() > 1e-2  # and the edit changed something
    # pixels: the edit decodes as the pipeline decodes; paste=True puts the input back outside the mask exactly
    out = pipe.edit(x, m, [3, 5], seed=0, **SAMP)
    assert torch.equal(out, pipe.decode(f_hat))
    pasted = pipe.edit(x, m, [3, 5], seed=0, paste=True, **SAMP)
    assert torch.equal(pasted[m.expand_as(x) == 0], x[m.expand_as(x) == 0])
    assert torch.equal(pasted[m.expand_as(x) == 1], out[m.expand_as(x) == 1])
    # batch independence: the second image alone, same seed
    alone = pipe.edit(x[1:], m[1:], [5], seeds=[pipe_seed(1)], **SAMP)
    assert np.array_equal(to_uint8(alone), to_uint8(out[1:]))


def pipe_seed(i, seed=0):
    from var_rt import ops
    return ops.mix_seed(seed, i)


def test_all_ones_mask_is_ordinary_generation(files, one_thread):
    paths, _ = files
    for kw in (dict(var=paths["var"]), dict(drafter=paths["var"], refiner=paths["ref"], draft_steps=2)):
        pipe = VARPipeline.from_checkpoints(vae=paths["vae"], **kw)
        want = pipe([1, 7], seed=3, **SAMP)
        want_tokens = [t.clone() for t in pipe.last_tokens]
        got = pipe.edit(make_images(2), torch.ones(2, 32, 32, dtype=torch.bool), [1, 7], seed=3, **SAMP)
        assert np.array_equal(to_uint8(got), to_uint8(want)) and torch.equal(got, want), kw
        assert all(torch.equal(a, b) for a, b in zip(pipe.last_tokens, want_tokens))


def test_code_edit_forces_drafter_and_refiner(files, one_thread):
    paths, sd = files
    pipe = VARPipeline.from_checkpoints(drafter=paths["var"], refiner=paths["ref"], draft_steps=2, vae=paths["vae"])
    x, m = make_images(2, seed=2), corner_mask(2, side=16)
    out = pipe.edit(x, m, [0, 4], seed=1, **SAMP)
    assert out.shape == (2, 3, 32, 32)
    want, _ = ref_tokens({k: v.float() for k, v in sd.items()}, x, PN)
    keep = editing.token_keep_masks(m, PN)
    for s in range(len(PN)):  # scales 0, 1 by the drafter, 2, 3 by the refiner
        assert torch.equal(pipe.last_tokens[s][keep[s]], want[s][keep[s]]), f"scale {s}"
    assert not all(torch.equal(pipe.last_tokens[s], want[s]) for s in range(2, len(PN)))  # the refiner drew
    # an all-zero mask reproduces the encoder's tokens exactly: the image's VQVAE reconstruction
    pipe.edit(x, torch.zeros(2, 32, 32), [0, 4], seed=1, **SAMP)
    assert all(torch.equal(a, b) for a, b in zip(pipe.last_tokens, want))


def test_random_pipeline_and_bad_inputs(one_thread):
    from conftest import tiny_var_cfg, tiny_vae_cfg
    pipe = VARPipeline.random(tiny_var_cfg(patch_nums=PN), vae_cfg=tiny_vae_cfg())
    assert pipe.vae.encoder is None
    out = pipe.edit(make_images(1), corner_mask(1), [2], **SAMP)  # a random encoder is built on first use
    assert out.shape == (1, 3, 32, 32) and pipe.vae.encoder is not None
    x, m = make_images(1), corner_mask(1)
    cases = [
        ((make_images(1, size=16), m[..., :16, :16], [2]), "images are 16x16 px; this model makes 32x32"),
        ((x, m, [2, 3]), "1 images for 2 class labels"),
        ((x, m[..., :16], [2]), "masks are 16x32 px"),
        ((x * 2, m, [2]), "in [0, 1]"),
        ((x, m * 3, [2]), "masks: values must be in [0, 1]"),
        ((x[0], m, [2]), "expected (B, 3, H, W)"),
        ((x, m, [11]), "outside [0, 11)"),
    ]
    for args, text in cases:
        with pytest.raises(ValueError) as e:
            pipe.edit(*args, **SAMP)
        assert text in str(e.value) and "\n" not in str(e.value), (text, str(e.value))
    pipe.edit(x, m, [10], **SAMP)  # class 10 = num_classes: the null class, unconditional inpainting


# ---- (f) the command line -----------------------------------------------------------------------------------------
def test_cli_edit_round_trip(files, tmp_path, capsys, one_thread):
    from PIL import Image

    from var_rt.cli import main
    paths, _ = files
    x = make_images(1, seed=4)
    img = to_uint8(x)[0]
    Image.fromarray(img).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "sub" / "out.png"
    args = ["edit", "--var", str(paths["var"]), "--vae", str(paths["vae"]), "--image", str(tmp_path / "in.png"),
            "--mask", str(tmp_path / "mask.png"), "--classes", "6", "--seed", "2", "--cfg", "1.5", "--top-k", "0",
            "--top-p", "0.9", "-q", "--out", str(out)]
    assert main(args) == 0
    got = np.asarray(Image.open(out).convert("RGB"))
    pipe = VARPipeline.from_checkpoints(var=paths["var"], vae=paths["vae"])
    m = torch.from_numpy(mask.astype(np.float32) / 255).unsqueeze(0)
    want = pipe.edit(torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0), m, [6], seed=2, **SAMP)
    assert np.array_equal(got, to_uint8(want)[0])
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp")]
    # an image of another size: one line, exit 2, nothing written
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "small.png")
    capsys.readouterr()
    bad = list(args)
    bad[bad.index(str(tmp_path / "in.png"))] = str(tmp_path / "small.png")
    bad[bad.index(str(out))] = str(tmp_path / "never.png")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "24x24 px; this model edits 32x32" in err, err
    assert not (tmp_path / "never.png").exists()


# ---- (b) on the trained demo model: pixels far from the mask ------------------------------------------------------
def test_demo_edit_keeps_pixels_far_from_the_mask(one_thread):
    """Latents far from the mask are bit-identical to the encoding (the test above); pixels there still move a
    little, because the decoder's GroupNorms (statistics over the whole map) and self-attention couple every
    position. On the trained demo VQVAE that coupling is weak: far from the mask the edit stays within 6/255 of the
    plain encode->decode (mean) while inside the mask it moves the image by several times more."""
    from var_rt.demo import models as dm
    from var_rt.demo.data import render
    pipe = dm.load_demo_var()
    x = torch.stack([torch.from_numpy(render(c, np.random.default_rng(c))).permute(2, 0, 1) for c in (0, 3)])
    m = torch.zeros(2, 1, 32, 32)
    m[..., :6, :6] = 1  # redraws tokens up to scale 4 (of 1, 2, 3, 4, 6, 8); the coarser ones keep the image's
    out = pipe.edit(x, m, [1, 9], seed=0, **dm.demo_sampling())
    keep = editing.token_keep_masks(m, pipe.cfg.patch_nums)
    tokens, f_enc = editing.encode_tokens(pipe.vae, x, pipe.cfg.patch_nums)
    recon = pipe.decode(f_enc)
    far_cells = affected_cells(keep, pipe.cfg.patch_nums, 8).logical_not()  # (B, 8, 8) latent cells
    far = far_cells.repeat_interleave(4, 1).repeat_interleave(4, 2)
    far &= F.max_pool2d(m, 9, 1, 4).squeeze(1).eq(0)  # and a decoder conv's reach (4 px) away from the mask
    assert far.float().mean() > 0.2
    d = (out - recon).abs().mean(1)  # (B, H, W)
    inside = m.squeeze(1).bool()
    assert float(d[far].mean()) < 6 / 255, float(d[far].mean())
    assert float(d[inside].mean()) > 4 * float(d[far].mean()), (float(d[inside].mean()), float(d[far].mean()))
