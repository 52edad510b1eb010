"""Python side of the C++/CUDA extension var_rt._C (residual-VQ accumulation).

_C takes raw pointers, sizes and a CUDA stream handle and knows nothing about torch, so every check happens here:
dtypes (fp32 f_hat / codebook / Phi weights, int64 ids), shapes, devices and contiguity, each failing with a
ValueError that names the argument. ops.rvq_step (var_rt/ops/rvq.py) calls `rvq_step_fn(f_hat.device)`; a None
there means the torch reference runs (after one warning saying why).
"""
from __future__ import annotations

import numbers
import warnings

import torch

_mod = None
_err: str | None = None
_tried = False
_warned: set = set()
_resolved: dict = {}  # (device type, index) -> (fn or None, reason)
_THREADS_MIN_MACS = 2e7  # conv multiply-adds of one CPU step above which it uses torch.get_num_threads() threads


def load():
    """The var_rt._C module, or None when it cannot be imported (then `load_error()` says why)."""
    global _mod, _err, _tried
    if not _tried:
        _tried = True
        try:
            from var_rt import _C
            _mod = _C
        except Exception as e:  # not built, or built for another Python / platform
            _err = f"var_rt._C not built or not importable ({type(e).__name__}: {e})"
    return _mod


def load_error() -> str | None:
    """Why `load()` returned None; None when the module loaded."""
    load()
    return _err


def has_cuda_code() -> bool:
    """True when _C loaded and was compiled with its CUDA kernels."""
    m = load()
    return bool(m is not None and m.has_cuda())


def _unavailable_reason(device: torch.device) -> str | None:
    """Why _C cannot run the step on `device`; None when it can. On CUDA this also loads the kernels (CUDA loads
    them lazily, and a first load inside a graph capture is best avoided)."""
    m = load()
    if m is None:
        return _err
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"var_rt._C has no {device.type} implementation"
    if not m.has_cuda():
        return "var_rt._C was built without CUDA (no nvcc at install time, or VAR_RT_CUDA=0)"
    if m.cuda_device_count() == 0:  # e.g. no driver, or one older than the statically linked CUDA runtime
        return f"var_rt._C's CUDA runtime sees no GPU ({m.cuda_error() or 'no device'})"
    if not torch.cuda.is_available():
        return "this torch cannot use CUDA"
    err = m.cuda_preload(device.index if device.index is not None else torch.cuda.current_device())
    return f"var_rt._C's CUDA kernels do not load ({err})" if err else None


def _resolve(device: torch.device):
    """(fn or None, reason), worked out once per device: ops.rvq_step asks on every step, graph capture included."""
    key = (device.type, device.index)
    if key not in _resolved:
        why = _unavailable_reason(device)
        fn = None if why is not None else (rvq_step_cuda if device.type == "cuda" else rvq_step_cpu)
        _resolved[key] = (fn, why)
    return _resolved[key]


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# argument checks
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"rvq_step: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_tensor(name: str, t, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check(t.device == device, f"{name} is on {t.device}, expected {device} (the device of f_hat)")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def check_args(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi, scratch=None, out=None):
    """Validates one step's arguments; returns (B, Cv, H, V). Raises ValueError naming the bad argument."""
    _check(isinstance(f_hat, torch.Tensor), f"f_hat must be a torch.Tensor, got {type(f_hat).__name__}")
    _check(f_hat.dim() == 4 and f_hat.shape[2] == f_hat.shape[3],
           f"f_hat must be (B, Cv, H, H), got {tuple(f_hat.shape)}")
    B, Cv, H, _ = f_hat.shape
    dev = f_hat.device
    _check(f_hat.dtype == torch.float32, f"f_hat must be torch.float32, got {f_hat.dtype}")
    _check(f_hat.is_contiguous(), "f_hat must be contiguous")
    _check(_is_int(pn) and pn >= 1, f"pn must be an int >= 1, got {pn!r}")
    _check(pn_next is None or (_is_int(pn_next) and pn_next >= 1),
           f"pn_next must be None or an int >= 1, got {pn_next!r}")
    _check(isinstance(resi, numbers.Real) and not isinstance(resi, bool), f"resi must be a float, got {resi!r}")
    _check(isinstance(codebook, torch.Tensor) and codebook.dim() == 2 and codebook.shape[0] >= 1,
           f"codebook must be a (V, Cv) tensor, got {getattr(codebook, 'shape', type(codebook).__name__)}")
    V = codebook.shape[0]
    _check_tensor("idx", idx, torch.int64, (B, pn * pn), dev)
    _check_tensor("codebook", codebook, torch.float32, (V, Cv), dev)
    _check_tensor("phi_w", phi_w, torch.float32, (Cv, Cv, 3, 3), dev)
    _check_tensor("phi_b", phi_b, torch.float32, (Cv,), dev)
    if scratch is not None:
        _check_tensor("scratch", scratch, torch.float32, (B, Cv, H, H), dev)
        _check(scratch.data_ptr() != f_hat.data_ptr() or f_hat.numel() == 0, "scratch must not be f_hat")
    if out is not None:
        _check(pn_next is not None, "out given but pn_next is None (the last scale writes no next input)")
        _check_tensor("out", out, torch.float32, (B, pn_next * pn_next, Cv), dev)
    return B, Cv, H, V


