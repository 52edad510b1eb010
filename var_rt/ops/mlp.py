"""The FFN pieces: VAR's first FFN GEMM with its tanh-GELU (a cuBLASLt epilogue on the fast path) and LlamaGen's
SwiGLU gate (a Triton kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var_rt.ops import dispatch


@dispatch.kernel("swiglu")
def _swiglu_kernel():
    from var_rt.kernels.swiglu import swiglu
    return swiglu


# --------------------------------------------------------------------------------------------------------------
# VAR: the FFN's first GEMM with its tanh-GELU
def linear_gelu_ref(x, weight, bias):
    """x (..., C) -> gelu_tanh(x @ weight.T + bias), (..., hidden) in x's dtype."""
    from var_rt.ops.gemm import linear
    return F.gelu(linear(x, weight, bias), approximate="tanh")


def _epilogue_here(device: torch.device) -> bool:
    return device.type in ("cuda", "meta")


def linear_gelu(x, weight, bias, backend=None):
    """On CUDA the fast path is one cuBLASLt GEMM with a bias + tanh-GELU epilogue (torch._addmm_activation; its
    CPU kernel uses the erf GELU, so the CPU keeps the reference). `meta` counts as CUDA for the cost model."""
    if dispatch.backend_for(backend, x.device) == "torch" or not _epilogue_here(x.device) or not x.is_contiguous():
        return linear_gelu_ref(x, weight, bias)
    y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], weight.shape[0])


@dispatch.describes("linear_gelu")
def _describe_linear_gelu(device):
    if _epilogue_here(device):
        return dispatch.CUBLASLT, "one GEMM with a bias + tanh-GELU epilogue (torch._addmm_activation)"
    return dispatch.TORCH, f"no epilogue GEMM on {device.type} (the CPU _addmm_activation uses the erf GELU)"


# --------------------------------------------------------------------------------------------------------------
# LlamaGen: the SwiGLU gate
def swiglu_ref(a, b):
    """The SwiGLU gate silu(a) * b (a = w1 x, b = w3 x, official rounding: silu in a's dtype, then the product)."""
    return F.silu(a) * b


def swiglu(a, b, backend=None):
    fn = dispatch.fast_kernel(_swiglu_kernel, backend, a.device)
    return (fn or swiglu_ref)(a, b)
