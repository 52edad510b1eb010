"""`var-rt edit`: VAR / CoDe zero-shot editing of one image (inpainting, outpainting, class-conditional editing).

The mask is a PNG of the image's size, read as grayscale: white = regenerate, black = keep (gray: its fraction;
a token is regenerated when more than half of its pixels' mask is on, var_rt.editing). One output per --classes
id (the null class, num_classes, draws the region without a class): one class writes the edited image itself,
several a grid. Everything (model files, classes, sampling, the image and mask and their size) is checked before
the model is loaded.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from var_rt.cli.args import (UsageError, add_model_args, add_quiet, add_sampling_args, build_pipeline, check_model,
                             check_sampling, make_parent, sampling_kwargs)


def add_parser(sub) -> None:
    g = sub.add_parser("edit", help="zero-shot editing with a VAR / CoDe model: regenerate the masked region of an "
                                    "image (inpainting, outpainting, class-conditional editing)")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--image", required=True, help="the image to edit (PNG/JPEG, the model's size, e.g. 256x256)")
    g.add_argument("--mask", required=True, help="mask image of the same size: white = regenerate, black = keep")
    g.add_argument("--classes", type=int, nargs="+", required=True,
                   help="class id(s) to draw the masked region as, one output each (num_classes = no class)")
    g.add_argument("--paste", action="store_true", help="put the input's pixels back outside the mask")
    g.add_argument("--out", default="edit.png", help="PNG path (several classes: a grid)")
    add_quiet(g)
    g.set_defaults(fn=cmd_edit)


def read_image(path: str, option: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, or a one-line UsageError naming the option and the file."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{option} {path}: not a readable image ({type(e).__name__})") from None


def image_size_of(a, plan) -> int:
    """The image size of the model the arguments name, from the configs alone (nothing loaded)."""
    from var_rt import loaders
    if plan.random:
        cfgs, vae_cfg = plan.random[1], plan.random[2]
        cfg = next(iter(cfgs.values()))
    else:
        vae_cfg = loaders.inspect(a.vae, "vqvae", "--vae")
        cfg = loaders.inspect(a.var or a.drafter, "var", "--var" if a.var else "--drafter")
    return cfg.patch_nums[-1] * vae_cfg.downsample


def cmd_edit(a) -> int:
    from var_rt import images
    plan = check_model(a)
    if plan.family != "var":
        raise UsageError("edit: zero-shot editing is for VAR / CoDe models (--var, --drafter/--refiner, --model "
                         "var-*/code-*), not LlamaGen")
    bad = [c for c in a.classes if not 0 <= c <= plan.num_classes]
    if bad:
        raise UsageError(f"--classes: class ids {bad} outside [0, {plan.num_classes}] (this model has "
                         f"{plan.num_classes} classes; {plan.num_classes} = no class)")
    check_sampling(a, plan)
    img, mask = read_image(a.image, "--image"), read_image(a.mask, "--mask")
    size = image_size_of(a, plan)
    if img.shape[:2] != (size, size):
        raise UsageError(f"--image {a.image} is {img.shape[1]}x{img.shape[0]} px; this model edits {size}x{size} "
                         "images (resize or crop it first)")
    if mask.shape[:2] != img.shape[:2]:
        raise UsageError(f"--mask {a.mask} is {mask.shape[1]}x{mask.shape[0]} px; the image is {size}x{size}")
    n = len(a.classes)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).unsqueeze(0).expand(n, -1, -1, -1)  # uint8 (n, 3, H, W)
    m = torch.from_numpy(mask.astype(np.float32).mean(-1) / 255.0).expand(n, -1, -1)  # white = 1 = regenerate
    t0 = time.perf_counter()
    pipe = build_pipeline(a, plan=plan)
    t_load = time.perf_counter() - t0
    kw = sampling_kwargs(pipe, a)
    t0 = time.perf_counter()
    out = pipe.edit(x, m, a.classes, seed=a.seed, paste=a.paste, progress=not a.quiet, **kw)
    t_edit = time.perf_counter() - t0
    make_parent(a.out)
    if n == 1:
        images.write_png(images.to_uint8(out)[0], a.out)
    else:
        images.save_grid(out, a.out)
    print(f"var-rt: {n} edit{'s' if n > 1 else ''} ({size} px) in {t_edit:.2f} s (load {t_load:.1f} s) -> {a.out}")
    return 0
