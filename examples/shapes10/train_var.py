"""Train the embedded VAR demo models on SHAPES-10 (32x32 px), reproducibly from a seed, on the CPU.

    python examples/shapes10/train_var.py --out var_rt/demo/weights            # all stages, about 22 min on one core
    python examples/shapes10/train_var.py --out /tmp/w --stages drafter,refiner  # reuse vae.safetensors from --out

Stages (each saves its files in the official key names, so they load through `VARPipeline.from_checkpoints`):
1. vae: a multi-scale residual VQVAE of the official family with small widths: official `Encoder` module tree
   (`encoder.*`) + `quant_conv`, and var_rt's own Quantizer / post_quant_conv / Decoder. Losses: L1 + MSE on
   pixels, and the official residual-VQ loss (per scale: beta |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2), straight-
   through to the encoder. Unused codes are restarted from current residuals (keeps the small codebook alive).
2. classifier: the SHAPES-10 scorer (var_rt.demo.classifier).
3. drafter / refiner: VAR transformers (var_rt.models.var.VAR, the inference class itself) trained teacher-forced
   on the VQVAE's multi-scale tokens (inputs built with ops.rvq_step_ref, the op sampling runs): one
   block-causal pass over the whole pyramid. `teacher_logits` runs it through the inference `forward_tokens`
   (fresh KV buffer per layer, ops.var_attention); training uses `teacher_logits_fast`, the same function of
   the same parameters without buffer copies (tests: equal logits and gradients). 10% of the labels are
   replaced by the null class so that classifier-free guidance works.
Finally the shipped (fp16) files are loaded back through from_checkpoints and scored; the manifest records
config, seeds, data, steps, losses, times and the measured accuracies.

Not part of the installed package: what `var-rt demo` needs at run time (file names, loaders, the sampling
settings) is var_rt.demo.models, imported here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from var_rt import ops
from var_rt.demo.data import NUM_CLASSES, make_dataset
# the shipped files' folder and names, their loaders and the demo settings written to the manifest
from var_rt.demo.models import (VAR_CODE_STEPS as CODE_STEPS, VAR_MANIFEST as MANIFEST,  # noqa: F401
                                VAR_SAMPLING as SAMPLING, WEIGHTS_DIR, demo_code_steps, demo_sampling,
                                load_demo_var, load_manifest, sample_classes)
from var_rt.models import var as var_model
from var_rt.models import vqvae as vqvae_model
# the official Encoder module tree (`encoder.*`) and its asymmetric-padding Downsample2x (train_llamagen uses it)
from var_rt.models.vqvae_encoder import Downsample2x, Encoder  # noqa: F401

PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # 130 tokens; the last map is the 8x8 latent of a 32x32 image
VAE_CFG = vqvae_model.VQVAEConfig(vocab=256, cvae=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
DRAFTER = dict(depth=4, width=128, heads=2)
REFINER = dict(depth=2, width=128, heads=2)
DATA_SEEDS = {"vae": 1001, "var": 2001}  # SHAPES-10 seeds (classifier: 7001, held-out reference: 9001)


# ---------------------------------------------------------------------------------------------------------------
# VQVAE: the training half (encoder + quant_conv) around var_rt's inference half
# (the encoder and its Downsample2x are var_rt's own, var_rt.models.vqvae_encoder, which editing loads)


class TrainVQVAE(nn.Module):
    """encoder + quant_conv + var_rt's VQVAE; state_dict() has exactly the official VQVAE key names."""

    def __init__(self, cfg=VAE_CFG, patch_nums=PATCH_NUMS, beta=0.25):
        super().__init__()
        self.cfg, self.patch_nums, self.beta = cfg, tuple(patch_nums), beta
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.cvae, cfg.cvae, 3, 1, 1)
        self.vae = vqvae_model.VQVAE(cfg)
        self.register_buffer("hits", torch.zeros(len(patch_nums), cfg.vocab))  # saved as quantize.ema_vocab_hit_SV

    def official_state_dict(self) -> dict:
        sd = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        sd.update({f"quant_conv.{k}": v for k, v in self.quant_conv.state_dict().items()})
        sd.update(self.vae.state_dict())
        sd["quantize.ema_vocab_hit_SV"] = self.hits.clone()
        return sd

    def encode(self, img):  # (B, 3, H, W) in [-1, 1] -> f (B, Cvae, h, w)
        return self.quant_conv(self.encoder(img))

    def _nearest(self, z_NC):
        E = self.vae.quantize.embedding.weight.detach()
        d = z_NC.square().sum(1, keepdim=True) + E.square().sum(1) - 2 * z_NC @ E.T  # (N, V)
        return d.argmin(1)

    def quantize(self, f, collect=False):
        """Official multi-scale residual quantization of f (B, Cvae, H, W). Returns (f_hat with straight-through
        gradient to f, vq loss, token ids per scale [(B, pn^2)], residual vectors of each scale if collect)."""
        B, C, H, W = f.shape
        K, E = len(self.patch_nums), self.vae.quantize.embedding
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        loss, ids, rests = 0.0, [], []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != H else f_rest
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx = self._nearest(z_NC)
            if collect:
                rests.append(z_NC)
            ids.append(idx.view(B, pn * pn))
            self.hits[si].mul_(0.9).add_(idx.bincount(minlength=self.cfg.vocab).float(), alpha=0.1)
            h = E(idx).view(B, pn, pn, C).permute(0, 3, 1, 2)
            if pn != H:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            phi = self.vae.phi(si, K)
            h = h * (1 - self.cfg.quant_resi) + phi(h) * self.cfg.quant_resi
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        f_st = f_hat.detach() - f.detach() + f
        return f_st, loss / K, ids, rests

    def forward(self, img):
        f_st, vq_loss, ids, rests = self.quantize(self.encode(img), collect=True)
        rec = self.vae.decoder(self.vae.post_quant_conv(f_st))
        return rec, vq_loss, ids, rests

    @torch.no_grad()
    def restart_dead_codes(self, rests, g, threshold=0.03) -> int:
        """Codes hit less than `threshold` times per step (EMA, all scales) take a random current residual."""
        dead = (self.hits.sum(0) < threshold).nonzero().flatten()
        if len(dead):
            pool = torch.cat(rests)
            pick = torch.randint(len(pool), (len(dead),), generator=g)
            noise = 0.01 * torch.randn(len(dead), pool.shape[1], generator=g)
            self.vae.quantize.embedding.weight[dead] = pool[pick] + noise
            self.hits[:, dead] = 1.0
        return len(dead)


