"""The ONE dispatch point for every op var_rt's models call: `from var_rt import ops; ops.var_attention(...)`.

Each op has a torch reference (`<op>_ref`, `backend="torch"`): it is the spec, documented with its shapes, dtypes
and semantics, and every fast path is tested against it. The fast backend ("fast") runs a Triton kernel
(var_rt.kernels.<module>.<fn>, same signature, imported by an explicit loader beside the op), the C++/CUDA extension
var_rt._C (rvq_step, through var_rt._ext) or a cuBLASLt epilogue (linear_gelu). `VAR_RT_BACKEND=torch|fast`
("triton" and "cuda" are aliases of fast), `backend=` or `use_backend(...)` force a path; a fast path that cannot
run falls back to the reference with one warning, never silently wrong. `describe_backends` says, per op, which
implementation runs and why (`var-rt info`).

    dispatch.py   backends, use_backend, the Triton gate (triton_fn: the one patch point), describe_backends
    attention.py  var_attention (VAR, + KV-pool write), zipar_attention (LlamaGen/ZipAR) and its visibility mask
    norms.py      adaln, residual_adaln, group_norm_silu, residual_group_norm_silu, rms_norm, residual_rms_norm
    gemm.py       linear, Linear (the transformers' GEMMs; rows padded on the CPU: batch-independent results)
    mlp.py        linear_gelu (cuBLASLt epilogue), swiglu
    rope.py       apply_rope, rope_kv_write
    resample.py   upsample_bicubic, downsample_area
    sampling.py   sample_tokens, guide_logits_ref, filter_logits_ref, exponential_noise, mix_seed
    rvq.py        rvq_step (var_rt._C)
"""
from var_rt.ops import dispatch
from var_rt.ops.attention import (RowsVisibility, causal_attention_rows_ref, rows_visibility, var_attention,
                                  var_attention_ref, zipar_attention, zipar_attention_ref, zipar_visibility_mask)
from var_rt.ops.dispatch import BACKENDS, default_backend, describe_backends, resolve_backend, use_backend
from var_rt.ops.gemm import Linear, linear
from var_rt.ops.mlp import linear_gelu, linear_gelu_ref, swiglu, swiglu_ref
from var_rt.ops.norms import (adaln, adaln_ref, decoder_channels_last, group_norm_silu, group_norm_silu_ref,
                              residual_adaln, residual_adaln_ref, residual_group_norm_silu,
                              residual_group_norm_silu_ref, residual_rms_norm, residual_rms_norm_ref, rms_norm,
                              rms_norm_ref)
from var_rt.ops.resample import downsample_area, downsample_area_ref, upsample_bicubic, upsample_bicubic_ref
from var_rt.ops.rope import apply_rope, rope_kv_write, rope_kv_write_ref
from var_rt.ops.rvq import rvq_step, rvq_step_ref
from var_rt.ops.sampling import (exponential_noise, filter_logits_ref, guide_logits_ref, mix_seed, sample_tokens,
                                 sample_tokens_ref)

__all__ = [
    "dispatch", "BACKENDS", "resolve_backend", "use_backend", "default_backend", "describe_backends",
    "var_attention", "var_attention_ref", "zipar_attention", "zipar_attention_ref", "zipar_visibility_mask",
    "RowsVisibility", "rows_visibility", "causal_attention_rows_ref",
    "adaln", "adaln_ref", "residual_adaln", "residual_adaln_ref", "group_norm_silu", "group_norm_silu_ref",
    "residual_group_norm_silu", "residual_group_norm_silu_ref", "decoder_channels_last",
    "rms_norm", "rms_norm_ref", "residual_rms_norm", "residual_rms_norm_ref",
    "linear", "Linear", "linear_gelu", "linear_gelu_ref", "swiglu", "swiglu_ref", "apply_rope", "rope_kv_write", "rope_kv_write_ref",
    "upsample_bicubic", "upsample_bicubic_ref", "downsample_area", "downsample_area_ref",
    "sample_tokens", "sample_tokens_ref", "guide_logits_ref", "filter_logits_ref", "exponential_noise", "mix_seed",
    "rvq_step", "rvq_step_ref",
]
