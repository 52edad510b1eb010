"""Loaders of the checkpoint files, on top of the strict checkpoint code (var_rt.checkpoint), one per family: the
VAR transformer (plain VAR, CoDe drafter or refiner), the VAR multi-scale VQVAE, the LlamaGen c2i GPT (its token
grid from the saved freqs_cis, the argument or the file name) and the LlamaGen VQ-16 tokenizer.

`inspect(path, family)` checks a file without loading it: readable, of the expected family (told by its keys:
"--vq: x.pth is a VAR VQVAE checkpoint; expected a LlamaGen VQ-16 checkpoint (vq_ds16_c2i.pt)"), its config
readable and every key and shape right (checked against the model built on `meta`); it returns the config. The
pipelines inspect every file before they load any; `load(path, family)` (and load_var ... load_vq16) then read
and assign strictly.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from var_rt import checkpoint
from var_rt.models import llamagen as gpt_model
from var_rt.models import var as var_model
from var_rt.models import vq16
from var_rt.models import vqvae as vqvae_model
from var_rt.models import vqvae_encoder


@dataclass(frozen=True)
class Family:
    what: str                   # in messages: "VAR checkpoint", "LlamaGen GPT", ...
    read_config: Callable       # (sd, path, **kw) -> config
    build: Callable             # config -> model (called on meta)
    ignored: tuple = ()
    keep_fp32: tuple = ()


def _llamagen_config(sd, path, image_size=None, n_head=None):
    if image_size is None and "freqs_cis" not in sd:
        m = re.search(r"_(256|384|512)(?:\D|$)", os.path.basename(os.fspath(path)))
        image_size = int(m.group(1)) if m else None
    return gpt_model.config_from_state_dict(sd, grid=image_size // 16 if image_size else None, n_head=n_head)


FAMILY = {
    "var": Family("VAR checkpoint", lambda sd, path: var_model.config_from_state_dict(sd), var_model.VAR,
                  var_model.IGNORED_KEYS),
    "vqvae": Family("VQVAE checkpoint", lambda sd, path: vqvae_model.config_from_state_dict(sd), vqvae_model.VQVAE,
                    vqvae_model.IGNORED_KEYS, vqvae_model.KEEP_FP32),
    "llamagen": Family("LlamaGen GPT", _llamagen_config, gpt_model.LlamaGenGPT, gpt_model.IGNORED_KEYS),
    "vq16": Family("LlamaGen VQ", lambda sd, path: vq16.config_from_state_dict(sd), vq16.VQ16, vq16.IGNORED_KEYS,
                   vq16.KEEP_FP32),
}


def _config(path, sd, family: str, label=None, **kw):
    checkpoint.expect_family(path, sd, family, label)
    fam = FAMILY[family]
    try:
        return fam.read_config(sd, path, **kw)
    except (ValueError, KeyError, IndexError) as e:
        raise checkpoint.CheckpointError(f"{label + ': ' if label else ''}{fam.what} {os.fspath(path)}: "
                                         f"{checkpoint._first_sentence(e, 300)}") from None


def inspect(path, family: str, label: str | None = None, **kw):
    """The config of the `family` ('var' | 'vqvae' | 'llamagen' | 'vq16') checkpoint at `path`, every key and
    shape checked, without loading its tensors; otherwise FileNotFoundError / CheckpointError, one line naming
    `label` (the argument: '--vq', 'vq') and the file. kw: image_size, n_head for 'llamagen'."""
    try:
        sd = checkpoint.peek_state_dict(path)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        if not label:
            raise
        raise type(e)(f"{label}: {e}") from None
    cfg = _config(path, sd, family, label, **kw)
    fam = FAMILY[family]
    with torch.device("meta"):
        model = fam.build(cfg)
    checkpoint.check_state_dict(model, sd, fam.ignored, f"{label + ': ' if label else ''}{fam.what} {os.fspath(path)}")
    return cfg


def load(path, family: str, device="cpu", dtype=torch.float32, label: str | None = None, what: str | None = None,
         **kw):
    """Read, check and assign a `family` checkpoint strictly (see inspect); the model in eval mode."""
    sd = checkpoint.read_state_dict(path)
    fam = FAMILY[family]
    cfg = _config(path, sd, family, label, **kw)
    return checkpoint.load_checkpoint(path, lambda _: cfg, fam.build, what=what or fam.what, sd=sd, dtype=dtype,
                                      device=device, ignored=fam.ignored, keep_fp32=fam.keep_fp32)


def load_var(path, device="cpu", dtype=torch.float32, what="VAR checkpoint", label=None) -> var_model.VAR:
    return load(path, "var", device, dtype, label=label, what=what)


def load_vqvae(path, device="cpu", dtype=torch.float32, label=None) -> vqvae_model.VQVAE:
    """The decoding half (the encoder keys are accepted and dropped); the model remembers `path`, from which
    editing loads the encoder on first use (load_vqvae_encoder)."""
    vae = load(path, "vqvae", device, dtype, label=label)
    vae.path = os.fspath(path)
    return vae


def load_vqvae_encoder(path, cfg: vqvae_model.VQVAEConfig, device="cpu", dtype=torch.float32,
                       label=None) -> vqvae_encoder.EncoderHalf:
    """The encoding half of a VQVAE file (`encoder.*`, `quant_conv.*`; the other keys are not read where the format
    allows), strictly: every key of the official Encoder for `cfg` (the config read off the same file's decoder)
    present with its shape, no other `encoder.*` / `quant_conv.*` key; otherwise one CheckpointError line naming
    the missing, unexpected and mis-shaped keys. The encoder in `dtype`, quant_conv fp32 (the latent side)."""
    sd = checkpoint.read_tensors(path, ("encoder.", "quant_conv."))
    what = f"{label + ': ' if label else ''}VQVAE encoder of {os.fspath(path)} (needed for editing)"
    with torch.device("meta"):
        half = vqvae_encoder.EncoderHalf(cfg)
    return checkpoint.load_model(half, sd, dtype=dtype, device=device, keep_fp32=(r"quant_conv\..*",), what=what)


def load_llamagen(path, device="cpu", dtype=torch.float32, image_size=None, n_head=None,
                  label=None) -> gpt_model.LlamaGenGPT:
    """Official c2i_*.pt (weights under `model`, or raw for the FSDP ones; .safetensors too). image_size: 256 / 384
    (token grid = image_size // 16); default from the saved freqs_cis, else the file name (c2i_XL_384.pt).
    n_head: only for non-official widths (official ones are known)."""
    return load(path, "llamagen", device, dtype, label=label, image_size=image_size, n_head=n_head)


def load_vq16(path, device="cpu", label=None) -> vq16.VQ16:
    """vq_ds16_c2i.pt: the LlamaGen VQ-16 tokenizer (decoder side), fp32."""
    return load(path, "vq16", device, torch.float32, label=label)