def cosine_lr(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train_vae(steps=600, batch_per_class=3, lr=2e-3, seed=0, log=print):
    """Fresh SHAPES-10 images every step (seed DATA_SEEDS['vae'] + step): no image is seen twice."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TrainVQVAE()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, hist, restarts = time.time(), [], 0
    for step in range(steps):
        x = torch.from_numpy(make_dataset(batch_per_class, seed=DATA_SEEDS["vae"] * 100_000 + step)[0])
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, steps, lr, 30)
        rec, vq_loss, _, rests = model(x)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 0 or (step % 25 == 0 and step < steps * 0.8):
            restarts += model.restart_dead_codes(rests, g, threshold=1e9 if step == 0 else 0.03)
        hist.append((rec_loss.item(), vq_loss.item()))
        if (step + 1) % 50 == 0:
            r = sum(h[0] for h in hist[-50:]) / 50
            q = sum(h[1] for h in hist[-50:]) / 50
            log(f"vae step {step + 1}/{steps} rec {r:.4f} vq {q:.4f} restarts {restarts} ({time.time() - t0:.0f} s)")
    model.eval()
    rec = {"steps": steps, "batch": batch_per_class * NUM_CLASSES, "lr": lr, "seed": seed,
           "data": {"seed_base": DATA_SEEDS["vae"] * 100_000, "fresh_per_step": True},
           "loss_curve": [[i + 1, round(sum(h[0] for h in hist[i - 49:i + 1]) / 50, 5),
                           round(sum(h[1] for h in hist[i - 49:i + 1]) / 50, 5)] for i in range(49, steps, 50)],
           "code_restarts": restarts, "train_seconds": round(time.time() - t0, 1)}
    return model, rec


# ---------------------------------------------------------------------------------------------------------------
# VAR: teacher-forced training through the inference model's own forward
def new_var(spec: dict, seed: int) -> var_model.VAR:
    """A VAR of the demo sizes with the official initialisation scheme (trunc-normal std sqrt(1/3C), small head,
    AdaLN gammas ~0 so every block starts near the identity)."""
    torch.manual_seed(seed)
    cfg = var_model.VARConfig(vocab=VAE_CFG.vocab, cvae=VAE_CFG.cvae, num_classes=NUM_CLASSES, patch_nums=PATCH_NUMS,
                              **spec)
    m = var_model.VAR(cfg)
    C, std = cfg.width, math.sqrt(1 / cfg.width / 3)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(mod.weight, std=std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
        for p in (m.pos_start, m.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        m.head.weight.mul_(0.02)
        m.head_nm.ada_lin[1].weight.mul_(0.5)
        for blk in m.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))
            blk.ada_lin[1].weight[2 * C:].mul_(0.5)
            blk.ada_lin[1].weight[:2 * C].mul_(1e-5)
    return m


def level_ids(patch_nums) -> torch.Tensor:
    return torch.cat([torch.full((p * p,), i, dtype=torch.int32) for i, p in enumerate(patch_nums)])


def teacher_logits(model: var_model.VAR, labels: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """labels (B,) (null class = num_classes allowed); x_in (B, L-1, Cvae) teacher-forcing inputs of scales 1..K-1.
    One block-causal pass over the whole pyramid, the same computation as CoDe's refiner prefill. (B, L, V)."""
    state = model.prepare(labels)
    pns = model.cfg.patch_nums
    lvl_pos = torch.cat([model.lvl_pos(s) for s in range(1, len(pns))], dim=1)  # (1, L-1, C)
    x = torch.cat((model.scale_input(0, state, None), model.word_embed(x_in) + lvl_pos), dim=1)
    kv = [x.new_zeros(model.kv_shape(len(labels))) for _ in model.blocks]
    ids = level_ids(pns)
    with ops.use_backend("torch"):
        h = model.forward_tokens(x, state, kv, 0, ids, ids)
        return model.logits(h)


def teacher_logits_fast(model: var_model.VAR, labels: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """The same function as teacher_logits on the same parameters, written for training speed on a CPU: no KV
    buffer writes (their backward copies whole buffers) and torch's fused masked attention. A test checks that
    both give the same logits and gradients."""
    cfg = model.cfg
    state = model.prepare(labels)
    lvl_pos = torch.cat([model.lvl_pos(s) for s in range(1, len(cfg.patch_nums))], dim=1)
    x = torch.cat((model.scale_input(0, state, None), model.word_embed(x_in) + lvl_pos), dim=1)  # (B, L, C)
    B, L, C = x.shape
    H, D = cfg.heads, cfg.head_dim
    lvl = level_ids(cfg.patch_nums)
    mask = torch.zeros(L, L).masked_fill_(lvl.view(1, -1) > lvl.view(-1, 1), float("-inf"))  # block-causal
    for blk, (g1, g2, s1, s2, b1, b2) in zip(model.blocks, state["ada"]):
        a = blk.attn
        h = F.layer_norm(x, (C,), eps=cfg.eps) * (1 + s1) + b1
        bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
        q, k, v = F.linear(h, a.mat_qkv.weight, bias).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        scale_mul = a.scale_mul_1H11.view(1, H, 1, 1).clamp_max(var_model.MAX_SCALE_MUL).exp()
        o = F.scaled_dot_product_attention(F.normalize(q, dim=-1) * scale_mul, F.normalize(k, dim=-1), v,
                                           attn_mask=mask, scale=1.0)
        x = x + a.proj(o.transpose(1, 2).reshape(B, L, C)) * g1
        x = x + blk.ffn(F.layer_norm(x, (C,), eps=cfg.eps) * (1 + s2) + b2) * g2
    scale, shift = state["head"]
    return model.head(F.layer_norm(x, (C,), eps=cfg.eps) * (1 + scale) + shift)


@torch.no_grad()
def var_tokens(model: TrainVQVAE, images, bs=500):
    """Multi-scale token ids (N, L) and teacher-forcing inputs (N, L-1, Cvae) of images in [-1, 1] (the official
    idxBl_to_var_input: after each scale, f_hat area-downsampled to the next scale's size)."""
    ids_all, x_all = [], []
    pns, K = model.patch_nums, len(model.patch_nums)
    E = model.vae.quantize.embedding.weight
    for i in range(0, len(images), bs):
        f = model.encode(images[i:i + bs])
        _, _, ids, _ = model.quantize(f)
        B, H = f.shape[0], pns[-1]
        f_hat, rows = torch.zeros_like(f), []
        for si in range(K - 1):
            phi = model.vae.phi(si, K)
            nxt = ops.rvq_step_ref(ids[si], E, phi.weight, phi.bias, f_hat, pns[si], pns[si + 1])
            rows.append(nxt)
        ids_all.append(torch.cat(ids, 1))
        x_all.append(torch.cat(rows, 1))
    return torch.cat(ids_all), torch.cat(x_all)


def train_var(spec, ids, x_in, labels, steps, batch=64, lr=2e-3, seed=0, cond_drop=0.1, name="var", log=print):
    model = new_var(spec, seed)
    g = torch.Generator().manual_seed(seed + 17)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    N, t0, hist = len(labels), time.time(), []
    perm, pos = torch.randperm(N, generator=g), 0
    for step in range(steps):
        if pos + batch > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        lab = labels[idx].clone()
        lab[torch.rand(len(idx), generator=g) < cond_drop] = NUM_CLASSES
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, steps, lr, 40)
        logits = teacher_logits_fast(model, lab, x_in[idx])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        hist.append(loss.item())
        if (step + 1) % 25 == 0:
            log(f"{name} step {step + 1}/{steps} loss {sum(hist[-25:]) / 25:.4f} ({time.time() - t0:.0f} s)")
    model.eval().requires_grad_(False)
    rec = {**spec, "steps": steps, "batch": batch, "lr": lr, "seed": seed, "cond_drop": cond_drop,
           "loss_curve": [[i + 1, round(sum(hist[i - 24:i + 1]) / 25, 4)] for i in range(24, steps, 25)],
           "train_seconds": round(time.time() - t0, 1)}
    return model, rec


def official_var_state_dict(model: var_model.VAR, half=True) -> dict:
    """Weights plus the buffers the official VAR saves: lvl_1L (read back for patch_nums), the training mask,
    zero_k_bias."""
    cfg = model.cfg
    sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    lvl = level_ids(cfg.patch_nums).long()
    sd["lvl_1L"] = lvl.view(1, -1)
    mask = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf)
    sd["attn_bias_for_masking"] = mask.view(1, 1, cfg.L, cfg.L).half()
    for i in range(cfg.depth):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(cfg.width, dtype=torch.float16)
    return sd


