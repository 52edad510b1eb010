"""User API for LlamaGen c2i (+ ZipAR): `LlamaGenPipeline.from_checkpoints(gpt=..., vq=...)`, then
`pipe(class_labels, ...)`.

Sampling follows the official `autoregressive/models/generate.py`: CFG when cfg > 1 with the null class (batch
2B, conditional rows first; logits = uncond + (cond - uncond) * cfg), cfg_interval (token t >= 1 drops CFG once
t - 1 > cfg_interval; the first token always uses it), then logits / max(temperature, 1e-5), top-k, top-p
(HF top_k_top_p_filtering), softmax, draw. The draw is the exponential-noise argmax with noise
ops.exponential_noise(seeds, t, ...) where t is the raster index of the drawn token, so any schedule (sequential,
ZipAR with any window) draws the same noise for the same token; w = tokens per row reproduces sequential decoding.
On the fast backend with top_p = 1 the draw is ops.sample_tokens, one launch per pass (Triton: CFG mixed in-kernel
as (1 + t) cond - t uncond with t = cfg - 1, or 0 past cfg_interval; Philox noise keyed by the same seed and each
query's raster index): the same distribution and the same sequential == ZipAR(w = row) identity, other bits than
the torch generator stream.
The official ZipAR code counts cfg_interval in tokens drawn since its first row; we count by raster index so
sequential and ZipAR agree.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

import torch

from var_rt import checkpoint, ops
from var_rt.models import llamagen as gpt_model
from var_rt.models import vq16
from var_rt.runtime import zipar
from var_rt.pipeline import check_class_labels, resolve_dtype
from var_rt.runtime.graphs import GraphCache
from var_rt.runtime.kv_pool import KVPool

def filter_logits(logits, top_k: int, top_p: float):
    """The official top_k_top_p_filtering on (..., V) logits: keep the top_k largest (0 = off, clamped to
    [1, V]); then, sorted descending, drop tokens once the cumulative probability exceeds top_p, always
    keeping the first. Returns a new tensor."""
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(max(top_k, 1), V), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop = torch.cat([torch.zeros_like(drop[..., :1]), drop[..., :-1]], dim=-1)   # shift right: keep first over
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw_tokens(logits, seeds, steps, top_k: int, top_p: float, temperature: float):
    """logits (B, S, V) fp32 (CFG mixed); seeds (B,) int64 on the CPU; steps: S raster indices (noise streams).
    Official order: / temperature, filter, softmax; then argmax(probs / Exp(1) noise). Returns (B, S) int64."""
    B, S, V = logits.shape
    probs = filter_logits(logits / max(temperature, 1e-5), top_k, top_p).softmax(-1)
    noise = torch.stack([ops.exponential_noise(seeds, int(t), (V,), logits.device) for t in steps], dim=1)
    return (probs / noise).argmax(-1)


class PassPlan(NamedTuple):
    """One forward pass, as device tensors built once per (window, device)."""
    prefill: bool
    slots: torch.Tensor       # (Q,) int64
    inputs: torch.Tensor      # (Q,) int64 raster index of each query's input token
    vis: zipar.Visibility
    sample_q: torch.Tensor    # (S,) int64 queries whose logits are drawn from
    targets: torch.Tensor     # (S,) int64 raster index each of them draws
    steps: tuple              # the same targets on the host (noise streams, cfg_interval)


def build_plan(passes, prefix: int, tpr: int, device) -> list:
    plan = []
    for p in passes:
        qs = p.queries
        prefill = all(q.token < 0 for q in qs)
        if not prefill and any(q.token < 0 for q in qs):
            raise ValueError("a pass mixes the class prefix with image tokens")
        slots = torch.tensor([q.slot for q in qs], dtype=torch.int64)
        sq = [i for i, q in enumerate(qs) if q.target >= 0]
        steps = tuple(qs[i].target for i in sq)
        vis = zipar.Visibility(slots.to(device=device, dtype=torch.int32),
                               torch.tensor(p.counts, dtype=torch.int32, device=device),
                               prefix=prefix, tpr=tpr, n_keys=int(slots.max()) + 1)
        plan.append(PassPlan(prefill, slots.to(device), torch.tensor([max(q.token, 0) for q in qs], device=device),
                             vis, torch.tensor(sq, device=device), torch.tensor(steps, device=device), steps))
    return plan


class LlamaGenPipeline:
    def __init__(self, gpt: gpt_model.LlamaGenGPT, vq: vq16.VQ16, device="cpu", backend=None):
        self.gpt, self.vq = gpt.fuse_weights_(), vq   # w1 | w3 as one GEMM on the fast path
        self.device = torch.device(device)
        self.backend = backend
        if gpt.cfg.vocab_size != vq.cfg.codebook_size:
            raise ValueError(f"GPT vocab {gpt.cfg.vocab_size} != VQ codebook size {vq.cfg.codebook_size}")
        self._plans, self._pools = {}, {}
        self._guides: dict = {}  # (window, cfg, cfg_interval) -> the fast sampler's per-pass guidance tensors
        self.use_graphs = self.device.type == "cuda"  # whole-generation CUDA graphs (fast sampler only)
        self._graphs = None
        self.last_tokens, self.last_forward_passes = None, None

    @property
    def cfg(self) -> gpt_model.LlamaGenConfig:
        return self.gpt.cfg

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def tokens_per_row(self) -> int:
        return self.cfg.grid

    @property
    def image_size(self) -> int:
        return self.cfg.grid * self.vq.cfg.downsample

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, gpt, vq, device="cpu", dtype=torch.float32, image_size=None, backend=None,
                         n_head=None):
        """Official c2i_*.pt (weights under `model`, or raw for the FSDP ones; .safetensors too) and
        vq_ds16_c2i.pt. image_size: 256 / 384 (token grid = image_size // 16); default from the saved freqs_cis,
        else the file name (c2i_XL_384.pt). n_head: only for non-official widths (official ones are known)."""
        dt = resolve_dtype(dtype)
        sd = checkpoint.read_state_dict(gpt)
        if image_size is None and "freqs_cis" not in sd:
            m = re.search(r"_(256|384|512)(?:\D|$)", os.path.basename(os.fspath(gpt)))
            image_size = int(m.group(1)) if m else None
        grid = image_size // 16 if image_size else None
        model = checkpoint.load_checkpoint(
            gpt, lambda d: gpt_model.config_from_state_dict(d, grid=grid, n_head=n_head), gpt_model.LlamaGenGPT,
            what="LlamaGen GPT", sd=sd, dtype=dt, device=device, ignored=gpt_model.IGNORED_KEYS)
        del sd
        tok = checkpoint.load_checkpoint(vq, vq16.config_from_state_dict, vq16.VQ16, what="LlamaGen VQ",
                                         dtype=torch.float32, device=device, ignored=vq16.IGNORED_KEYS,
                                         keep_fp32=vq16.KEEP_FP32)
        return cls(model, tok, device=device, backend=backend)

    @classmethod
    def random(cls, config="B", image_size=None, vq_config=None, device="cpu", dtype=torch.float32, seed=0,
               std=0.02, backend=None):
        """Random weights: config is a name ('B', 'L', 'XL', 'XXL', '3B') with image_size (default 256) and the
        full VQ-16, or a LlamaGenConfig (any small size) with a thin VQ unless vq_config is given."""
        dt = resolve_dtype(dtype)
        if isinstance(config, str):
            cfg = gpt_model.config_for(config, image_size or 256)
            vcfg = vq_config or vq16.VQ16Config(codebook_size=cfg.vocab_size)
        else:
            cfg = config if image_size is None else gpt_model.with_grid(config, image_size // 16)
            vcfg = vq_config or vq16.VQ16Config(codebook_size=cfg.vocab_size, z_channels=32, ch=32, ch_mult=(1, 1),
                                                num_res_blocks=1)
        model = gpt_model.build_meta(cfg).to_empty(device=device)
        model = gpt_model.init_random_(model, seed, std).to(dt).eval().requires_grad_(False)
        with torch.device("meta"):
            tok = vq16.VQ16(vcfg)
        tok = vq16.init_random_(tok.to_empty(device=device), seed + 1).eval().requires_grad_(False)
        return cls(model, tok, device=device, backend=backend)

    # ---- sampling -------------------------------------------------------------------------------------------
    def check_labels(self, class_labels) -> torch.Tensor:
        return check_class_labels(class_labels, self.num_classes)

    def plan(self, zipar_window=None) -> list:
        """The passes of sequential decoding (None) or ZipAR with window w, cached."""
        h = self.cfg.grid
        if zipar_window is not None:
            zipar.check_window(zipar_window, h)
        if zipar_window not in self._plans:
            P = self.cfg.cls_token_num
            passes = (zipar.sequential_schedule(h, h, P) if zipar_window is None
                      else zipar.zipar_schedule(h, h, zipar_window, P))
            self._plans[zipar_window] = build_plan(passes, P, h, self.device)
        return self._plans[zipar_window]

    def guidance(self, zipar_window, cfg: float, cfg_interval: int) -> list:
        """Per pass of plan(zipar_window): the fast sampler's per-query guidance t, (S,) fp32 on the device:
        cfg - 1 where CFG applies, 0 once cfg_interval turns it off ((1 + 0) cond - 0 uncond = cond). A tensor
        even when all are on, so a token's mix does not depend on its pass (sequential == ZipAR(w = row) stays
        exact). Cached here: captured CUDA graphs read them at every replay, so they outlive the call."""
        key = (zipar_window, float(cfg), int(cfg_interval))
        if key not in self._guides:
            self._guides[key] = [
                torch.tensor([0.0 if cfg_interval > -1 and t - 1 > cfg_interval else cfg - 1.0 for t in p.steps],
                             dtype=torch.float32, device=self.device) for p in self.plan(zipar_window)]
        return self._guides[key]

    def kv_layers(self, batch: int) -> list:
        """Per-layer views (2, N, Hkv, L, D) of one preallocated arena per batch. Captured graphs point into
        their arena, so with graphs every batch keeps its own; without, only the latest is kept."""
        if batch not in self._pools:
            if not self.use_graphs:
                self._pools.clear()
            dt = self.gpt.tok_embeddings.weight.dtype
            self._pools[batch] = KVPool({"llamagen": [self.gpt.kv_shape(batch)] * self.cfg.n_layer}, dt, self.device)
        return self._pools[batch].views["llamagen"]

    @staticmethod
    def _check_sampling(cfg, top_k, top_p, temperature):
        if isinstance(top_k, (list, tuple)) and len(top_k) == 1:
            top_k = top_k[0]
        if isinstance(top_p, (list, tuple)) and len(top_p) == 1:
            top_p = top_p[0]
        if isinstance(temperature, (list, tuple)) and len(temperature) == 1:
            temperature = temperature[0]
        if not cfg >= 0:
            raise ValueError(f"cfg {cfg}: must be >= 0 (CFG is applied when cfg > 1, as the official code)")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k {top_k!r}: expected an int >= 0 (0 = off)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p {top_p}: expected a value in (0, 1] (1 = off)")
        if not temperature >= 0:
            raise ValueError(f"temperature {temperature}: must be >= 0")
        return top_k, float(top_p), float(temperature)

    @torch.no_grad()
    def __call__(self, class_labels, cfg=4.0, cfg_interval=-1, top_k=2000, top_p=1.0, temperature=1.0, seed=0,
                 zipar_window=None, progress=False, seeds=None) -> torch.Tensor:
        """One image per class label -> (B, 3, H, W) float32 in [0, 1]. Same seed -> same images; image i uses
        seed ops.mix_seed(seed, i). zipar_window: None = sequential, else ZipAR with that window."""
        ids = self.generate_tokens(class_labels, cfg, cfg_interval, top_k, top_p, temperature, seed, zipar_window,
                                   progress, seeds)
        return (self.vq.decode_tokens(ids) + 1) / 2

    @torch.no_grad()
    def generate_tokens(self, class_labels, cfg=4.0, cfg_interval=-1, top_k=2000, top_p=1.0, temperature=1.0,
                        seed=0, zipar_window=None, progress=False, seeds=None) -> torch.Tensor:
        """Token ids (B, h*w) int64 in raster order; also `last_tokens`, `last_forward_passes`.
        seeds: explicit per-image seeds (B,), overriding `seed`."""
        top_k, top_p, temperature = self._check_sampling(cfg, top_k, top_p, temperature)
        labels = self.check_labels(class_labels).to(self.device)
        plan = self.plan(zipar_window)
        B, c = labels.numel(), self.cfg
        use_cfg = cfg > 1.0
        N = 2 * B if use_cfg else B
        if seeds is None:
            seeds = torch.tensor([ops.mix_seed(int(seed), i) for i in range(B)], dtype=torch.int64)
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten().cpu()
        if seeds.numel() != B:
            raise ValueError(f"{seeds.numel()} seeds for {B} images")
        kv = self.kv_layers(N)
        backend = self.backend or ops.default_backend(self.device)
        # Fast path without top-p: ops.sample_tokens (Triton on CUDA: Philox noise keyed by (seed, raster index),
        # no host sync), ONE launch per pass for all its queries: the CFG mix and cfg_interval happen in-kernel as
        # a per-query guidance t = cfg - 1 (0 once CFG is off: (1 + t) cond - t uncond = cond), each query's noise
        # stream is its raster index (p.targets). Its CoDe filter order equals the official one when top-p is off
        # (top-k commutes with the temperature). With top-p < 1, or on the reference backend, the official-order
        # torch sampler after the torch CFG mix.
        fast_draw = backend != "torch" and top_p >= 1.0
        # per pass: which drawn tokens still get CFG (cfg_interval): masks for the torch path; per-query guidance
        # tensors for the fast one (built before any capture, kept by the pipeline for the graphs' replays)
        cfg_on = []
        for p in plan:
            on = [not (cfg_interval > -1 and t - 1 > cfg_interval) for t in p.steps]
            cfg_on.append(None if all(on) else torch.tensor(on, device=self.device).view(1, -1, 1))
        guides = self.guidance(zipar_window, cfg, cfg_interval) if use_cfg and fast_draw else [None] * len(plan)

        def decode(labels, seeds_in, bar=None):  # (B,) labels and seeds on the device -> (B, h*w) tokens
            cls_ids = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels
            tokens = torch.zeros(B, c.grid * c.grid, dtype=torch.int64, device=self.device)
            for p, on, guide in zip(plan, cfg_on, guides):
                if p.prefill:
                    h = self.gpt.embed_classes(cls_ids)                                  # (N, 1, C)
                else:
                    x = tokens[:, p.inputs]                                              # (B, Q)
                    h = self.gpt.embed_tokens(torch.cat([x, x]) if use_cfg else x)       # (N, Q, C)
                logits = self.gpt.step(h, p.slots, kv, p.vis, backend)[:, p.sample_q]  # (N, S, V)
                if fast_draw:  # (N, S, V) logits in, (B, S) tokens out: one launch, CFG mixed in-kernel
                    drawn = ops.sample_tokens(logits, seeds_in, p.targets, top_k, 0.0, max(temperature, 1e-5),
                                              guidance=guide, backend=backend)
                else:
                    if use_cfg:
                        cond, uncond = logits[:B], logits[B:]
                        mixed = uncond + (cond - uncond) * cfg
                        logits = mixed if on is None else torch.where(on, mixed, cond)
                    drawn = draw_tokens(logits, seeds, p.steps, top_k, top_p, temperature)
                tokens[:, p.targets] = drawn
                if bar is not None:
                    bar.update(1)
            return tokens

        seeds_dev = seeds.to(self.device)
        if self.use_graphs and self.device.type == "cuda" and fast_draw:
            # the whole plan is static for (batch, window, settings): capture it once, replay it after
            if self._graphs is None:
                self._graphs = GraphCache(self.device)
            key = (B, zipar_window, cfg, cfg_interval, top_k, temperature, backend)
            tokens = self._graphs.run(key, lambda lab, sd: (decode(lab, sd),), labels, seeds_dev, backend=backend)[0]
        else:
            bar = None
            if progress:
                from tqdm import tqdm
                mode = "sequential" if zipar_window is None else f"ZipAR w={zipar_window}"
                bar = tqdm(total=len(plan), desc=f"LlamaGen {B} img, {mode}", unit="pass", leave=False)
            try:
                tokens = decode(labels, seeds_dev, bar)
            finally:
                if bar is not None:
                    bar.close()
        self.last_tokens = tokens
        self.last_forward_passes = len(plan)
        return tokens
