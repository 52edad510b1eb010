"""User API for VAR and CoDe: `VARPipeline.from_checkpoints(...)`, then `pipe(class_labels, ...)`."""
from __future__ import annotations

import torch

from var_rt import ops
from var_rt.loaders import load_var, load_vqvae
from var_rt.models import var as var_model
from var_rt.models import vqvae as vqvae_model
from var_rt.runtime.engine import PRESETS, SamplingParams, run_var
from var_rt.runtime.graphs import GraphCache
from var_rt.runtime.kv_pool import KVPool
from var_rt.runtime.schedule import var_schedule

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def image_seeds(seed: int, indices) -> torch.Tensor:
    """Per-image seeds: a function of (global seed, image index) only."""
    return torch.tensor([ops.mix_seed(int(seed), int(i)) for i in indices], dtype=torch.int64)


def check_class_labels(class_labels, num_classes: int) -> torch.Tensor:
    """(B,) int64 class ids, or a ValueError naming what is wrong (empty, not integers, out of range)."""
    labels = torch.as_tensor(list(class_labels) if not torch.is_tensor(class_labels) else class_labels).flatten()
    if labels.numel() == 0:
        raise ValueError("class_labels is empty: give at least one class id")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class ids must be integers, got {labels.dtype}")
    bad = [int(x) for x in labels if not 0 <= int(x) < num_classes]
    if bad:
        raise ValueError(f"class ids {bad} outside [0, {num_classes})")
    return labels.long()