def save_sd(sd: dict, path: str, half=True) -> None:
    from safetensors.torch import save_file
    save_file({k: (v.half() if half and v.is_floating_point() else v).detach().contiguous()
               for k, v in sd.items()}, path)


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the VAR demo models (VQVAE, classifier, drafter, refiner)")
    p.add_argument("--out", default=WEIGHTS_DIR)
    p.add_argument("--stages", default="vae,classifier,drafter,refiner,eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--drafter-steps", type=int, default=640)
    p.add_argument("--refiner-steps", type=int, default=640)
    p.add_argument("--var-images-per-class", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)  # one core: another training may share the machine; also deterministic
    try:
        return _train(a)
    finally:
        torch.set_num_threads(threads)


def _train(a) -> int:
    os.makedirs(a.out, exist_ok=True)
    stages = a.stages.split(",")
    man = load_manifest(a.out)
    man.setdefault("dataset", {"name": "SHAPES-10", "module": "var_rt.demo.data", "size": 32, "seeds": DATA_SEEDS})
    man["patch_nums"] = list(PATCH_NUMS)
    man["vae_config"] = {k: getattr(VAE_CFG, k) for k in VAE_CFG.__dataclass_fields__}
    man["sampling"], man["code_steps"] = dict(SAMPLING), list(CODE_STEPS)
    man["torch"], man["threads"] = torch.__version__, a.threads

    def write_manifest():
        with open(os.path.join(a.out, MANIFEST), "w") as f:
            json.dump(man, f, indent=1)

    if "vae" in stages:
        vae, man["vae"] = train_vae(steps=a.vae_steps, seed=a.seed)
        save_sd(vae.official_state_dict(), os.path.join(a.out, "vae.safetensors"), half=False)
        write_manifest()
    if "classifier" in stages:
        from var_rt.demo import classifier
        net, man["classifier"] = classifier.train(seed=a.seed, steps=400)
        classifier.save(net, os.path.join(a.out, "classifier.safetensors"))
        write_manifest()
    if "drafter" in stages or "refiner" in stages:
        vae = load_train_vae(os.path.join(a.out, "vae.safetensors"))
        t0 = time.time()
        x, y = make_dataset(a.var_images_per_class, seed=DATA_SEEDS["var"])
        ids, x_in = var_tokens(vae, torch.from_numpy(x))
        labels = torch.from_numpy(y)
        man["var_data"] = {"n_per_class": a.var_images_per_class, "seed": DATA_SEEDS["var"],
                           "tokenize_seconds": round(time.time() - t0, 1)}
        print(f"tokenized {len(labels)} images in {time.time() - t0:.0f} s")
        for name, spec, steps, s in (("drafter", DRAFTER, a.drafter_steps, a.seed + 1),
                                     ("refiner", REFINER, a.refiner_steps, a.seed + 2)):
            if name in stages:
                m, man[name] = train_var(spec, ids, x_in, labels, steps, seed=s, name=name)
                save_sd(official_var_state_dict(m), os.path.join(a.out, f"var_{name}.safetensors"))
                write_manifest()
    man["train_seconds_total"] = round(sum(man.get(k, {}).get(t, 0) for k, t in (
        ("vae", "train_seconds"), ("classifier", "train_seconds"), ("var_data", "tokenize_seconds"),
        ("drafter", "train_seconds"), ("refiner", "train_seconds"))), 1)
    if "eval" in stages:
        man["eval"] = evaluate_shipped(a.out, man)
    write_manifest()
    print(json.dumps({k: man[k] for k in ("sampling", "code_steps", "eval") if k in man}, indent=1))
    return 0


