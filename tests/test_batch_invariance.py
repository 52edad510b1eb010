"""An image's bytes depend only on (weights, settings, seed, image index): not on the batch it is drawn in (size,
composition, position), nor on where a `var-rt sample` run was interrupted and resumed.

What made them depend on it on the CPU, and what holds them to this now:
- the decoders: convs (oneDNN) pick algorithms by shape, so the same latent decoded in a batch of 1 and of 8 gave
  pixels off by 1 here and there -> decoded in fixed-size chunks (pipeline_base.DECODE_CHUNK);
- VAR's residual-VQ reference (torch backend): the Phi conv of a batch, and a channels_last layout at B > 1 only
  -> image by image, NCHW (ops.rvq.rvq_step_ref);
- the transformers' GEMMs: MKL computes a row differently for small row counts -> rows padded to a multiple of 16
  on the CPU (ops.linear); the logits of an image are then bitwise equal whatever the batch (checked below).
"""
import os

import numpy as np
import pytest
import torch

from var_rt import cli, images
from var_rt.llamagen_pipeline import LlamaGenPipeline
from var_rt.models import llamagen, vq16
from var_rt.models import vqvae as vqvae_model
from var_rt.ops import mix_seed
from var_rt.pipeline import VARPipeline
from var_rt.pipeline_base import decode_in_chunks

from conftest import tiny_var
from test_sample import run_module, sample_args

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8
LABELS = [i % 10 for i in range(N)]
SEEDS = [mix_seed(3, i) for i in range(N)]


