"""`var-rt info`: versions, device, whether var_rt._C has CUDA code, and which backend each op uses."""
from __future__ import annotations

import os

import torch


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="versions, device, and which backend each op uses")
    i.set_defaults(fn=cmd_info)


def cmd_info(a) -> int:
    import var_rt
    from var_rt import _ext, ops
    print(f"var_rt  {var_rt.__version__}")
    print(f"torch   {torch.__version__}")
    try:
        import triton
        print(f"triton  {triton.__version__}" + ("  (TRITON_INTERPRET=1: kernels run on the CPU)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    except ImportError:
        print("triton  not installed")
    dev = "cpu"
    if torch.cuda.is_available():
        dev = "cuda"
        print(f"device  {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("device  no CUDA device: CPU only")
    mod = _ext.load()
    print(f"_C      {'built' if mod else 'NOT built: ' + str(_ext.load_error())}; CUDA code: {'yes (sm_80, sm_90)' if _ext.has_cuda_code() else 'no'}")
    print(f"ops on {dev}:")
    for op, (backend, reason) in ops.describe_backends(dev).items():
        print(f"  {op:18s} {backend:7s} {reason}")
    return 0
