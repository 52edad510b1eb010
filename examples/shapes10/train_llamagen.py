"""Demo LlamaGen-style models, actually trained on SHAPES-10 (var_rt.demo.data), shipped in weights/:

    llamagen_vq.safetensors    a single-scale VQ of the VQ-16 family, smaller widths (ch 32, ch_mult 1,1,2: 32x32
                               images -> 8x8 tokens; 512 codes of dim 8, l2-normalised as codebook_l2_norm)
    llamagen_gpt.safetensors   a LlamaGen c2i GPT (dim 192, 6 layers, 6 heads; 10 classes + the null class)
                               with the official key names plus `freqs_cis`, which tells the loader the 8x8 grid
                               and the head dim, as the official FSDP-style files do

Both load through `LlamaGenPipeline.from_checkpoints` like the official files (weights stored fp16, the codebook
and freqs_cis fp32; loading casts). `load_demo_llamagen()` does that; `DEMO_SAMPLING` and `DEMO_ZIPAR_WINDOWS`
are the settings `var-rt demo` uses (all three live in the installed var_rt.demo.models; this script is not
installed). Retrain: `python examples/shapes10/train_llamagen.py --out var_rt/demo/weights`.

Training follows the official semantics, written here from them (tokenizer/tokenizer_image/vq_model.py, vq_loss,
autoregressive/train/train_c2i.py): the VQ encodes, l2-normalises z and the codebook, picks the nearest code,
and trains with an l2 reconstruction loss + codebook loss + 0.25 commitment loss and a straight-through
estimator. No LPIPS or GAN term (no pretrained network to download); instead unused codes are restarted on
encoder outputs, a common VQ training aid. The GPT sees [class token, tokens 0..62] and predicts tokens 0..63 with
a causal mask; the label is replaced by the null class with probability 0.1 (class dropout, for CFG).
Runs on the CPU with bf16 autocast (--fp32 to turn it off), one thread; reproducible from the seeds.
Importing this module trains nothing.
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

# the shipped files' folder and names, their loader and the settings `var-rt demo` uses
from var_rt.demo.models import (GPT_FILE, LLAMAGEN_MANIFEST as MANIFEST_FILE, LLAMAGEN_SAMPLING as DEMO_SAMPLING,
                                LLAMAGEN_ZIPAR_WINDOWS as DEMO_ZIPAR_WINDOWS, VQ_FILE, WEIGHTS_DIR,
                                load_demo_llamagen)
from var_rt.llamagen_pipeline import LlamaGenPipeline
from var_rt.models import llamagen, vq16
from var_rt.runtime import zipar

from train_var import Downsample2x as Downsample  # the official asymmetric-padding stride-2 conv (sibling script)

VQ_CONFIG = vq16.VQ16Config(codebook_size=512, embed_dim=8, z_channels=64, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
GPT_CONFIG = llamagen.LlamaGenConfig(dim=192, n_layer=6, n_head=6, vocab_size=512, num_classes=10, grid=8)

DATA = dict(n_per_class=1500, seed=4242)                       # SHAPES-10 training set (classifier: 7001 / 9001)
VQ_TRAIN = dict(seed=0, steps=700, batch=32, lr=1.5e-3, warmup=50, beta=0.25, restart_every=50, restart_until=500)
GPT_TRAIN = dict(seed=0, steps=600, batch=64, lr=1e-3, warmup=50, weight_decay=0.05, class_dropout=0.1)


# ---- VQ: the official encoder side (names encoder.*, quant_conv) around our VQ16 decoder ------------------------
class Encoder(nn.Module):
    """conv_in; per level (highest resolution first) num_res_blocks ResnetBlocks (+ AttnBlocks at the lowest
    resolution) and a Downsample except after the last; mid (res, attn, res); norm_out, SiLU, conv_out."""
    def __init__(self, cfg: vq16.VQ16Config):
        super().__init__()
        mult, n = cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        cin = cfg.ch
        for level in range(n):
            blk, res, attn = nn.Module(), nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                res.append(vq16.ResnetBlock(cin, cfg.ch * mult[level]))
                cin = cfg.ch * mult[level]
                if level == n - 1:
                    attn.append(vq16.AttnBlock(cin))
            blk.res, blk.attn = res, attn
            if level != n - 1:
                blk.downsample = Downsample(cin)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList([vq16.ResnetBlock(cin, cin), vq16.AttnBlock(cin), vq16.ResnetBlock(cin, cin)])
        self.norm_out = vq16._norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x):                       # (B, 3, H, W) -> (B, z, H / ds, W / ds)
        h = self.conv_in(x)
        for blk in self.conv_blocks:
            for i, r in enumerate(blk.res):
                h = r(h)
                if len(blk.attn):
                    h = blk.attn[i](h)
            if hasattr(blk, "downsample"):
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TrainVQ(vq16.VQ16):
    """The full VQ model (encoder, quant_conv, quantize, post_quant_conv, decoder): its state dict is the official
    file's layout, of which the runtime's VQ16 loads the decode half."""
    def __init__(self, cfg: vq16.VQ16Config = VQ_CONFIG):
        super().__init__(cfg)
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        with torch.no_grad():  # official init: uniform(-1/V, 1/V), then l2-normalised
            w = self.quantize.embedding.weight
            w.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            w.copy_(F.normalize(w, dim=-1))

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> normalised z (B, h, w, E) fp32, ids (B, h, w), normalised codebook."""
        z = F.normalize(self.quant_conv(self.encoder(x)).float().permute(0, 2, 3, 1), dim=-1)
        emb = F.normalize(self.quantize.embedding.weight.float(), dim=-1)
        ids = (z.detach() @ emb.T).argmax(-1)        # nearest unit vector = largest dot product
        return z, ids, emb

    def forward(self, x):
        """-> reconstruction (B, 3, H, W), codebook loss, commitment loss (without beta), ids."""
        z, ids, emb = self.encode(x)
        zq = emb[ids]
        cb, commit = (zq - z.detach()).square().mean(), (zq.detach() - z).square().mean()
        zq = z + (zq - z).detach()                  # straight-through
        return self.decoder(self.post_quant_conv(zq.permute(0, 3, 1, 2))).float(), cb, commit, ids

    @torch.no_grad()
    def tokens(self, x, batch=500):                 # (N, 3, H, W) -> (N, h*w) int64 raster order
        return torch.cat([self.encode(x[i:i + batch])[1].flatten(1) for i in range(0, len(x), batch)])