# Decoders deep enough (4-5 levels) that decoding a latent alone or in a batch of 8 in one call gave different
# pixels on the CPU before the fix (the 16 px tiny_vae() of conftest does not show it).
VAE_CFG = vqvae_model.VQVAEConfig(vocab=48, cvae=8, ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1)   # 64 px
VQ_CFG = vq16.VQ16Config(codebook_size=64, embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def _vae():
    return vqvae_model.init_random_(vqvae_model.VQVAE(VAE_CFG), 0).eval().requires_grad_(False)


def _var(backend):
    return VARPipeline(_vae(), var=tiny_var(), backend=backend)


def _code(backend):
    return VARPipeline(_vae(), drafter=tiny_var(depth=2), refiner=tiny_var(depth=1, seed=1), draft_steps=2,
                       backend=backend)


def _llamagen(backend):
    # the fast backend runs its kernels in the Triton interpreter here (~50 ms a launch): a smaller model for it
    small = backend == "fast"
    cfg = llamagen.LlamaGenConfig(dim=64, n_layer=1 if small else 2, n_head=4, vocab_size=64, num_classes=10,
                                  grid=4 if small else 6)
    return LlamaGenPipeline.random(cfg, std=0.3, backend=backend, vq_config=VQ_CFG)


FAMILIES = {  # name -> (pipeline maker, sampling keywords, the module whose output is the logits)
    "var": (_var, dict(top_k=20, cfg=3.0), lambda p: p.models["main"].head),
    "code": (_code, dict(top_k=20, top_p=0.9, cfg=3.0), lambda p: p.models["refiner"].head),
    "llamagen": (_llamagen, dict(top_k=20, cfg=3.0), lambda p: p.gpt.output),
    "zipar": (_llamagen, dict(top_k=20, cfg=3.0, zipar_window=2), lambda p: p.gpt.output),
}


def _draw(pipe, kw, lo, hi):
    """Images lo..hi-1 of the set, in one call: (uint8 (n, H, W, 3), tokens (n, T))."""
    out = pipe(LABELS[lo:hi], seeds=SEEDS[lo:hi], **kw)
    tok = pipe.last_tokens
    tok = torch.cat(tok, 1) if isinstance(tok, list) else tok
    return images.to_uint8(out), tok.cpu()


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_1_3_8_give_the_same_bytes(family, backend):
    make, kw, _ = FAMILIES[family]
    pipe = make(backend)
    ref_img, ref_tok = _draw(pipe, kw, 0, N)
    for b in (3, 1):
        # batches of 3 (3 + 3 + 2: a padded last decoder chunk); alone: every image with the torch backend, three
        # of them with the fast one (its kernels run in the Triton interpreter here, ~50 ms a launch)
        starts = range(0, N, b) if b > 1 or backend == "torch" else (0, 5, 7)
        for lo in starts:
            hi = min(lo + b, N)
            img, tok = _draw(pipe, kw, lo, hi)
            assert torch.equal(tok, ref_tok[lo:hi]), f"batch {b}, images {lo}..{hi - 1}: tokens differ"
            diff = int((img != ref_img[lo:hi]).sum())
            assert img.tobytes() == ref_img[lo:hi].tobytes(), f"batch {b}, images {lo}..: {diff} uint8 values differ"
    if backend == "fast":
        return
    # a different composition: the same images in reverse order, in one batch
    rev = list(range(N))[::-1]
    out = pipe([LABELS[i] for i in rev], seeds=[SEEDS[i] for i in rev], **kw)
    assert images.to_uint8(out)[::-1].tobytes() == ref_img.tobytes()


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("family", ["var", "code", "llamagen"])
def test_logits_of_an_image_do_not_depend_on_the_batch(family, backend):
    """Stronger than equal tokens (a draw flips only near a tie): the logits themselves are bitwise equal."""
    make, kw, head = FAMILIES[family]
    pipe = make(backend)

    def logits(lo, hi):
        got = []
        h = head(pipe).register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
        try:
            pipe(LABELS[lo:hi], seeds=SEEDS[lo:hi], **kw)
        finally:
            h.remove()
        return got

    big, one = logits(0, N), logits(2, 3)  # image 2 in a batch of 8, and alone
    assert len(big) == len(one) > 0
    for step, (a, b) in enumerate(zip(big, one)):
        # rows: conditional then unconditional (CFG); image 2's are rows 2 and N + 2 of the batch of 8
        assert torch.equal(torch.stack([a[2], a[N + 2]]), b), f"step {step}"


def _latents(pipe, n=N, seed=0):
    """Random decoder inputs: VAR f_hat (n, Cvae, h, w) ~ N(0, 1) (pixels away from saturation, where a last-bit
    difference shows in the uint8 values), or LlamaGen token ids (n, h*w)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(pipe, VARPipeline):
        h = pipe.cfg.patch_nums[-1]
        return torch.randn(n, pipe.vae.cfg.cvae, h, h, generator=g)
    return torch.randint(0, pipe.cfg.vocab_size, (n, pipe.cfg.grid ** 2), generator=g)


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_decode_alone_or_in_any_batch_gives_the_same_bytes(family, backend):
    """The decoder alone, on inputs whose pixels are not saturated: before decoding in fixed chunks, a batch of 1
    and a batch of 8 gave different uint8 values here (VAR's 64 px VQVAE: 9 of 98,304 with torch, 16 with fast)."""
    pipe = FAMILIES[family][0](backend)
    x = _latents(pipe)
    ref = images.to_uint8(pipe.decode(x))
    for b in (1, 3):
        got = np.concatenate([images.to_uint8(pipe.decode(x[i:i + b])) for i in range(0, N, b)])
        assert got.tobytes() == ref.tobytes(), f"batch {b}: {int((got != ref).sum())} uint8 values differ"


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_decoder_chunks_position_and_padding_do_not_change_an_image(chunk):
    """decode_in_chunks: an image decodes to the same bytes alone (padded), at any position of a full chunk, and in
    a padded last chunk."""
    pipe = _var("torch")
    pipe.decode_chunk = chunk
    f = _latents(pipe)
    ref = images.to_uint8(pipe.decode(f))
    for perm in (list(range(N))[::-1], [3, 0, 7, 1, 6, 2, 5, 4]):
        got = images.to_uint8(pipe.decode(f[perm]))
        assert got.tobytes() == ref[perm].tobytes()
    for i in range(N):
        assert images.to_uint8(pipe.decode(f[i:i + 1])).tobytes() == ref[i:i + 1].tobytes()
    calls = []
    decode_in_chunks(lambda x: calls.append(tuple(x.shape)) or x, f[:5], 4)
    assert calls == [(4, *f.shape[1:])] * 2  # every decoder call has the chunk's shape, the last one padded


def test_default_decode_chunk_per_device_and_size():
    from var_rt.pipeline_base import decode_chunk_size
    assert decode_chunk_size("cpu", 256) == 1 and decode_chunk_size("cpu", 32) == 4
    assert decode_chunk_size("cuda", 256) == 8 and decode_chunk_size("cuda", 16) == 8
    assert _var("torch").decode_chunk == 4  # 64 px images


# ---- `var-rt sample`: resume point and --batch --------------------------------------------------------------------
def _npz_bytes(out):
    with open(str(out) + ".npz", "rb") as f:
        return f.read()


def test_sample_npz_is_byte_identical_across_batch_and_resume(tmp_path, tiny_files):
    ref = tmp_path / "ref"
    assert cli.main(sample_args(tiny_files, ref, "--batch", "4", "--quiet")) == 0
    want = _npz_bytes(ref)
    for b in (1, 5, 6):
        out = tmp_path / f"b{b}"
        assert cli.main(sample_args(tiny_files, out, "--batch", str(b), "--quiet")) == 0
        assert _npz_bytes(out) == want, f"--batch {b}"
    # killed after 3 images (inside the first batch of 4), then resumed: the rest is drawn as a batch of 3
    out = tmp_path / "resumed"
    r = run_module(sample_args(tiny_files, out, "--batch", "4", "--quiet"), env={"VAR_RT_TEST_CRASH_AFTER": "3"})
    assert r.returncode == 17, r.stderr
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 3
    r = run_module(sample_args(tiny_files, out, "--batch", "4", "--quiet"))
    assert r.returncode == 0, r.stderr
    assert _npz_bytes(out) == want
    assert np.array_equal(np.load(str(out) + ".npz")["arr_0"], np.load(str(ref) + ".npz")["arr_0"])
