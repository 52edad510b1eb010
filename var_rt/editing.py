"""VAR zero-shot editing (inpainting, outpainting, class-conditional editing) with the unchanged class-conditional
model, as in the VAR paper (FoundationVision/VAR demo_zero_shot_edit.ipynb): the image is tokenised by the VQVAE
encoder at every scale, and the generation teacher-forces the image's tokens outside the mask while it draws the
tokens inside it. Plain VAR and CoDe alike (the drafter and the refiner run the same engine, run_var's `forced`).

Entry point: `VARPipeline.edit(images, masks, class_labels, ...)` -> `edit` here.

Mask rule: masks are pixel masks, 1 = regenerate, 0 = keep. At scale s a token is regenerated when more than half
of its pixels are masked: the mask's mean over the token's window of F.interpolate(mode="area") from H x W pixels
to pn_s x pn_s (the adaptive average pooling the quantizer uses for the residual) is > 1/2; every other token is
forced to the encoder's. So an all-zero mask reproduces the image's own tokens (its VQVAE reconstruction), an
all-one mask is ordinary generation, and a scale's single 1x1 token is redrawn only when more than half of the image
is masked. (The official notebook instead downsamples a 0/1 keep mask on the last token grid bilinearly, keeps
tokens where it is > 0.5, and always keeps scales of at most 3 tokens; that would make an all-one mask differ from
ordinary generation.)

The VQVAE encoder is loaded only here, on first use (ensure_encoder), from the file the VQVAE was loaded from;
ordinary generation never holds it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from var_rt import loaders, ops
from var_rt.models import vqvae as vqvae_model
from var_rt.models import vqvae_encoder
from var_rt.pipeline_base import check_class_labels, check_seeds
from var_rt.runtime.var import run_var

__all__ = ["edit", "edit_latents", "check_images", "check_masks", "token_keep_masks", "encode_tokens", "ensure_encoder"]


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_tensor(x):
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    return x


def check_images(images, image_size: int) -> torch.Tensor:
    """images (B, 3, H, W): float in [0, 1] or uint8 (0..255), H = W = image_size (the model's) ->
    float32 (B, 3, H, W) in [0, 1], on the CPU. ValueError naming what is wrong."""
    x = _as_tensor(images, "images")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("images: empty batch")
    if tuple(x.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"images are {x.shape[-1]}x{x.shape[-2]} px; this model makes {image_size}x{image_size} "
                         "images (resize or crop them first)")
    if x.dtype == torch.uint8:
        return x.float().div(255).cpu()
    if not x.dtype.is_floating_point:
        raise ValueError(f"images: expected float in [0, 1] or uint8, got {x.dtype}")
    x = x.detach().float().cpu()
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"images: float values must be finite and in [0, 1], got [{float(x.min()):.3g}, "
                         f"{float(x.max()):.3g}]")
    return x


def check_masks(masks, batch: int, size: tuple) -> torch.Tensor:
    """masks (B, H, W) or (B, 1, H, W): bool, or numbers in [0, 1] (1 = regenerate, 0 = keep) -> float32
    (B, 1, H, W) on the CPU; B = batch, (H, W) = size (the images')."""
    m = _as_tensor(masks, "masks")
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"masks: expected (B, H, W) or (B, 1, H, W), got shape {tuple(m.shape)}")
    if m.shape[0] != batch:
        raise ValueError(f"{m.shape[0]} masks for {batch} images")
    if tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(f"masks are {m.shape[-1]}x{m.shape[-2]} px, the images {size[1]}x{size[0]}")
    if m.dtype.is_complex:
        raise ValueError(f"masks: expected bool or numbers in [0, 1], got {m.dtype}")
    m = m.detach().float().cpu()
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError("masks: values must be in [0, 1] (1 = regenerate, 0 = keep)")
    return m


def token_keep_masks(masks: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    """masks (B, 1, H, W) float in [0, 1] -> per scale a keep mask (B, pn^2) bool: True (teacher-forced) unless more
    than half of the token's area-pooling window is masked (module docstring)."""
    B = masks.shape[0]
    return [F.interpolate(masks.float(), size=(pn, pn), mode="area").reshape(B, pn * pn).le(0.5)
            for pn in patch_nums]


def ensure_encoder(vae: vqvae_model.VQVAE) -> vqvae_model.VQVAE:
    """Attach the VQVAE's encoder + quant_conv on first use: strictly loaded from the file the VQVAE came from
    (loaders.load_vqvae_encoder: one line naming any missing, unexpected or mis-shaped key), or built at random for
    a random VQVAE (VARPipeline.random). Same device as the decoder, its dtype (quant_conv fp32)."""
    if vae.encoder is not None:
        return vae
    w = vae.decoder.conv_in.weight
    if vae.path is not None:
        half = loaders.load_vqvae_encoder(vae.path, vae.cfg, device=w.device, dtype=w.dtype)
    elif vae.random_seed is not None:
        half = vqvae_encoder.random_encoder(vae.cfg, vae.random_seed)
        half = half.to(w.device).eval().requires_grad_(False)
        half.encoder.to(w.dtype)
    else:
        raise ValueError("editing needs the VQVAE encoder, and this VQVAE has no file to load it from (load the "
                         "pipeline with from_checkpoints / from_pretrained, or set vae.path)")
    vae.attach_encoder(half)
    return vae


@torch.no_grad()
def encode_tokens(vae: vqvae_model.VQVAE, images01: torch.Tensor, patch_nums) -> tuple[list, torch.Tensor]:
    """images01 (B, 3, H, W) in [0, 1] on the VQVAE's device -> (token ids [(B, pn^2) int64 per scale], f_hat
    (B, Cvae, h, w) fp32: the sum the tokens stand for; decoding it is the image's plain VQVAE reconstruction).
    Image by image, each a fresh contiguous tensor: conv algorithms and GEMM kernels are chosen by shape, and an
    image's tokens must not depend on its batch (pipeline_base.DECODE_CHUNK)."""
    per = [vqvae_encoder.f_to_tokens(vae, vqvae_encoder.img_to_f(vae, images01[i:i + 1].clone(
        memory_format=torch.contiguous_format)), patch_nums) for i in range(images01.shape[0])]
    tokens = [torch.cat([p[0][s] for p in per]) for s in range(len(patch_nums))]
    return tokens, torch.cat([p[1] for p in per])


def edit(pipe, images, masks, class_labels, seed=0, seeds=None, progress=False, paste=False, **sampling):
    """VARPipeline.edit (see its docstring): edit_latents, then the pipeline's decode (and the paste)."""
    f_hat, images, masks = _edit(pipe, images, masks, class_labels, seed, seeds, progress, sampling)
    out = pipe.decode(f_hat, progress=progress)
    if paste:  # the input's pixels outside the mask (a soft mask blends)
        m = masks.to(out.device)
        out = out * m + images.to(out.device) * (1 - m)
    return out


def edit_latents(pipe, images, masks, class_labels, seed=0, seeds=None, progress=False, **sampling) -> torch.Tensor:
    """The edited latents: f_hat (B, Cvae, h, w) fp32, before decoding (as VARPipeline.generate_latents)."""
    return _edit(pipe, images, masks, class_labels, seed, seeds, progress, sampling)[0]


def _edit(pipe, images, masks, class_labels, seed, seeds, progress, sampling):
    """(f_hat, images (B, 3, H, W) in [0, 1], masks (B, 1, H, W)), both on the CPU. Every argument is checked
    before the encoder is loaded or anything runs; the generation runs eagerly (no CUDA graph: the forced tokens
    and keep masks change from call to call)."""
    params = pipe.sampling_settings(**sampling)
    labels = check_class_labels(class_labels, pipe.num_classes + 1)  # num_classes: the null class (no class)
    B = labels.numel()
    images = check_images(images, pipe.image_size)
    if images.shape[0] != B:
        raise ValueError(f"{images.shape[0]} images for {B} class labels")
    masks = check_masks(masks, B, images.shape[-2:])
    seeds = check_seeds(B, seed, seeds)
    vae, pns = pipe.vae, pipe.cfg.patch_nums
    ensure_encoder(vae)
    dev = pipe.device
    with ops.use_backend(pipe.backend):
        enc_tokens, _ = encode_tokens(vae, images.to(dev), pns)
    keep = [k.to(dev) for k in token_keep_masks(masks, pns)]
    forced = list(zip(enc_tokens, keep))
    pool = pipe.kv_pool(B)

    def run(lab, sd, bar):
        return run_var(pipe.models, vae, pipe.schedule, lab, sd, params, pool, progress=bar, forced=forced)
    K = len(pns)
    f_hat, tokens = pipe._generate(None, run, labels.to(dev), seeds.to(dev), capture=False, progress=progress,
                                   total=K, desc=f"VAR edit {B} img", unit="scale")
    pipe.last_tokens = tokens
    pipe.last_forward_passes = K
    pipe.last_stats = {"kv_pool_bytes": pool.nbytes,  # per image: how many tokens were forced (all scales)
                       "kept_tokens": [int(sum(k[i].sum() for k in keep)) for i in range(B)]}
    return f_hat, images, masks
