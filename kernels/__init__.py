"""Triton kernels of var_rt, installed as `var_rt.kernels` (this folder is `kernels/` in the repo root).

One module per op; each exposes exactly the signature of its torch reference in `var_rt.ops`:
    attention.var_attention(q, k, v, scale_mul, q_scale=None, k_scale=None, out=None)
    adaln.adaln(x, scale, shift, eps=1e-6, out=None)
    resample.upsample_bicubic(x, size, out=None), resample.downsample_area(x, size, out=None)
    sampling.sample_tokens(logits, seeds, step, top_k=0, top_p=0.0, temperature=1.0, out=None)
Importing a kernel module without triton installed raises ImportError (var_rt.ops then falls back to the
reference). This package itself imports nothing heavy, so `import var_rt.kernels` always works.
Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""
MODULES = ("attention", "adaln", "resample", "sampling", "zipar_attention", "rmsnorm", "rope_kv", "swiglu")
__all__ = list(MODULES)
