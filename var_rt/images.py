"""File output: PNG grids and per-image files, and the one atomic writer (`atomic_path`, `atomic_open`) that every
file var_rt writes goes through (PNGs, the sample npz and manifests, the demo grid, eval-demo / fid JSON).

A file is written to a hidden temporary file in the target's folder (`.tmp-<name>-<random><ext>`) and renamed onto
the target (os.replace) only once it is complete: on any failure, Ctrl-C included, the temporary file is removed,
so the target is either the old file or the complete new one. The temporary file is created with mode 0o666
masked by the process umask, as open() creates files (0644 under umask 022, 0600 under 077). Durability across a
power loss is not promised (no fsync): `var-rt sample` verifies the PNGs it finds when it resumes."""
from __future__ import annotations

import contextlib
import math
import os
import secrets

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8 (round to nearest)."""
    return images.detach().float().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> one (rows*(H+pad)+pad, ...) uint8 HWC picture on a white background."""
    arr = to_uint8(images)
    B, H, W, _ = arr.shape
    nrow = nrow or min(B, max(1, math.ceil(math.sqrt(B))))
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    return grid


def write_png(arr: np.ndarray, path: str) -> None:
    """Write an HWC uint8 array as PNG, atomically (atomic_open)."""
    from PIL import Image
    with atomic_open(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")


def write_json(obj, path: str, **dump_kw) -> None:
    """Write `obj` as JSON (indent 2 unless given), atomically (atomic_open)."""
    import json
    dump_kw.setdefault("indent", 2)
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **dump_kw)
        f.write("\n")


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    write_png(make_grid(images, nrow), path)
    return path


def save_each(images: torch.Tensor, folder: str, names) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for arr, name in zip(to_uint8(images), names):
        p = os.path.join(folder, name)
        write_png(arr, p)
        paths.append(p)
    return paths


def check_writable(path: str, is_dir: bool = False) -> None:
    """Fail before any work if the output cannot be written (missing folder, no permission)."""
    folder = os.path.abspath(path) if is_dir else os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {folder}: {'not a folder' if not os.path.isdir(probe) else 'permission denied'}")


def write_npz(path: str, **arrays) -> None:
    """np.savez (uncompressed; np.load reads it), atomically, and byte-reproducible: the zip entries carry a fixed
    date (np.savez stamps the current time), so the same arrays always give the same file."""
    import zipfile

    from numpy.lib import format as npy_format
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for key, val in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with z.open(info, "w", force_zip64=True) as entry:
                npy_format.write_array(entry, np.asanyarray(val), allow_pickle=False)


TMP_PREFIX = ".tmp-"  # hidden temporary files of atomic_path; `var-rt sample` removes stale ones when it starts


def _create_temp(folder: str, name: str, suffix: str) -> str:
    """A new empty file `.tmp-<name>-<random><suffix>` in `folder`, mode 0o666 & ~umask (applied by the kernel)."""
    for _ in range(100):
        tmp = os.path.join(folder, f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None):
    """Yield a temporary path beside `path` (same folder, missing folders created; hidden name ending in `suffix`,
    by default `path`'s extension, so np.savez adds none); on success it is renamed onto `path`, on any exception
    or Ctrl-C it is removed: `path` is either the old file or the complete new one. The file exists (empty, mode
    0o666 & ~umask) when yielded: write it by name (open(tmp, "w"), np.savez(tmp, ...))."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    tmp = _create_temp(folder, name, os.path.splitext(name)[1] if suffix is None else suffix)
    done = False
    try:
        yield tmp
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **open_kw):
    """open() for writing, atomically: the file object of a temporary file (atomic_path) that replaces `path` when
    the block ends without an exception. Text modes default to UTF-8."""
    if "b" not in mode:
        open_kw.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kw) as f:
            yield f
