"""The embedded VAR demo models (var_rt/demo/weights): they load through the user's checkpoint code, sample
recognisable SHAPES-10 images, and CoDe keeps the drafter's quality. Also the training code itself: its
teacher-forced forward equals the inference forward (values and gradients) and a tiny run writes loadable files.

Limits below are measured baselines (values beside them); sampling is seeded, so on the same torch build the
numbers repeat exactly, and the margins cover other builds' float differences.
"""
import os

import pytest
import torch

from example_scripts import load_example
from var_rt import cli
from var_rt.demo import classifier
from var_rt.models import var as var_model

tv = load_example("shapes10/train_var")  # examples/shapes10/train_var.py (re-exports var_rt.demo.models' loaders)

W = tv.WEIGHTS_DIR
N_PER_CLASS = 30  # 300 images per method


def test_shipped_files_and_sizes():
    names = ["vae.safetensors", "var_drafter.safetensors", "var_refiner.safetensors", "classifier.safetensors"]
    sizes = {n: os.path.getsize(os.path.join(W, n)) for n in names}
    assert sum(sizes.values()) <= 10 * 2**20, sizes
    man = tv.load_manifest()
    for key in ("dataset", "vae", "drafter", "refiner", "classifier", "sampling", "code_steps", "eval"):
        assert key in man, key


def test_shipped_weights_load_through_from_checkpoints():
    from var_rt.pipeline import VARPipeline
    f = {n: os.path.join(W, n + ".safetensors") for n in ("vae", "var_drafter", "var_refiner")}
    alone = VARPipeline.from_checkpoints(var=f["var_drafter"], vae=f["vae"], dtype="fp32")
    code = VARPipeline.from_checkpoints(drafter=f["var_drafter"], refiner=f["var_refiner"], vae=f["vae"],
                                        draft_steps=tv.demo_code_steps()[0], dtype="fp32")
    d, r = code.models["drafter"].cfg, code.models["refiner"].cfg
    assert d.patch_nums == r.patch_nums == tv.PATCH_NUMS and alone.image_size == code.image_size == 32
    assert (d.num_classes, d.vocab) == (10, tv.VAE_CFG.vocab)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(code.models["refiner"]) < 0.6 * n_params(code.models["drafter"])
    assert code.vae.cfg == tv.VAE_CFG


def test_classifier_on_real_heldout_data():
    x, y = classifier.real_images(100)
    assert classifier.accuracy(x, y) >= 0.98  # measured 1.000 (1000 held-out images)
    # the Frechet distance between two independent real sets is small; a shuffled-class set is far
    x2, _ = classifier.real_images(50, seed=classifier.HELDOUT_SEED + 1)
    assert classifier.frechet_distance(x[:500], x2) < 15  # measured 5.4
    blurred = torch.nn.functional.avg_pool2d(x2, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert classifier.frechet_distance(x[:500], blurred) > 200  # measured 1706


@pytest.fixture(scope="module")
def samples():
    samp = tv.demo_sampling()
    out = {}
    for n in (None, *tv.demo_code_steps()):
        imgs, labels = tv.sample_classes(tv.load_demo_var(n), N_PER_CLASS, seed=123, batch=150, **samp)
        out[n] = (imgs, labels)
    return out


def test_drafter_alone_accuracy(samples):
    imgs, labels = samples[None]
    assert imgs.shape == (300, 3, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    assert classifier.accuracy(imgs, labels) >= 0.8  # measured 0.983 (eval-demo, 50 per class, seed 0: 0.974)


def test_code_keeps_quality(samples):
    base = samples[None]
    acc0 = classifier.accuracy(*base)
    fd0 = classifier.frechet_distance(base[0], classifier.real_images(N_PER_CLASS)[0])
    for n in tv.demo_code_steps():
        imgs, labels = samples[n]
        acc = classifier.accuracy(imgs, labels)
        fd = classifier.frechet_distance(imgs, classifier.real_images(N_PER_CLASS)[0])
        # measured: drafter alone 0.983 / 386.1; CoDe N=2 0.980 / 312.0; CoDe N=4 0.970 / 377.4 (accuracy / FD)
        assert acc >= acc0 - 0.05, (n, acc, acc0)
        assert fd <= 1.3 * fd0, (n, fd, fd0)


def test_teacher_forward_matches_inference_forward_and_gradients():
    """Training runs `teacher_logits_fast`; `teacher_logits` goes through the inference model's forward_tokens
    (KV buffer writes, ops.var_attention block-causal). Same values and same gradients."""
    torch.manual_seed(0)
    cfg = var_model.VARConfig(depth=2, width=64, heads=2, vocab=32, cvae=8, num_classes=10, patch_nums=(1, 2, 3))
    m = var_model.init_random_(var_model.VAR(cfg), 0)
    for blk in m.blocks:  # non-trivial gammas, so every parameter matters
        torch.nn.init.normal_(blk.ada_lin[1].weight, std=0.05)
    labels, x_in = torch.tensor([1, 10, 3]), torch.randn(3, cfg.L - 1, cfg.cvae)
    target = torch.randint(0, cfg.vocab, (3, cfg.L))
    grads = []
    for fn in (tv.teacher_logits, tv.teacher_logits_fast):
        m.zero_grad()
        logits = fn(m, labels, x_in)
        torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), target.reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == {n for n, _ in m.named_parameters()}  # autograd reaches everything
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(tv.teacher_logits(m, labels, x_in), tv.teacher_logits_fast(m, labels, x_in))
    # block-causal: logits of scales 0-1 (positions 0..4) do not depend on the inputs of scale 2 (x_in[:, 4:])
    x2 = x_in.clone()
    x2[:, 4:] += 1
    with torch.no_grad():
        a, b = tv.teacher_logits(m, labels, x_in), tv.teacher_logits(m, labels, x2)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_tiny_training_run_writes_loadable_files(tmp_path):
    rc = tv.main(["--out", str(tmp_path), "--stages", "vae,drafter,refiner", "--vae-steps", "2",
                  "--drafter-steps", "2", "--refiner-steps", "2", "--var-images-per-class", "2"])
    assert rc == 0
    pipe = tv.load_demo_var(2, folder=str(tmp_path))
    imgs = pipe([0, 5], seed=0, top_k=0, top_p=1.0)
    assert imgs.shape == (2, 3, 32, 32)
    man = tv.load_manifest(str(tmp_path))
    assert man["drafter"]["steps"] == 2 and man["vae"]["steps"] == 2


def test_demo_command_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    rc = cli.main(["demo", "--methods", "var", "--samples", "1", "--classes", "0", "3", "--out", str(out)])
    assert rc == 0 and out.is_file()
    from PIL import Image
    w, h = Image.open(out).size
    assert h > 2 * 96 and w > 3 * 96
    text = capsys.readouterr().out
    assert "VAR drafter" in text and "CoDe N=" in text and str(out) in text


def test_eval_demo_command_prints_table(capsys):
    rc = cli.main(["eval-demo", "--methods", "var", "--samples-per-class", "2", "--batch", "10"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "frechet" in text and "VAR drafter" in text


def test_demo_without_llamagen_draws_var_columns(tmp_path, capsys, monkeypatch):
    from var_rt.demo import models
    monkeypatch.setattr(models, "GPT_FILE", "absent_llamagen_gpt.safetensors")  # as if the file were not shipped
    out = tmp_path / "d.png"
    assert cli.main(["demo", "--samples", "1", "--classes", "2", "--out", str(out)]) == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "VAR columns only" in text and "LlamaGen seq" not in text
