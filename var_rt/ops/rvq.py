"""Residual-VQ accumulation, the VQVAE side of one VAR scale; its fast path is var_rt._C (CPU loop or CUDA kernel)
through var_rt._ext, which checks every argument before handing _C raw pointers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var_rt import _ext
from var_rt.ops import dispatch


def rvq_step_ref(idx, codebook, phi_w, phi_b, f_hat, pn: int, pn_next: int | None, resi: float = 0.5):
    """One scale of residual-VQ accumulation, in place on f_hat (B, Cv, H, H) fp32.
    idx (B, pn*pn) int64; codebook (V, Cv); phi_w (Cv, Cv, 3, 3), phi_b (Cv,).
    h = codebook[idx] as (B, Cv, pn, pn); upsampled bicubic to H unless pn == H; f_hat += (1-resi) h + resi conv(h).
    Returns the next scale's input rows (B, pn_next^2, Cv) = area-downsample(f_hat), or None for the last scale."""
    B, Cv, H, _ = f_hat.shape
    h = codebook[idx].transpose(1, 2).reshape(B, Cv, pn, pn).float().contiguous()  # NCHW whatever B (B = 1 too)
    if pn != H:
        h = F.interpolate(h, size=(H, H), mode="bicubic")
    # the Phi conv image by image: a conv's result can differ in the last bit with the batch size (oneDNN / cuDNN
    # choose algorithms by shape), and f_hat must not depend on the batch (pipeline_base.DECODE_CHUNK)
    w, b = phi_w.float(), phi_b.float()
    conv = torch.cat([F.conv2d(h[i:i + 1].clone(memory_format=torch.contiguous_format), w, b, padding=1)
                      for i in range(B)])
    f_hat.add_(h * (1 - resi) + conv * resi)
    if pn_next is None:
        return None
    nxt = f_hat if pn_next == H else F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
    return nxt.reshape(B, Cv, pn_next * pn_next).transpose(1, 2)


def rvq_step(idx, codebook, phi_w, phi_b, f_hat, pn: int, pn_next: int | None, resi: float = 0.5, backend=None):
    """The fast backend runs _C wherever it loads (its CPU loop on the CPU too); `_ext.rvq_step_fn` (looked up at
    call time: the cost model's patch point) says None, after one warning, where it cannot."""
    if dispatch.backend_for(backend, f_hat.device) != "torch":
        fn = _ext.rvq_step_fn(f_hat.device)
        if fn is not None:
            return fn(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi)
    return rvq_step_ref(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi)


@dispatch.describes("rvq_step")
def _describe_rvq_step(device):
    impl, why = _ext.describe(device, "fast")
    return {"cpp": dispatch.C_CPU, "cuda": dispatch.C_CUDA}.get(impl, dispatch.TORCH), why
