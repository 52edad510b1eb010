"""Shared by the benchmark scripts: device sync, median timing, and the metadata every result line carries
(device, date, commit, source hash, versions)."""
from __future__ import annotations

import datetime
import glob
import hashlib
import os
import platform
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of `fn` over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def timed_split(first, then, device, warmup: int, iters: int) -> tuple[float, float]:
    """Medians (seconds) of `first()` and of `first()` + `then(first())`, both read off the same iterations:
    one generation gives the tokens-only and the end-to-end time (then = the decode). iters >= 1."""
    for _ in range(warmup):
        then(first())
    t_first, t_total = [], []
    for _ in range(max(iters, 1)):
        sync(device)
        t0 = time.perf_counter()
        out = first()
        sync(device)
        t1 = time.perf_counter()
        then(out)
        sync(device)
        t_first.append(t1 - t0)
        t_total.append(time.perf_counter() - t0)
        del out
    return sorted(t_first)[len(t_first) // 2], sorted(t_total)[len(t_total) // 2]


def git_commit() -> str:
    """VAR_RT_COMMIT if set (the GPU machine gets a copy of the tree without .git), else git's short HEAD with
    '+dirty' when the tracked files differ from it, else 'unknown'."""
    if os.environ.get("VAR_RT_COMMIT"):
        return os.environ["VAR_RT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=10).stdout.strip()
        if not head:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, timeout=10).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_hash() -> str:
    """sha1 (12 hex) over the runtime's sources (var_rt, kernels, csrc, benchmarks): ties a result to the exact
    code it ran, also where no git is (the GPU machine) or the tree had uncommitted changes."""
    h = hashlib.sha1()
    files = []
    for pat in ("var_rt/**/*.py", "kernels/**/*.py", "csrc/*", "benchmarks/*.py", "benchmarks/*.sh", "setup.py"):
        files += glob.glob(os.path.join(ROOT, pat), recursive=True)
    for f in sorted(set(files)):
        if os.path.isfile(f) and "__pycache__" not in f:
            h.update(os.path.relpath(f, ROOT).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:12]


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (platform.processor() or platform.machine() or "cpu") + (
        " (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")


def run_meta(device) -> dict:
    """What every JSON line carries: device, date (UTC), commit, source hash, versions, Triton mode."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "source": source_hash(), "torch": torch.__version__, "triton": triton_version,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


def cuda_reset(device) -> None:
    """Free cached blocks and restart the peak-memory counter (between runs that must not share state)."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device):
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.device(device).type == "cuda" else None