class VARPipeline:
    """VAR sampling; with a drafter and a refiner, CoDe. Images come back as (B, 3, H, W) floats in [0, 1]."""

    def __init__(self, vae, var=None, drafter=None, refiner=None, draft_steps=None, device="cpu", backend=None):
        if var is not None and (drafter is not None or refiner is not None):
            raise ValueError("give either var= (plain VAR) or drafter= and refiner= (CoDe), not both")
        if var is None and drafter is None:
            raise ValueError("no model: give var= or drafter= (+ refiner= and draft_steps=)")
        self.vae, self.device, self.backend = vae, torch.device(device), backend
        if var is not None:
            self.models = {"main": var}
            self.draft_steps = None
        else:
            K = len(drafter.cfg.patch_nums)
            if draft_steps is None:
                raise ValueError(f"CoDe needs draft_steps (1..{K - 1}; {K} = drafter alone)")
            self.models = {"drafter": drafter}
            if draft_steps < K:
                if refiner is None:
                    raise ValueError(f"draft_steps={draft_steps} < {K} scales needs a refiner")
                self.models["refiner"] = refiner
            self.draft_steps = draft_steps
        self._check_compatible()
        self.schedule = var_schedule(len(self.cfg.patch_nums), self.draft_steps)
        self.last_tokens, self.last_stats = None, {}
        self._pools: dict = {}
        self.use_graphs = self.device.type == "cuda"
        if self.device.type == "cuda":  # the VQVAE decoder's convs: let cuDNN pick its fastest algorithms
            torch.backends.cudnn.benchmark = True
        self._graphs = None

    @property
    def cfg(self) -> var_model.VARConfig:
        return next(iter(self.models.values())).cfg

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def image_size(self) -> int:
        return self.cfg.patch_nums[-1] * self.vae.cfg.downsample

    def _check_compatible(self):
        ref_name, ref = next(iter(self.models.items()))
        for name, m in self.models.items():
            for field in ("vocab", "cvae", "patch_nums", "num_classes"):
                a, b = getattr(ref.cfg, field), getattr(m.cfg, field)
                if a != b:
                    raise ValueError(f"{ref_name} and {name} disagree on {field}: {a} vs {b}")
        if (ref.cfg.vocab, ref.cfg.cvae) != (self.vae.cfg.vocab, self.vae.cfg.cvae):
            raise ValueError(f"VAR ({ref.cfg.vocab} tokens x {ref.cfg.cvae} channels) does not match the VQVAE "
                             f"({self.vae.cfg.vocab} x {self.vae.cfg.cvae})")
        K = len(ref.cfg.patch_nums)
        if self.draft_steps is not None and not 1 <= self.draft_steps <= K:
            raise ValueError(f"draft_steps must be in 1..{K}, got {self.draft_steps}")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, var=None, vae=None, drafter=None, refiner=None, draft_steps=None, device="cpu",
                         dtype="bf16", backend=None) -> "VARPipeline":
        if vae is None:
            raise ValueError("vae= (vae_ch160v4096z32.pth) is required")
        dt = resolve_dtype(dtype)
        kw = dict(device=device, dtype=dt)
        vq = load_vqvae(vae, **kw)
        if var is not None:
            return cls(vq, var=load_var(var, **kw), device=device, backend=backend)
        if drafter is None:
            raise ValueError("give var= (plain VAR) or drafter= and refiner= (CoDe)")
        d = load_var(drafter, what="drafter", **kw)
        r = load_var(refiner, what="refiner", **kw) if refiner is not None else None
        return cls(vq, drafter=d, refiner=r, draft_steps=draft_steps, device=device, backend=backend)

    @classmethod
    def random(cls, depth=16, refiner_depth=None, draft_steps=None, vae_cfg=None, device="cpu", dtype="fp32",
               seed=0, **var_kw) -> "VARPipeline":
        """Random weights (no files): `depth` is an official depth or a VARConfig; for tests and benchmarks."""
        dt = resolve_dtype(dtype)

        def build(d, s):
            cfg = d if isinstance(d, var_model.VARConfig) else var_model.VARConfig.official(d, **var_kw)
            return var_model.init_random_(var_model.VAR(cfg), s).to(device=device, dtype=dt).eval().requires_grad_(False)
        vae = vqvae_model.init_random_(vqvae_model.VQVAE(vae_cfg or vqvae_model.VQVAEConfig()), seed)
        vae = vae.to(device).eval().requires_grad_(False)
        vae.decoder.to(dt)
        if refiner_depth is None and draft_steps is None:
            return cls(vae, var=build(depth, seed), device=device)
        d = build(depth, seed)
        r = build(refiner_depth, seed + 1) if refiner_depth is not None else None
        return cls(vae, drafter=d, refiner=r, draft_steps=draft_steps, device=device)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def check_labels(self, class_labels) -> torch.Tensor:
        return check_class_labels(class_labels, self.num_classes)

    def prepare_graphs(self, batch_sizes, **sampling) -> None:
        """Capture CUDA graphs ahead of time, largest batch first (they share one memory pool)."""
        for b in sorted(set(batch_sizes), reverse=True):
            self.generate_latents([0] * b, **sampling)

    def kv_pool(self, batch: int) -> KVPool:
        """One arena per batch size; CoDe's refiner reuses the drafter's bytes. Captured graphs point into their
        arenas, so with graphs every batch size keeps its own; without, only the latest is kept."""
        pools = self._pools
        if batch not in pools:
            if not self.use_graphs:
                pools.clear()
            shapes = {name: [m.kv_shape(2 * batch)] * m.cfg.depth for name, m in self.models.items()}
            dtype = next(iter(self.models.values())).head.weight.dtype
            try:
                pools[batch] = KVPool(shapes, dtype, self.device, share=True)
            except torch.cuda.OutOfMemoryError:
                need = max(KVPool.bytes_needed(shapes, dtype).values()) / 2**30
                raise MemoryError(f"batch {batch} is too large: its KV cache alone needs {need:.1f} GiB; "
                                  "use a smaller batch") from None
        return pools[batch]

    @torch.no_grad()
    def __call__(self, class_labels, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, seed=0, seeds=None,
                 preset=None, progress=False) -> torch.Tensor:
        """Sample one image per class label. Same seed (or per-image `seeds`) -> same images.
        cfg, top_k, top_p, temperature: scalars or lists of one value per scale. preset: 'code-eval' or
        'var-demo' (overrides the sampling settings). Returns (B, 3, H, W) float32 in [0, 1]."""
        f_hat = self.generate_latents(class_labels, cfg, top_k, top_p, temperature, seed, seeds, preset, progress)
        with ops.use_backend(self.backend):
            return self.vae.fhat_to_img(f_hat)

    @torch.no_grad()
    def generate_latents(self, class_labels, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, seed=0, seeds=None,
                         preset=None, progress=False) -> torch.Tensor:
        """Tokens only: the final f_hat (B, Cvae, h, w) fp32; token ids of every scale in `last_tokens`."""
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
            cfg, top_k, top_p, temperature = (PRESETS[preset][k] for k in ("cfg", "top_k", "top_p", "temperature"))
        K = len(self.cfg.patch_nums)
        params = SamplingParams.build(K, cfg, top_k, top_p, temperature)
        labels = self.check_labels(class_labels)
        B = labels.numel()
        seeds = image_seeds(seed, range(B)) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64).flatten()
        if seeds.numel() != B:
            raise ValueError(f"{seeds.numel()} seeds for {B} images")
        pool = self.kv_pool(B)
        labels, seeds = labels.to(self.device), seeds.to(self.device)
        with ops.use_backend(self.backend):
            if self.use_graphs:  # one captured generation per (batch, settings); eager where capture is impossible
                if self._graphs is None:
                    self._graphs = GraphCache(self.device)
                key = (B, repr(params), ops.default_backend(self.device))
                run = lambda lab, sd: run_var(self.models, self.vae, self.schedule, lab, sd, params, pool)  # noqa: E731
                f_hat, tokens = self._graphs.run(key, run, labels, seeds, backend=key[2])  # eager if torch
            else:
                bar = None
                if progress:
                    from tqdm import tqdm
                    bar = tqdm(total=K, desc=f"VAR {B} img", unit="scale", leave=False)
                try:
                    f_hat, tokens = run_var(self.models, self.vae, self.schedule, labels, seeds, params, pool, progress=bar)
                finally:
                    if bar is not None:
                        bar.close()
        self.last_tokens = tokens
        self.last_stats = {
            "kv_pool_bytes": pool.nbytes,
            **{f"kv_bytes_{name}": pool.model_bytes(name) for name in self.models},
        }
        return f_hat
