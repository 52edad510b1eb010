"""Strict checkpoint loading for every family: read a file, check every key and shape, report all problems at once.

Files: plain state dicts (.pth/.pt, read with mmap so the file is not copied into memory), dicts wrapping one
under `model` / `state_dict` / `module` (also nested, and a `module.` key prefix from DDP), and `.safetensors`.
Models are built on the `meta` device and each tensor is cast to the asked dtype and device as it is assigned,
so no second full copy of the weights is ever held.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

import torch
import torch.nn as nn

WRAPPER_KEYS = ("model", "state_dict", "module", "ema")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists every missing, unexpected and mis-shaped key."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped; lazily mapped where the format allows."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    obj = _torch_load(path)
    for _ in range(3):  # unwrap {"model": {...}} and the like, a few levels deep at most
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (keys: {list(obj)[:10]})")
    return sd


def _torch_load(path: str):
    """torch.load without running arbitrary pickled code (weights_only); argparse.Namespace, which training
    scripts save beside the weights, is allowed. VAR_RT_TRUST_PICKLE=1 lifts the restriction for trusted files."""
    import argparse
    trust = os.environ.get("VAR_RT_TRUST_PICKLE") == "1"
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    last = None
    for mmap in (True, False):  # old (non-zip) files cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=not trust)
        except Exception as e:
            last = e
    hint = "" if trust else " (if the file is trusted and holds other Python objects, set VAR_RT_TRUST_PICKLE=1)"
    raise CheckpointError(f"{path}: not a readable torch checkpoint: {type(last).__name__}: "
                          f"{str(last).splitlines()[0][:300]}{hint}") from None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], ignored: Iterable[str] = (),
                     what: str = "checkpoint") -> None:
    """Raise CheckpointError naming every problem. `ignored`: regexes of keys the official code saves but
    var_rt does not use (accepted and dropped)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected and not _matches(k, ignored))
    misshaped = sorted((k, expected[k], tuple(sd[k].shape)) for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what} does not fit {type(model).__name__}:"]

    def block(title, items):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {it}" for it in items[:40])
            if len(items) > 40:
                lines.append(f"    ... and {len(items) - 40} more")
    block("missing keys", missing)
    block("unexpected keys", unexpected)
    block("mis-shaped keys (name, expected, found)", [f"{k}: expected {list(e)}, found {list(f)}" for k, e, f in misshaped])
    raise CheckpointError("\n".join(lines))


def assign_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device,
                      keep_fp32: Iterable[str] = ()) -> nn.Module:
    """Move every tensor of `sd` into `model` (possibly on meta), cast one at a time. Floating tensors become
    `dtype`, except names matching `keep_fp32` (numerically sensitive: codebooks, norms of the VQ side)."""
    device = torch.device(device)
    new = {}
    for k, ref in model.state_dict(keep_vars=True).items():
        t = sd[k]
        want = ref.dtype if not ref.is_floating_point() else (torch.float32 if _matches(k, keep_fp32) else dtype)
        new[k] = t.to(device=device, dtype=want if t.is_floating_point() else t.dtype)
    model.load_state_dict(new, strict=True, assign=True)
    return model


def load_model(model: nn.Module, sd: Mapping[str, torch.Tensor], *, dtype=torch.float32, device="cpu",
               ignored: Iterable[str] = (), keep_fp32: Iterable[str] = (), what: str = "checkpoint") -> nn.Module:
    """check_state_dict then assign_state_dict; the model comes back in eval mode without grads."""
    check_state_dict(model, sd, ignored, what)
    assign_state_dict(model, sd, dtype, device, keep_fp32)
    model.eval().requires_grad_(False)
    return model


def load_checkpoint(path, read_config, build, *, what: str, sd=None, **load_kw) -> nn.Module:
    """The one loading path of every family: read the file (or take `sd`), read the config off it (a ValueError
    becomes a CheckpointError naming the file), build the model on `meta`, then check and assign strictly."""
    sd = read_state_dict(path) if sd is None else sd
    try:
        cfg = read_config(sd)
    except ValueError as e:
        raise CheckpointError(f"{what} {path}: {e}") from None
    with torch.device("meta"):
        model = build(cfg)
    return load_model(model, sd, what=f"{what} {path}", **load_kw)


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, wrap: str | None = None) -> None:
    """Write a state dict in the format the extension names: .safetensors, or torch.save (optionally wrapped)."""
    path = os.fspath(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save({wrap: sd} if wrap else sd, path)
