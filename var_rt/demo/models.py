"""The shipped SHAPES-10 demo models (weights/): where the files are, how they load (through the same strict
`from_checkpoints` code as the official checkpoints), and the sampling settings `var-rt demo` uses.

The scripts that trained them are not installed: examples/shapes10/train_var.py (VQVAE, classifier, VAR drafter
and refiner) and examples/shapes10/train_llamagen.py (VQ + LlamaGen GPT) in the repository.
"""
from __future__ import annotations

import json
import os

import torch

from var_rt import ops
from var_rt.demo.data import NUM_CLASSES

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
TRAIN_VAR = "examples/shapes10/train_var.py"  # in the repository, not installed

# ---- VAR drafter / CoDe refiner + multi-scale VQVAE -------------------------------------------------------------
VAR_MANIFEST = "var_manifest.json"
# Demo settings, tuned on the trained models (drafter alone, 50 per class: cfg 1..3 x top_p 0.8..1 all gave
# 94-98% accuracy; cfg <= 2 with top_p 0.8 the lowest Frechet distance). Written to the manifest; read from there.
VAR_CODE_STEPS = (2, 4)
VAR_SAMPLING = dict(cfg=1.5, top_k=0, top_p=0.8, temperature=1.0)


def load_manifest(folder=WEIGHTS_DIR) -> dict:
    """The VAR demo manifest of `folder` ({} when there is none)."""
    path = os.path.join(folder, VAR_MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def demo_sampling(folder=WEIGHTS_DIR) -> dict:
    return dict(load_manifest(folder).get("sampling", VAR_SAMPLING))


def demo_code_steps(folder=WEIGHTS_DIR) -> tuple:
    return tuple(load_manifest(folder).get("code_steps", VAR_CODE_STEPS))


def load_demo_var(draft_steps=None, folder=WEIGHTS_DIR, device="cpu", dtype="fp32"):
    """VARPipeline on the shipped files: the drafter alone (draft_steps None) or CoDe drafter -> refiner."""
    from var_rt.pipeline import VARPipeline
    f = {n: os.path.join(folder, n + ".safetensors") for n in ("vae", "var_drafter", "var_refiner")}
    for n, p in f.items():
        if not os.path.isfile(p) and (n != "var_refiner" or draft_steps is not None):
            raise FileNotFoundError(f"demo weights missing: {p} (train: python {TRAIN_VAR}, in the repository)")
    if draft_steps is None:
        return VARPipeline.from_checkpoints(var=f["var_drafter"], vae=f["vae"], device=device, dtype=dtype)
    return VARPipeline.from_checkpoints(drafter=f["var_drafter"], refiner=f["var_refiner"], vae=f["vae"],
                                        draft_steps=draft_steps, device=device, dtype=dtype)


def sample_classes(pipe, n_per_class: int, seed=0, batch=100, **sampling):
    """n_per_class images of every class, classes interleaved like make_dataset. (images01, labels)."""
    labels = torch.arange(NUM_CLASSES).repeat(n_per_class)
    out = []
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch]
        out.append(pipe(lab, seeds=[ops.mix_seed(seed, int(j)) for j in range(i, i + len(lab))], **sampling))
    return torch.cat(out), labels


# ---- LlamaGen GPT + single-scale VQ (VQ-16 family) ---------------------------------------------------------------
GPT_FILE, VQ_FILE, LLAMAGEN_MANIFEST = "llamagen_gpt.safetensors", "llamagen_vq.safetensors", "llamagen_manifest.json"
LLAMAGEN_ZIPAR_WINDOWS = (2, 4)                                     # 8 tokens per row; 8 = sequential
LLAMAGEN_SAMPLING = dict(cfg=3.0, top_k=0, top_p=0.9, temperature=1.0)   # chosen on the classifier (see the manifest)


def load_demo_llamagen(device="cpu", dtype=torch.float32, backend=None, weights_dir=None):
    """The shipped demo GPT + VQ (a LlamaGenPipeline), loaded by the same strict code as the official checkpoints."""
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    d = weights_dir or WEIGHTS_DIR
    return LlamaGenPipeline.from_checkpoints(gpt=os.path.join(d, GPT_FILE), vq=os.path.join(d, VQ_FILE),
                                             device=device, dtype=dtype, backend=backend)
