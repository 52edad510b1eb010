"""Loaders of the VAR family's files, on top of the strict checkpoint code (var_rt.checkpoint): a VAR transformer
(plain VAR, CoDe drafter or refiner) and the multi-scale VQVAE. Each first checks that the file is of its family
(a VQVAE or LlamaGen file given as a VAR is named as such), then reads the config off the file and loads strictly.
"""
from __future__ import annotations

import torch

from var_rt import checkpoint
from var_rt.models import var as var_model
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