# ---- GPT: the training forward (all tokens at once, causal) over the runtime model's own parameters -----------
def gpt_logits(gpt: llamagen.LlamaGenGPT, labels, ids):
    """labels (B,) (num_classes = null), ids (B, T) -> logits (B, T + 1, V) fp32: position 0 is the class token;
    position t predicts token t. The same function as the cached `step()` (checked in the tests)."""
    c = gpt.cfg
    h = torch.cat([gpt.embed_classes(labels), gpt.embed_tokens(ids)], dim=1)          # (B, T+1, C)
    B, L, _ = h.shape
    rope = gpt.rope_table(h.device)[:L]
    for blk in gpt.layers:
        a = blk.attention
        q, k, v = a.wqkv(blk.attention_norm(h)).split([a.H * a.D, a.Hkv * a.D, a.Hkv * a.D], dim=-1)
        q = zipar.apply_rope(q.view(B, L, a.H, a.D), rope).transpose(1, 2)
        k = zipar.apply_rope(k.view(B, L, a.Hkv, a.D), rope).transpose(1, 2)
        v = v.view(B, L, a.Hkv, a.D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=a.H != a.Hkv)
        h = h + a.wo(o.transpose(1, 2).reshape(B, L, c.dim))
        h = h + blk.feed_forward(blk.ffn_norm(h))
    return gpt.output(gpt.norm(h)).float()


def _lr(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def _autocast(enabled):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def train_vq(x, hp=VQ_TRAIN, bf16=True, log=print):
    """x (N, 3, 32, 32) in [-1, 1] -> trained TrainVQ and a record."""
    torch.manual_seed(hp["seed"])
    g = torch.Generator().manual_seed(hp["seed"])
    vq = TrainVQ(VQ_CONFIG)
    opt = torch.optim.Adam(vq.parameters(), lr=hp["lr"], betas=(0.9, 0.95))
    V = VQ_CONFIG.codebook_size
    used = torch.zeros(V, dtype=torch.int64)
    t0, hist, restarts = time.time(), [], 0
    for step in range(hp["steps"]):
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, hp["steps"], hp["lr"], hp["warmup"])
        xb = x[torch.randint(0, len(x), (hp["batch"],), generator=g)]
        with _autocast(bf16):
            rec, cb, commit, ids = vq(xb)
        rec_loss = (rec - xb).square().mean()
        loss = rec_loss + cb + hp["beta"] * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        used += torch.bincount(ids.flatten(), minlength=V)
        if (step + 1) % hp["restart_every"] == 0:
            dead = (used == 0).nonzero().flatten()
            if step + 1 <= hp["restart_until"] and len(dead):   # restart unused codes on this batch's encoder outputs
                with torch.no_grad():
                    z = vq.encode(xb)[0].reshape(-1, VQ_CONFIG.embed_dim)
                    pick = torch.randint(0, len(z), (len(dead),), generator=g)
                    vq.quantize.embedding.weight[dead] = z[pick] + 0.01 * torch.randn(len(dead), z.shape[1], generator=g)
                restarts += len(dead)
            hist.append(dict(step=step + 1, rec=round(rec_loss.item(), 5), codebook=round(cb.item(), 5),
                             used=int((used > 0).sum()), restarted=len(dead)))
            log(f"vq step {step + 1}/{hp['steps']} rec {rec_loss.item():.4f} cb {cb.item():.4f} "
                f"codes used {int((used > 0).sum())}/{V} dead {len(dead)} ({time.time() - t0:.0f} s)")
            used.zero_()
    vq.eval().requires_grad_(False)
    return vq, dict(hp, bf16=bf16, seconds=round(time.time() - t0, 1), log=hist, codes_restarted=restarts)


