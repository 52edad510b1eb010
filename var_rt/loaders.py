"""Loaders of the checkpoint files, on top of the strict checkpoint code (var_rt.checkpoint). VAR family: a VAR
transformer (plain VAR, CoDe drafter or refiner) and the multi-scale VQVAE; each first checks that the file is of its
family (a VQVAE or LlamaGen file given as a VAR is named as such), then reads the config off the file and loads
strictly. LlamaGen family: the c2i GPT (its token grid from the saved freqs_cis, the argument or the file name) and
the VQ-16 tokenizer.
"""
from __future__ import annotations

import os
import re

import torch

from var_rt import checkpoint
from var_rt.models import llamagen as gpt_model
from var_rt.models import var as var_model
from var_rt.models import vq16
from var_rt.models import vqvae as vqvae_model


def load_var(path, device="cpu", dtype=torch.float32, what="VAR checkpoint") -> var_model.VAR:
    sd = checkpoint.read_state_dict(path)
    if "quantize.embedding.weight" in sd or "tok_embeddings.weight" in sd:
        raise checkpoint.CheckpointError(f"{path}: this is not a VAR transformer checkpoint "
                                         f"({'a VQVAE' if 'quantize.embedding.weight' in sd else 'a LlamaGen GPT'})")
    return checkpoint.load_checkpoint(path, var_model.config_from_state_dict, var_model.VAR, what=what, sd=sd,
                                      dtype=dtype, device=device, ignored=var_model.IGNORED_KEYS)


def load_vqvae(path, device="cpu", dtype=torch.float32) -> vqvae_model.VQVAE:
    sd = checkpoint.read_state_dict(path)
    if "quantize.embedding.weight" not in sd:
        raise checkpoint.CheckpointError(f"{path}: this is not a VAR VQVAE checkpoint (no quantize.embedding.weight; "
                                         f"first keys: {list(sd)[:5]})")
    return checkpoint.load_checkpoint(path, vqvae_model.config_from_state_dict, vqvae_model.VQVAE,
                                      what="VQVAE checkpoint", sd=sd, dtype=dtype, device=device,
                                      ignored=vqvae_model.IGNORED_KEYS, keep_fp32=vqvae_model.KEEP_FP32)


def load_llamagen(path, device="cpu", dtype=torch.float32, image_size=None, n_head=None) -> gpt_model.LlamaGenGPT:
    """Official c2i_*.pt (weights under `model`, or raw for the FSDP ones; .safetensors too). image_size: 256 / 384
    (token grid = image_size // 16); default from the saved freqs_cis, else the file name (c2i_XL_384.pt).
    n_head: only for non-official widths (official ones are known)."""
    sd = checkpoint.read_state_dict(path)
    if image_size is None and "freqs_cis" not in sd:
        m = re.search(r"_(256|384|512)(?:\D|$)", os.path.basename(os.fspath(path)))
        image_size = int(m.group(1)) if m else None
    grid = image_size // 16 if image_size else None
    return checkpoint.load_checkpoint(
        path, lambda d: gpt_model.config_from_state_dict(d, grid=grid, n_head=n_head), gpt_model.LlamaGenGPT,
        what="LlamaGen GPT", sd=sd, dtype=dtype, device=device, ignored=gpt_model.IGNORED_KEYS)


def load_vq16(path, device="cpu") -> vq16.VQ16:
    """vq_ds16_c2i.pt: the LlamaGen VQ-16 tokenizer (decoder side), fp32."""
    return checkpoint.load_checkpoint(path, vq16.config_from_state_dict, vq16.VQ16, what="LlamaGen VQ",
                                      dtype=torch.float32, device=device, ignored=vq16.IGNORED_KEYS,
                                      keep_fp32=vq16.KEEP_FP32)
