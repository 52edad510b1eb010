"""Strict checkpoint loading for every family: read a file, check every key and shape, report all problems at once.

Files: plain state dicts (.pth/.pt, read with mmap so the file is not copied into memory), dicts wrapping one
under `model` / `state_dict` / `module` (also nested, and a `module.` key prefix from DDP), and `.safetensors`.
Models are built on the `meta` device and each tensor is cast to the asked dtype and device as it is assigned,
so no second full copy of the weights is ever held.

A file's format is told by its first bytes, its family by its key names (`family_of`: VAR transformer, VAR
VQVAE, LlamaGen GPT, LlamaGen VQ-16); `peek_state_dict` reads keys and shapes without the data, so a wrong,
truncated or foreign file is reported, in one line naming it, before anything is loaded.
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterable, Mapping

import torch
import torch.nn as nn

WRAPPER_KEYS = ("model", "state_dict", "module", "ema")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, in one line naming it: unreadable (empty, truncated, not a checkpoint),
    of another family, or not fitting the model (every missing, unexpected and mis-shaped key)."""


# ---- reading a file: its format by content, one complete line for every unreadable file ---------------------
ZIP_MAGIC = b"PK\x03\x04"        # torch.save (zip format, the default since torch 1.6)
PICKLE_MAGIC = b"\x80"            # torch.save(_use_new_zipfile_serialization=False): a pickle (protocol >= 2)
SMALL_TENSOR = 4096               # peek_state_dict reads tensors up to this many elements (lvl_1L); others: meta
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _first_sentence(msg: str, limit: int = 160) -> str:
    """The first sentence of an exception message, on one line and never cut mid-word."""
    line = " ".join(str(msg).split())
    m = re.search(r"[.;](\s|$)", line)
    if m:
        line = line[:m.start()]
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (cannot read it)")


def _file_format(path: str) -> str:
    """'safetensors' | 'zip' | 'pickle' by the first bytes (not the extension), or a one-line CheckpointError."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if len(head) == 9 and head[8:9] == b"{":
        raise CheckpointError(f"{path}: truncated safetensors file (its header runs past the end of the file)")
    if head.startswith(PICKLE_MAGIC):
        return "pickle"
    return "unknown"


def _safetensors_header(path: str) -> dict:
    """The header {name: {dtype, shape, data_offsets}} of a .safetensors file, checked against the file size."""
    import json
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path}: corrupt safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (malformed header)")
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors file (malformed header)") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header describes "
                              f"{8 + n + end})")
    return header


def _torch_object(path: str, fmt: str):
    if fmt == "zip":
        import zipfile
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint (its zip archive is incomplete)")
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip archive but not a torch checkpoint (it holds "
                                  f"{', '.join(names[:3]) or 'nothing'})")
    return _torch_load(path, fmt)


def _unwrap(path: str, obj) -> dict:
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
        raise CheckpointError(f"{path}: holds no tensors (keys: {list(obj)[:6]})")
    return sd


def _open(path) -> tuple[str, str]:
    path = os.fspath(path)
    _check_path(path)
    fmt = _file_format(path)
    if fmt == "unknown":
        raise CheckpointError(f"{path} is not a checkpoint file (neither a torch .pth/.pt nor a .safetensors file)")
    return path, fmt


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped; lazily mapped where the format allows. The format is told by the
    file's first bytes; a missing, empty, truncated or foreign file is one complete line (FileNotFoundError or
    CheckpointError) naming the file."""
    path, fmt = _open(path)
    if fmt == "safetensors":
        _safetensors_header(path)
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {_first_sentence(e)}") from None
    return _unwrap(path, _torch_object(path, fmt))


def read_tensors(path: str | os.PathLike, prefixes: tuple) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose names start with one of `prefixes` (e.g. the VQVAE encoder for editing):
    from a .safetensors file only those are read; a torch file is memory-mapped. Same errors as read_state_dict."""
    path, fmt = _open(path)
    if fmt != "safetensors":
        return {k: v for k, v in _unwrap(path, _torch_object(path, fmt)).items() if k.startswith(prefixes)}
    keys = [k for k in _safetensors_header(path) if k.startswith(prefixes)]
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {_first_sentence(e)}") from None


def peek_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint without reading their data where it can: a .safetensors file gives `meta`
    tensors from its header (tensors of up to SMALL_TENSOR elements, such as VAR's lvl_1L, are read); a torch
    file is memory-mapped. Enough to identify the file, read its config and check every key and shape before
    anything is loaded. Same errors as read_state_dict."""
    path, fmt = _open(path)
    if fmt != "safetensors":
        return _unwrap(path, _torch_object(path, fmt))
    header = _safetensors_header(path)
    small = [k for k, v in header.items() if math.prod(v.get("shape", [])) <= SMALL_TENSOR]
    sd = {}
    for k, v in header.items():
        sd[k] = torch.empty(v["shape"], dtype=_ST_DTYPES.get(v.get("dtype"), torch.float32), device="meta")
    if small:
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for k in small:
                    sd[k] = f.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {_first_sentence(e)}") from None
    return sd