def load_train_vae(path) -> TrainVQVAE:
    from safetensors.torch import load_file
    sd = load_file(path)
    m = TrainVQVAE()
    m.encoder.load_state_dict({k[8:]: v.float() for k, v in sd.items() if k.startswith("encoder.")})
    m.quant_conv.load_state_dict({k[11:]: v.float() for k, v in sd.items() if k.startswith("quant_conv.")})
    m.vae.load_state_dict({k: v.float() for k, v in sd.items()
                           if not k.startswith(("encoder.", "quant_conv.", "quantize.ema"))})
    return m.eval().requires_grad_(False)


def evaluate_shipped(folder, man, n_per_class=50, seed=0) -> dict:
    """Score the files as shipped: VQVAE reconstructions of held-out images, drafter alone, CoDe at both N."""
    from var_rt.demo import classifier
    if os.path.isfile(os.path.join(folder, "classifier.safetensors")):
        classifier.use_weights(os.path.join(folder, "classifier.safetensors"))
    out = {}
    xr, yr = classifier.real_images(n_per_class)
    vae = load_train_vae(os.path.join(folder, "vae.safetensors"))
    with torch.no_grad():
        rec01 = vae(xr * 2 - 1)[0].clamp(-1, 1).add(1).mul(0.5)
    out["vae_reconstruction"] = classifier.evaluate("vae reconstruction", rec01, yr)
    samp = man.get("sampling", SAMPLING)
    for n in (None, *man.get("code_steps", CODE_STEPS)):
        pipe = load_demo_var(n, folder)
        t0 = time.time()
        imgs, labels = sample_classes(pipe, n_per_class, seed=seed, **samp)
        name = "var drafter" if n is None else f"code N={n}"
        out[name] = classifier.evaluate(name, imgs, labels, time.time() - t0)
        print(classifier.format_table([out[name]]).splitlines()[-1])
    return out


if __name__ == "__main__":
    raise SystemExit(main())
