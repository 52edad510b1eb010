"""An independent restatement of the official VAR computation, for tests only.

Written from FoundationVision/VAR (models/var.py `forward` with the training mask, quant.py
`get_next_autoregressive_input`), working on a raw state dict in the official key names. It shares no code
with var_rt's models or engine, so agreement checks the KV cache, the scale inputs and the CFG schedule.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def _ln(x, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def teacher_forced_logits(sd, patch_nums, labels2, x_inputs, heads):
    """Full-sequence forward with the block-causal training mask. x_inputs (2B, L - 1, Cvae): the
    teacher-forcing inputs of scales 1..K-1. Returns (2B, L, V) logits."""
    C = sd["class_emb.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    L = sum(p * p for p in patch_nums)
    lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])
    cond = sd["class_emb.weight"][labels2]
    sos = cond.unsqueeze(1) + sd["pos_start"]
    x = torch.cat([sos, F.linear(x_inputs, sd["word_embed.weight"], sd["word_embed.bias"])], dim=1)
    x = x + sd["lvl_embed.weight"][lvl].unsqueeze(0) + sd["pos_1LC"]
    mask = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf)
    shared = "shared_ada_lin.1.weight" in sd
    if shared:
        gss = F.linear(F.silu(cond), sd["shared_ada_lin.1.weight"], sd["shared_ada_lin.1.bias"]).view(-1, 1, 6, C)
    N = x.shape[0]
    D = C // heads
    for i in range(depth):
        p = f"blocks.{i}."
        if shared:
            ada = sd[p + "ada_gss"] + gss
        else:
            ada = F.linear(F.silu(cond), sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"]).view(-1, 1, 6, C)
        g1, g2, s1, s2, b1, b2 = ada.unbind(2)
        h = _ln(x) * (1 + s1) + b1
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(C), sd[p + "attn.v_bias"]])
        qkv = F.linear(h, sd[p + "attn.mat_qkv.weight"], bias).view(N, L, 3, heads, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        sm = sd[p + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        q = F.normalize(q, dim=-1) * sm
        k = F.normalize(k, dim=-1)
        a = ((q @ k.transpose(-1, -2)) + mask).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(N, L, C), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + a * g1
        h = _ln(x) * (1 + s2) + b2
        h = F.linear(F.gelu(F.linear(h, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]), approximate="tanh"),
                     sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"])
        x = x + h * g2
    scale, shift = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"]).view(-1, 1, 2, C).unbind(2)
    return F.linear(_ln(x) * (1 + scale) + shift, sd["head.weight"], sd["head.bias"])


def phi_conv(vae_sd, si, K):
    n = 1 + max(int(k.split(".")[3]) for k in vae_sd if k.startswith("quantize.quant_resi.qresi_ls."))
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    i = int(np.argmin(np.abs(ticks - si / (K - 1))))
    return vae_sd[f"quantize.quant_resi.qresi_ls.{i}.weight"], vae_sd[f"quantize.quant_resi.qresi_ls.{i}.bias"]


def teacher_inputs(vae_sd, patch_nums, tokens):
    """Official get_next_autoregressive_input chain: returns (x_inputs (B, L-1, Cvae), f_hat)."""
    emb = vae_sd["quantize.embedding.weight"]
    B, Cv, H, K = tokens[0].shape[0], emb.shape[1], patch_nums[-1], len(patch_nums)
    f_hat = torch.zeros(B, Cv, H, H)
    nxt = []
    for si, pn in enumerate(patch_nums):
        h = emb[tokens[si]].transpose(1, 2).reshape(B, Cv, pn, pn)
        if si != K - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        w, b = phi_conv(vae_sd, si, K)
        f_hat = f_hat + h * 0.5 + F.conv2d(h, w, b, padding=1) * 0.5
        if si != K - 1:
            pnn = patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pnn, pnn), mode="area").view(B, Cv, -1).transpose(1, 2))
    return torch.cat(nxt, dim=1), f_hat