def _torch_load(path: str, fmt: str = "zip"):
    """torch.load without running arbitrary pickled code (weights_only); argparse.Namespace, which training
    scripts save beside the weights, is allowed. VAR_RT_TRUST_PICKLE=1 lifts the restriction for trusted files."""
    import argparse
    import pickle
    import struct
    trust = os.environ.get("VAR_RT_TRUST_PICKLE") == "1"
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    last = None
    for mmap in ((True, False) if fmt == "zip" else (False,)):  # old (non-zip) files cannot be memory-mapped
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=not trust)
        except Exception as e:
            last = e
    text = str(last)
    if not trust and "Unsupported global" in text:
        raise CheckpointError(f"{path}: holds Python objects besides tensors, which var_rt does not unpickle "
                              "(if the file is trusted, set VAR_RT_TRUST_PICKLE=1)") from None
    if isinstance(last, (EOFError, pickle.UnpicklingError, struct.error)) or "truncated" in text or "EOF" in text:
        raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint") from None
    raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(last).__name__}: "
                          f"{_first_sentence(text)})") from None


# ---- what a file is, by its keys ---------------------------------------------------------------------------
FAMILIES = {  # family -> (what it is, the official file it stands for)
    "var": ("a VAR transformer checkpoint", "var_d16.pth ... var_d36.pth, drafter_N.pth, refiner_N.pth"),
    "vqvae": ("a VAR VQVAE checkpoint", "vae_ch160v4096z32.pth"),
    "llamagen": ("a LlamaGen GPT checkpoint", "c2i_XL_384.pt"),
    "vq16": ("a LlamaGen VQ-16 checkpoint", "vq_ds16_c2i.pt"),
}


def family_of(keys) -> str | None:
    """'var' | 'vqvae' | 'llamagen' | 'vq16' from the key names of a state dict, or None (none of them). Each
    family is told by names only it has, so a file missing a key or two is still named."""
    keys = list(keys)
    if any(k.startswith("decoder.conv_blocks.") for k in keys):
        return "vq16"
    if any(k.startswith(("decoder.up.", "quantize.quant_resi.")) for k in keys):
        return "vqvae"
    if any(k in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight") or
           re.fullmatch(r"layers\.\d+\.attention\.wqkv\.weight", k) for k in keys):
        return "llamagen"
    if any(k in ("class_emb.weight", "pos_1LC", "word_embed.weight") or
           re.fullmatch(r"blocks\.\d+\.attn\.mat_qkv\.weight", k) for k in keys):
        return "var"
    return None


def expect_family(path, sd, family: str, label: str | None = None) -> None:
    """A CheckpointError (one line, naming the argument and the file) unless `sd` (read off `path`) is of
    `family`: e.g. "--vq: x.pth is a VAR VQVAE checkpoint; expected a LlamaGen VQ-16 checkpoint (vq_ds16_c2i.pt)"."""
    found = family_of(sd)
    if found == family:
        return
    what, example = FAMILIES[family]
    prefix = f"{label}: " if label else ""
    if found is None:
        shown = ", ".join(list(sd)[:4])
        raise CheckpointError(f"{prefix}{os.fspath(path)} is none of the checkpoints var_rt knows (first keys: {shown}); "
                              f"expected {what} ({example})")
    raise CheckpointError(f"{prefix}{os.fspath(path)} is {FAMILIES[found][0]}; expected {what} ({example})")


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
    parts = []

    def block(title, items):
        if items:
            shown = ", ".join(items[:8]) + (f", ... and {len(items) - 8} more" if len(items) > 8 else "")
            parts.append(f"{title} ({len(items)}): {shown}")
    block("missing keys", missing)
    block("unexpected keys", unexpected)
    block("mis-shaped keys", [f"{k}: expected {list(e)}, found {list(f)}" for k, e, f in misshaped])
    raise CheckpointError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))


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