def train_gpt(tokens, labels, hp=GPT_TRAIN, bf16=True, log=print):
    """tokens (N, 64) int64, labels (N,) -> trained LlamaGenGPT and a record."""
    torch.manual_seed(hp["seed"])
    g = torch.Generator().manual_seed(hp["seed"] + 1)
    gpt = llamagen.LlamaGenGPT(GPT_CONFIG)
    with torch.no_grad():  # official init: normal(0, 0.02) for Linear / Embedding, zero output head
        for name, p in gpt.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "output.weight":
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    decay = [p for n, p in gpt.named_parameters() if p.dim() >= 2]
    other = [p for n, p in gpt.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.95))
    gpt.train()
    t0, hist, run = time.time(), [], []
    for step in range(hp["steps"]):
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, hp["steps"], hp["lr"], hp["warmup"])
        i = torch.randint(0, len(tokens), (hp["batch"],), generator=g)
        ids, y = tokens[i], labels[i]
        y = torch.where(torch.rand(len(y), generator=g) < hp["class_dropout"], GPT_CONFIG.num_classes, y)
        with _autocast(bf16):
            logits = gpt_logits(gpt, y, ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        run.append(loss.item())
        if (step + 1) % 50 == 0:
            hist.append(dict(step=step + 1, loss=round(sum(run) / len(run), 4)))
            log(f"gpt step {step + 1}/{hp['steps']} loss {hist[-1]['loss']:.4f} ({time.time() - t0:.0f} s)")
            run = []
    gpt.eval().requires_grad_(False)
    return gpt, dict(hp, bf16=bf16, seconds=round(time.time() - t0, 1), log=hist)


def _save(sd, path, keep=()):
    """fp16 storage except the names in `keep` (fp32: tiny and precision-sensitive)."""
    from safetensors.torch import save_file
    save_file({k: (v if k in keep else v.half()).detach().contiguous().cpu() for k, v in sd.items()}, path)
    os.chmod(path, 0o644)


def save_vq(vq: TrainVQ, out: str):
    _save(vq.state_dict(), os.path.join(out, VQ_FILE), keep=("quantize.embedding.weight",))


def save_gpt(gpt: llamagen.LlamaGenGPT, out: str):
    """Official key names plus freqs_cis (official layout (1 + g^2, D/2, 2)): the loader reads grid and heads off it."""
    c = gpt.cfg
    sd = dict(gpt.state_dict(), freqs_cis=llamagen.rope_2d_table(c.grid, c.head_dim, c.rope_base, c.cls_token_num))
    _save(sd, os.path.join(out, GPT_FILE), keep=("freqs_cis",))


def load_train_vq(path: str) -> TrainVQ:
    """The full VQ (with the encoder) from a saved file, fp32: the tokenizer of the GPT stage."""
    from safetensors.torch import load_file
    vq = TrainVQ(VQ_CONFIG)
    vq.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    return vq.eval().requires_grad_(False)


def evaluate(pipe: LlamaGenPipeline, n_per_class=20, seed=0, sampling=None, windows=DEMO_ZIPAR_WINDOWS,
             grid_path=None, classifier_path=None) -> dict:
    """Classifier accuracy and Frechet distance (vs real held-out SHAPES-10, as many per class) of sequential and
    ZipAR samples; labels 0..9 repeated n_per_class times, image i seeded by (seed, i)."""
    from var_rt.demo import classifier
    net = classifier.load_classifier(classifier_path) if classifier_path else classifier.load_classifier()
    kw = dict(DEMO_SAMPLING if sampling is None else sampling)
    labels = torch.arange(pipe.num_classes).repeat(n_per_class)
    real = net.features(classifier.real_images(n_per_class)[0]).double()
    res = {}
    for w in (None, *windows):
        t = time.time()
        img = pipe(labels, seed=seed, zipar_window=w, **kw)
        name = "sequential" if w is None else f"zipar_w{w}"
        with torch.no_grad():
            pred = net(img).argmax(1)
            feats = net.features(img).double()
        res[name] = dict(accuracy=round(float((pred == labels).float().mean()), 4),
                         frechet=round(classifier.frechet_from_features(feats, real), 2),
                         per_class_accuracy=[round(float((pred[labels == c] == c).float().mean()), 2)
                                             for c in range(pipe.num_classes)],
                         passes=pipe.last_forward_passes, seconds=round(time.time() - t, 2))
        if grid_path:   # rows = classes, up to 10 samples each; one file per schedule
            from var_rt.images import save_grid
            order = torch.argsort(labels, stable=True).view(pipe.num_classes, -1)[:, :10].flatten()
            save_grid(img[order], grid_path.replace(".png", f"_{name}.png"), nrow=order.numel() // pipe.num_classes)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the demo LlamaGen-style VQ + GPT on SHAPES-10")
    p.add_argument("--out", default=WEIGHTS_DIR)
    p.add_argument("--stage", choices=("all", "vq", "gpt", "eval"), default="all",
                   help="vq: train and save the VQ; gpt: tokenize with the saved VQ, train the GPT, evaluate; "
                        "eval: only measure the saved models again")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (slower; other numbers)")
    p.add_argument("--vq-steps", type=int, default=VQ_TRAIN["steps"])
    p.add_argument("--gpt-steps", type=int, default=GPT_TRAIN["steps"])
    p.add_argument("--eval-per-class", type=int, default=20, help="0: no evaluation")
    p.add_argument("--classifier", default=None, help="classifier weights (default: the shipped ones)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of sequential samples here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from var_rt.demo.data import make_dataset
    os.makedirs(a.out, exist_ok=True)
    man_path = os.path.join(a.out, MANIFEST_FILE)
    man = {}
    if a.stage in ("gpt", "eval") and os.path.isfile(man_path):
        with open(man_path) as f:
            man = json.load(f)
    if a.stage != "eval":
        x, y = make_dataset(DATA["n_per_class"], seed=DATA["seed"])
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    man.update(data=dict(DATA, name="SHAPES-10", size=32), torch=torch.__version__)
    if a.stage in ("all", "vq"):
        vq, rec = train_vq(x, dict(VQ_TRAIN, steps=a.vq_steps), bf16=not a.fp32)
        save_vq(vq, a.out)
        man["vq"] = dict(config=VQ_CONFIG.__dict__, train=rec)
    if a.stage in ("all", "gpt"):
        vq = load_train_vq(os.path.join(a.out, VQ_FILE))          # tokens from the stored (fp16) weights
        t = time.time()
        tokens = vq.tokens(x)
        xr = vq.decode_tokens(tokens[:1000])
        man.setdefault("vq", {}).update(tokenize_seconds=round(time.time() - t, 1), codes_used_on_data=int(tokens.unique().numel()),
                                        rec_mse_first_1000=round(float((xr - x[:1000]).square().mean()), 5))
        gpt, rec = train_gpt(tokens, y, dict(GPT_TRAIN, steps=a.gpt_steps), bf16=not a.fp32)
        save_gpt(gpt, a.out)
        man["gpt"] = dict(config=GPT_CONFIG.__dict__, train=rec)
        man["files"] = {f: os.path.getsize(os.path.join(a.out, f)) for f in (GPT_FILE, VQ_FILE)}
        man["train_seconds_total"] = round(man["vq"].get("train", {}).get("seconds", 0) + rec["seconds"], 1)
    if a.stage in ("all", "gpt", "eval") and a.eval_per_class:
        pipe = load_demo_llamagen(weights_dir=a.out, backend="torch")
        try:
            man["eval"] = dict(n_per_class=a.eval_per_class, seed=0, sampling=DEMO_SAMPLING,
                               classifier=a.classifier or "var_rt/demo/weights/classifier.safetensors",
                               results=evaluate(pipe, a.eval_per_class, grid_path=a.grid, classifier_path=a.classifier))
        except FileNotFoundError as e:   # the classifier's weights are not there yet
            man["eval"] = f"skipped: {e}"
    with open(man_path, "w") as f:
        json.dump(man, f, indent=1, default=list)
    print(json.dumps({k: man.get(k) for k in ("files", "train_seconds_total", "eval")}, indent=1, default=list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
