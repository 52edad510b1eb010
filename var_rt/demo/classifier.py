"""Quality scorer for the demo models: a small CNN trained on real SHAPES-10 images (shipped weights).

`accuracy(images01, labels)`: how often the classifier sees the asked class in generated images.
`frechet_distance(images01_a, images01_b)`: Frechet distance between Gaussians fitted to the classifier's
128-d pooled features (FID's formula, with this classifier instead of Inception).
`evaluate(name, images01, labels)`: both against real held-out SHAPES-10 images, as `var-rt eval-demo` prints.
All images are (N, 3, 32, 32) floats in [0, 1].

Retrain: `python -m var_rt.demo.classifier --out var_rt/demo/weights` (or as a stage of
examples/shapes10/train_var.py).
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from var_rt.demo.data import NUM_CLASSES, make_dataset

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "classifier.safetensors")
TRAIN_SEED, HELDOUT_SEED = 7001, 9001  # SHAPES-10 seeds: classifier training set, held-out reference set
FEATURES = 128


class ShapesNet(nn.Module):
    """(N, 3, 32, 32) in [0, 1] -> logits (N, 10); features() is the pooled 128-d vector before the head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, FEATURES, 3, padding=1)
        self.fc = nn.Linear(FEATURES, NUM_CLASSES)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01.float() * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)                      # (N, 32, 16, 16)
        x = F.max_pool2d(F.relu(self.conv3(F.relu(self.conv2(x)))), 2)   # (N, 64, 8, 8)
        return F.relu(self.conv4(x)).mean((2, 3))                        # (N, 128)

    def forward(self, x01):
        return self.fc(self.features(x01))


