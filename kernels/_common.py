"""Launcher helpers shared by the kernel modules: argument checks with clear messages, device rules."""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here means: no Triton, var_rt.ops falls back to the reference)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(cond: bool, op: str, msg: str) -> None:
    """Raise ValueError(`op: msg`) unless cond; explicit so that `python -O` keeps the checks."""
    if not cond:
        raise ValueError(f"var_rt.kernels.{op}: {msg}")


def check_tensor(op: str, name: str, t, ndim: int | None = None, dtypes=None, device=None) -> None:
    check(isinstance(t, torch.Tensor), op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, op, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None:
        check(t.dtype in dtypes, op, f"{name} dtype {t.dtype} not supported (expected one of {list(dtypes)})")
    if device is not None:
        check(t.device == device, op, f"{name} is on {t.device}, expected {device} (all tensors on one device)")


def check_device(op: str, device: torch.device) -> None:
    """CUDA always; CPU only in interpreter mode (the compiled kernels cannot read host memory)."""
    if device.type == "cuda":
        return
    check(device.type == "cpu" and interpreting(), op,
          f"tensors on {device}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
          "set before triton is imported)")


def check_out(op: str, out, shape, dtype, device) -> None:
    check_tensor(op, "out", out, device=device)
    check(tuple(out.shape) == tuple(shape), op, f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    check(out.dtype == dtype, op, f"out has dtype {out.dtype}, expected {dtype}")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
