"""PNG output: grids and per-image files, written atomically (a crash never leaves a half-written PNG)."""
from __future__ import annotations

import math
import os
import tempfile

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
    """Write an HWC uint8 array as PNG via a temporary file in the same folder, then rename."""
    from PIL import Image
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
