"""Triton kernels of var_rt, installed as `var_rt.kernels` (this folder is `kernels/` in the repo root).

One module per op family; var_rt.ops imports each kernel explicitly (a loader beside its torch reference) and calls
it with its reference's arguments. The signatures:
    attention.var_attention(qkv, kv, start, scale_mul, q_scale=None, k_scale=None, out=None)   -> (N, l, H*D)
    adaln.adaln(x, scale, shift, eps=1e-6, out=None)
    adaln.residual_adaln(x, y, gamma, scale, shift, eps=1e-6)                      -> (x + y*gamma, adaln(...))
    resample.upsample_bicubic(x, size, out=None), resample.downsample_area(x, size, out=None)
    sampling.sample_tokens(logits, seeds, step, top_k=0, top_p=0.0, temperature=1.0, guidance=None, out=None)
    groupnorm.group_norm_silu(x, weight, bias, groups, eps=1e-6, silu=True, out=None)
    groupnorm.residual_group_norm_silu(x, r, weight, bias, groups, eps=1e-6, silu=True)  -> (x + r, gn(x + r))
    zipar_attention.zipar_attention(q, k_cache, v_cache, q_slot, counts, prefix, tpr, rope=None, out=None,
                                    n_keys=None, num_splits=None)                   (ops passes vis's fields)
    rmsnorm.rms_norm(x, weight, eps=1e-5), rmsnorm.residual_rms_norm(x, y, weight, eps=1e-5) -> (x + y, rms(x + y))
    rope_kv.rope_kv_write(k, v, k_cache, v_cache, slots, rope)                      -> None (writes the caches)
    swiglu.swiglu(a, b, out=None)
Importing a kernel module without triton installed raises ImportError (var_rt.ops then falls back to the
reference). This package itself imports nothing heavy, so `import var_rt.kernels` always works.
Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""
MODULES = ("attention", "adaln", "resample", "sampling", "groupnorm", "zipar_attention", "rmsnorm", "rope_kv",
           "swiglu")
__all__ = list(MODULES)
