"""Which implementation of an op runs: the backend choice, and the gate to the Triton kernels.

Backends: "torch" is the reference everywhere (the spec the fast paths are tested against); "fast" is the fast path:
Triton kernels (var_rt.kernels), the C++/CUDA extension var_rt._C (rvq_step) and cuBLASLt epilogues (linear_gelu).
"triton" and "cuda" are old names of "fast" and keep working. The choice, from strongest to weakest: an op's
`backend=` argument, the innermost `use_backend` block (per thread / asyncio task), VAR_RT_BACKEND, then "fast" on
a CUDA device and "torch" elsewhere.

The one patch point of the Triton launches is `triton_fn` (looked up in this module at call time, so replacing
`var_rt.ops.dispatch.triton_fn` reroutes every kernel; benchmarks/cost_model.py does that); the _C step goes
through `var_rt._ext.rvq_step_fn`.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

import torch

BACKENDS = ("torch", "fast")
ALIASES = {"triton": "fast", "cuda": "fast"}  # they always meant the fast path: Triton + _C + cuBLASLt

# labels of the implementations, as `describe_backends` / `var-rt info` print them
TORCH, TRITON, C_CPU, C_CUDA, CUBLASLT = "torch reference", "Triton kernel", "_C CPU", "_C CUDA", "cuBLASLt epilogue"

_forced: contextvars.ContextVar = contextvars.ContextVar("var_rt_backend", default=None)  # innermost use_backend
_warned: set = set()
_loaded: dict = {}   # kernel loader -> (fn, None) or (None, why it failed): each kernel module is imported once
_OPS: dict = {}      # op -> its describe(device): (implementation, why) on fast; filled by `kernel` / `describes`


def canonical(name: str, what: str = "backend") -> str:
    """'torch' or 'fast' for a backend name or alias; ValueError naming the choices otherwise."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"{what}={name!r}: expected one of {BACKENDS} (aliases of 'fast': {', '.join(ALIASES)})")
    return name


def resolve_backend(backend: str | None, device=None) -> str:
    """The backend a caller asked for, canonical ('torch' | 'fast'). None: VAR_RT_BACKEND when set, else 'fast' on a
    CUDA device and 'torch' otherwise. Pipelines store this at construction."""
    if backend is not None:
        return canonical(backend)
    env = os.environ.get("VAR_RT_BACKEND")
    if env:
        return canonical(env, "VAR_RT_BACKEND")
    return "fast" if device is not None and torch.device(device).type == "cuda" else "torch"


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force a backend for the ops called inside the block (None: keep the enclosing choice). The choice is a
    ContextVar: blocks nest, and another thread (or asyncio task) never sees this one's choice."""
    token = _forced.set(canonical(backend) if backend is not None else _forced.get())
    try:
        yield
    finally:
        _forced.reset(token)


def default_backend(device=None) -> str:
    """The backend ops use when called without `backend=`: the innermost use_backend, else resolve_backend(None)."""
    forced = _forced.get()
    return forced if forced is not None else resolve_backend(None, device)


def backend_for(backend: str | None, device) -> str:
    """An op's `backend=` argument (canonical) or, when None, default_backend(device)."""
    return canonical(backend) if backend is not None else default_backend(device)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)  # the model code that called the op


# ----------------------------------------------------------------------------------------------------------------
# the Triton gate
def kernel(op: str, note: str = ""):
    """Decorator of an op module's Triton loader (a function that imports its kernel and returns it): names the op
    for the gate and lists it in `describe_backends`. `note`: what else decides (e.g. the layouts it takes)."""
    def register(loader):
        loader.op = op
        _OPS[op] = lambda device: _describe_triton(loader, device, note)
        return loader
    return register


def describes(op: str):
    """Decorator of describe(device) -> (implementation, why) for an op whose fast path is not a Triton kernel."""
    def register(fn):
        _OPS[op] = fn
        return fn
    return register


def _load(loader):
    if loader not in _loaded:
        try:
            _loaded[loader] = (loader(), None)
        except Exception as e:  # triton missing (ImportError) or the kernel module broken
            _loaded[loader] = (None, f"{type(e).__name__}: {e}")
    return _loaded[loader]


def _needs_cuda(device: torch.device) -> bool:
    return device.type != "cuda" and not interpreting()


def triton_fn(op: str, device: torch.device, loader):
    """The Triton implementation of `op` (what `loader` returns) for tensors on `device`, or None when unusable:
    the caller then runs the torch reference. Not CUDA and not TRITON_INTERPRET=1: one warning for the whole
    process; a kernel that does not import: one warning per op."""
    if _needs_cuda(device):
        _warn_once("fast:needs-cuda", f"var_rt: the fast backend's Triton kernels need a CUDA device (or "
                                      f"TRITON_INTERPRET=1), these tensors are on {device.type}: the torch reference "
                                      "runs for those ops")
        return None
    fn, err = _load(loader)
    if fn is None:
        _warn_once(f"{op}:import", f"var_rt: Triton {op} unavailable ({err}); using the torch reference")
    return fn


def fast_kernel(loader, backend: str | None, device: torch.device):
    """The kernel of `loader` when the fast backend is chosen (see backend_for) and usable on `device`, else None.
    Calls `triton_fn` through this module's globals, at call time: the patch point."""
    if backend_for(backend, device) == "torch":
        return None
    return triton_fn(loader.op, device, loader)


def _describe_triton(loader, device: torch.device, note: str):
    if _needs_cuda(device):
        return TORCH, "Triton needs a CUDA device (or TRITON_INTERPRET=1)"
    fn, err = _load(loader)
    if fn is None:
        return TORCH, f"Triton kernel unusable: {err}"
    where = " (interpreter, CPU tensors)" if device.type != "cuda" else ""
    return TRITON, f"{fn.__module__}.{fn.__name__}{where}" + (f"; {note}" if note else "")


def describe_backends(device="cpu", backend: str | None = None) -> dict:
    """op -> (implementation that runs on `device`, why): one of TORCH, TRITON, C_CPU, C_CUDA, CUBLASLT. backend:
    as an op's `backend=` argument (None: the current default). For `var-rt info`; warns about nothing."""
    device = torch.device(device)
    chosen = backend_for(backend, device)
    if chosen == "torch":
        if backend is not None or _forced.get() is not None:
            why = "backend torch chosen"
        elif os.environ.get("VAR_RT_BACKEND"):
            why = f"VAR_RT_BACKEND={os.environ['VAR_RT_BACKEND']}"
        else:
            why = f"default backend on {device.type} (no CUDA device)"
        return {op: (TORCH, why) for op in sorted(_OPS)}
    return {op: _OPS[op](device) for op in sorted(_OPS)}