def _augment(x01: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter, so that the classifier judges shape and colour, not the exact pixel
    statistics of the renderer (generated images come through a VQVAE decoder and are a little soft)."""
    N = x01.shape[0]
    sigma = torch.rand(N, generator=g) * 1.0
    k = torch.arange(-2, 3, dtype=torch.float32)
    w = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)                                      # (N, 5) per-image Gaussian
    blur = torch.rand(N, generator=g) < 0.5
    y = x01
    for dim in (2, 3):
        pad = (0, 0, 2, 2) if dim == 2 else (2, 2, 0, 0)
        yp = F.pad(y, pad, mode="replicate")
        shifted = [yp.narrow(dim, i, y.shape[dim]) for i in range(5)]
        y = sum(w[:, i].view(N, 1, 1, 1) * shifted[i] for i in range(5))
    x = torch.where(blur.view(N, 1, 1, 1), y, x01)
    x = x * (1 + (torch.rand(N, 1, 1, 1, generator=g) - 0.5) * 0.2)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(N, 1, 1, 1, generator=g) * 0.05
    return x.clamp(0, 1)


def train(n_per_class=400, steps=900, batch=64, lr=2e-3, seed=0, log=print) -> tuple[ShapesNet, dict]:
    """Train on SHAPES-10 (seed TRAIN_SEED); returns the model and a record for the manifest."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = make_dataset(n_per_class, seed=TRAIN_SEED)
    x, y = torch.from_numpy(x).add(1).mul(0.5), torch.from_numpy(y)
    net = ShapesNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0, losses = time.time(), []
    perm, pos = torch.randperm(len(y), generator=g), 0
    for step in range(steps):
        if pos + batch > len(y):
            perm, pos = torch.randperm(len(y), generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(net(_augment(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log(f"classifier step {step + 1}/{steps} loss {sum(losses[-100:]) / 100:.4f} ({time.time() - t0:.0f} s)")
    net.eval().requires_grad_(False)
    xh, yh = real_images(100)
    acc = _accuracy(net, xh, yh)
    log(f"classifier: held-out accuracy {acc:.4f} ({time.time() - t0:.0f} s)")
    rec = {"train_data": {"n_per_class": n_per_class, "seed": TRAIN_SEED}, "steps": steps, "batch": batch, "lr": lr,
           "seed": seed, "final_loss": sum(losses[-100:]) / 100, "train_seconds": round(time.time() - t0, 1),
           "heldout": {"n_per_class": 100, "seed": HELDOUT_SEED, "accuracy": acc}}
    return net, rec


def save(net: ShapesNet, path: str = WEIGHTS) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().half() for k, v in net.state_dict().items()}, path)


_current = [WEIGHTS]  # the file accuracy() / features() use; use_weights() switches it (training to another folder)


def use_weights(path: str) -> None:
    _current[0] = path
    _real_features.cache_clear()


def load_classifier(path: str | None = None) -> ShapesNet:
    return _load(os.path.abspath(path or _current[0]))


@functools.lru_cache(maxsize=2)
def _load(path: str) -> ShapesNet:
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo classifier weights not found: {path} (train: python -m var_rt.demo.classifier)")
    net = ShapesNet()
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    return net.eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def real_images(n_per_class: int = 50, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Real held-out SHAPES-10: images (N, 3, 32, 32) in [0, 1], labels (N,)."""
    x, y = make_dataset(n_per_class, seed=seed)
    return torch.from_numpy(x).add(1).mul(0.5), torch.from_numpy(y)


@torch.no_grad()
def _batched(fn, x, bs=500):
    return torch.cat([fn(x[i:i + bs].float()) for i in range(0, len(x), bs)])


def _accuracy(net, images01, labels) -> float:
    pred = _batched(net, images01).argmax(1)
    return float((pred == torch.as_tensor(labels).view(-1)).float().mean())


def predict(images01: torch.Tensor) -> torch.Tensor:
    return _batched(load_classifier(), images01).argmax(1)


def accuracy(images01: torch.Tensor, labels) -> float:
    """Fraction of images the shipped classifier assigns to their label."""
    return _accuracy(load_classifier(), images01, labels)


def features(images01: torch.Tensor) -> torch.Tensor:
    """(N, 128) float64 classifier features."""
    return _batched(load_classifier().features, images01).double()


def _gaussian(f: torch.Tensor):
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / max(len(f) - 1, 1)


def frechet_from_features(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), all in float64 via symmetric eigendecompositions."""
    mu_a, sa = _gaussian(fa.double())
    mu_b, sb = _gaussian(fb.double())
    ev, U = torch.linalg.eigh(sa)
    sa_half = (U * ev.clamp_min(0).sqrt()) @ U.T
    cross = torch.linalg.eigvalsh(sa_half @ sb @ sa_half).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + sa.trace() + sb.trace() - 2 * cross)


def frechet_distance(images01_a: torch.Tensor, images01_b: torch.Tensor) -> float:
    return frechet_from_features(features(images01_a), features(images01_b))


@functools.lru_cache(maxsize=4)
def _real_features(n_per_class: int) -> torch.Tensor:
    return features(real_images(n_per_class)[0])


def evaluate(method: str, images01: torch.Tensor, labels, seconds: float | None = None, n_real_per_class=None) -> dict:
    """Accuracy and Frechet distance (vs real held-out SHAPES-10, as many per class as generated) of one method."""
    n = n_real_per_class or max(1, len(images01) // NUM_CLASSES)
    return {"method": method, "n": len(images01), "accuracy": accuracy(images01, labels),
            "frechet": frechet_from_features(features(images01), _real_features(n)), "seconds": seconds}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':28s} {'n':>5s} {'accuracy':>9s} {'frechet':>9s} {'time':>8s}"]
    for r in rows:
        t = f"{r['seconds']:.1f} s" if r.get("seconds") is not None else "-"
        lines.append(f"{r['method']:28s} {r['n']:5d} {r['accuracy']:9.3f} {r['frechet']:9.3f} {t:>8s}"
                     + (f"  {r['info']}" if r.get("info") else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the SHAPES-10 demo classifier")
    p.add_argument("--out", default=os.path.dirname(WEIGHTS))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    net, rec = train(seed=a.seed)
    save(net, os.path.join(a.out, "classifier.safetensors"))
    print(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
