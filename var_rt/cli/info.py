"""`var-rt info`: versions, device, whether var_rt._C has CUDA code, and which implementation each op runs."""
from __future__ import annotations

import os

import torch

from var_rt.cli.args import BACKEND_CHOICES


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="versions, device, and which implementation each op runs")
    i.add_argument("--backend", choices=BACKEND_CHOICES,
                   help="the backend to describe: torch (the reference) or fast (default: VAR_RT_BACKEND, else fast "
                        "on CUDA, torch otherwise); triton and cuda are aliases of fast")
    i.add_argument("--device", default=None, help="the device to describe (default: cuda when available, else cpu)")
    i.set_defaults(fn=cmd_info)


def cmd_info(a) -> int:
    if a.device is not None:  # checked before anything is printed: cpu, cuda or cuda:N (a CPU may describe cuda)
        try:
            ok = torch.device(a.device).type in ("cpu", "cuda")
        except (RuntimeError, TypeError, ValueError):
            ok = False
        if not ok:
            from var_rt.cli.args import UsageError
            raise UsageError(f"--device {a.device}: expected cpu, cuda or cuda:N")
    import var_rt
    from var_rt import _ext, ops
    print(f"var_rt  {var_rt.__version__}")
    print(f"torch   {torch.__version__}")
    try:
        import triton
        print(f"triton  {triton.__version__}" + ("  (TRITON_INTERPRET=1: kernels run on the CPU)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    except ImportError:
        print("triton  not installed")
    if torch.cuda.is_available():
        print(f"device  {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("device  no CUDA device: CPU only")
    dev = getattr(a, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    mod = _ext.load()
    print(f"_C      {'built' if mod else 'NOT built: ' + str(_ext.load_error())}; CUDA code: {'yes (sm_80, sm_90)' if _ext.has_cuda_code() else 'no'}")
    backend = getattr(a, "backend", None)
    print(f"ops on {dev}, backend {ops.resolve_backend(backend, dev)}:")
    for op, (impl, reason) in ops.describe_backends(dev, backend).items():
        print(f"  {op:25s} {impl:18s} {reason}")
    return 0