def _prepare(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi, scratch, out):
    B, Cv, H, V = check_args(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi, scratch, out)
    if scratch is None:
        scratch = torch.empty_like(f_hat)
    if pn_next is not None and out is None:
        out = torch.empty((B, pn_next * pn_next, Cv), dtype=torch.float32, device=f_hat.device)
    ptrs = (idx.data_ptr(), codebook.data_ptr(), V, phi_w.data_ptr(), phi_b.data_ptr(), f_hat.data_ptr(),
            scratch.data_ptr(), out.data_ptr() if out is not None else 0,
            B, Cv, H, int(pn), int(pn_next or 0), float(resi))
    # the caller keeps scratch alive across the _C call; on CUDA it was allocated on the launch stream, so the
    # caching allocator reuses it only for work ordered after the kernels
    return ptrs, scratch, out


def rvq_step_cpu(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi=0.5, *, scratch=None, out=None):
    """One residual-VQ step with _C's CPU loops; same contract as ops.rvq_step_ref (f_hat updated in place),
    returning `out` (B, pn_next^2, Cv), a fresh contiguous tensor unless given, or None for the last scale.
    Raises IndexError (f_hat untouched) on an id outside the codebook."""
    m = load()
    if m is None:
        raise RuntimeError(_err)
    _check(isinstance(f_hat, torch.Tensor) and f_hat.device.type == "cpu",
           f"rvq_step_cpu needs a CPU f_hat, got {getattr(f_hat, 'device', type(f_hat).__name__)}")
    ptrs, scratch, out = _prepare(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi, scratch, out)
    B, Cv, H = f_hat.shape[:3]
    # threads only for big steps: starting them costs more than a small step (about B >= 8 at 16x16, Cv 32)
    threads = torch.get_num_threads() if B * Cv * Cv * 9 * H * H >= _THREADS_MIN_MACS else 1
    m.rvq_step_cpu(*ptrs, threads)
    return out


def rvq_step_cuda(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi=0.5, *, scratch=None, out=None):
    """The CUDA twin: launched on torch's current stream of f_hat's device, no sync, no allocation inside _C
    (pass scratch= and out= to allocate nothing at all), so it can be captured in a CUDA graph; call it once
    outside the capture first (as for any graph: warm-up), which also loads the kernels.
    Out-of-range ids make NaN rows (a device-side check cannot raise without a sync)."""
    m = load()
    if m is None:
        raise RuntimeError(_err)
    _check(isinstance(f_hat, torch.Tensor) and f_hat.device.type == "cuda",
           f"rvq_step_cuda needs a CUDA f_hat, got {getattr(f_hat, 'device', type(f_hat).__name__)}")
    fn, why = _resolve(f_hat.device)  # once per device: checks the runtime and loads the kernels
    if fn is None:
        raise RuntimeError(f"rvq_step_cuda: {why}")
    ptrs, scratch, out = _prepare(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi, scratch, out)
    dev = f_hat.device.index if f_hat.device.index is not None else torch.cuda.current_device()
    m.rvq_step_cuda(*ptrs, torch.cuda.current_stream(dev).cuda_stream, dev)
    return out


def rvq_step_fn(device):
    """The _C implementation for tensors on `device` (signature (idx, codebook, phi_w, phi_b, f_hat, pn, pn_next,
    resi, *, scratch=None, out=None) -> next (B, pn_next^2, Cv) fp32 or None), or None, after one warning, when
    _C (or its CUDA half, for a CUDA device) cannot run there and the torch reference is to be used."""
    device = torch.device(device)
    fn, why = _resolve(device)
    if fn is None:
        _warn_once(f"{device.type}:{why}", f"var_rt: rvq_step fast path unavailable on {device.type}: {why}; "
                                           "using the torch reference")
    return fn


def describe(device, chosen_backend: str | None = None):
    """(implementation that runs rvq_step on `device`: "torch" | "cpp" | "cuda", why), for `var-rt info`
    (ops.rvq's describer). chosen_backend is ops' pick ("torch" | "fast"); any non-torch pick routes rvq_step to _C."""
    device = torch.device(device)
    if chosen_backend == "torch":
        return ("torch", "reference (backend torch chosen)")
    fn, why = _resolve(device)
    if fn is None:
        return ("torch", f"reference: {why}")
    return ("cuda", "_C CUDA kernel") if device.type == "cuda" else ("cpp", "_C CPU loop")
