"""User API for VAR and CoDe: `VARPipeline.from_checkpoints(...)`, then `pipe(class_labels, ...)`."""
from __future__ import annotations

import torch

from var_rt import ops
from var_rt.loaders import load_var, load_vqvae
from var_rt.models import var as var_model
from var_rt.models import vqvae as vqvae_model
from var_rt.pipeline_base import (PipelineBase, SamplingSettings, check_class_labels, check_seeds, image_seeds,
                                  resolve_dtype)
from var_rt.runtime.kv_pool import KVPool
from var_rt.runtime.schedule import var_schedule
from var_rt.runtime.var import PRESETS, run_var

__all__ = ["VARPipeline", "PRESETS", "SamplingSettings", "resolve_dtype", "image_seeds", "check_class_labels"]


class VARPipeline(PipelineBase):
    """VAR sampling; with a drafter and a refiner, CoDe. Images come back as (B, 3, H, W) floats in [0, 1]."""

    def __init__(self, vae, var=None, drafter=None, refiner=None, draft_steps=None, device="cpu", backend=None):
        if var is not None and (drafter is not None or refiner is not None):
            raise ValueError("give either var= (plain VAR) or drafter= and refiner= (CoDe), not both")
        if var is None and drafter is None:
            raise ValueError("no model: give var= or drafter= (+ refiner= and draft_steps=)")
        self.vae = vae
        self._init_base(device, backend)
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
        if self.device.type == "cuda":  # the VQVAE decoder's convs: let cuDNN pick its fastest algorithms
            torch.backends.cudnn.benchmark = True

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
                         dtype=None, backend=None) -> "VARPipeline":
        """dtype None: bf16 on CUDA, fp32 on the CPU (as the command line)."""
        if vae is None:
            raise ValueError("vae= (vae_ch160v4096z32.pth) is required")
        kw = dict(device=device, dtype=resolve_dtype(dtype, device))
        vq = load_vqvae(vae, **kw)
        if var is not None:
            return cls(vq, var=load_var(var, **kw), device=device, backend=backend)
        if drafter is None:
            raise ValueError("give var= (plain VAR) or drafter= and refiner= (CoDe)")
        d = load_var(drafter, what="drafter", **kw)
        r = load_var(refiner, what="refiner", **kw) if refiner is not None else None
        return cls(vq, drafter=d, refiner=r, draft_steps=draft_steps, device=device, backend=backend)

    @classmethod
    def random(cls, depth=16, refiner_depth=None, draft_steps=None, vae_cfg=None, device="cpu", dtype=None,
               seed=0, backend=None, **var_kw) -> "VARPipeline":
        """Random weights (no files): `depth` is an official depth or a VARConfig; for tests and benchmarks.
        dtype None: bf16 on CUDA, fp32 on the CPU."""
        dt = resolve_dtype(dtype, device)

        def build(d, s):
            cfg = d if isinstance(d, var_model.VARConfig) else var_model.VARConfig.official(d, **var_kw)
            m = var_model.init_random_(var_model.VAR(cfg), s).to(device=device, dtype=dt)
            return m.eval().requires_grad_(False)
        vae = vqvae_model.init_random_(vqvae_model.VQVAE(vae_cfg or vqvae_model.VQVAEConfig()), seed)
        vae = vae.to(device).eval().requires_grad_(False)
        vae.decoder.to(dt)
        if refiner_depth is None and draft_steps is None:
            return cls(vae, var=build(depth, seed), device=device, backend=backend)
        d = build(depth, seed)
        r = build(refiner_depth, seed + 1) if refiner_depth is not None else None
        return cls(vae, drafter=d, refiner=r, draft_steps=draft_steps, device=device, backend=backend)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def prepare_graphs(self, batch_sizes, **sampling) -> None:
        """Capture CUDA graphs ahead of time, largest batch first (they share one memory pool)."""
        for b in sorted(set(batch_sizes), reverse=True):
            self.generate_latents([0] * b, **sampling)

    def kv_pool(self, batch: int) -> KVPool:
        """The arena of a batch (2B rows per model); CoDe's refiner reuses the drafter's bytes."""
        return self._kv_pool(batch, lambda: {name: [m.kv_shape(2 * batch)] * m.cfg.depth
                                             for name, m in self.models.items()},
                             next(iter(self.models.values())).head.weight.dtype, share=True)

    def sampling_settings(self, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, preset=None) -> SamplingSettings:
        """The validated settings of a call: scalars or one value per scale; a preset ('code-eval', 'var-demo')
        overrides the four values."""
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
            cfg, top_k, top_p, temperature = (PRESETS[preset][k] for k in ("cfg", "top_k", "top_p", "temperature"))
        return SamplingSettings.build(cfg, top_k, top_p, temperature, steps=len(self.cfg.patch_nums))

    @torch.no_grad()
    def __call__(self, class_labels, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, seed=0, seeds=None,
                 preset=None, progress=False) -> torch.Tensor:
        """Sample one image per class label. Same seed (or per-image `seeds`) -> same images.
        cfg, top_k, top_p, temperature: scalars or lists of one value per scale (rules: SamplingSettings).
        preset: 'code-eval' or 'var-demo' (overrides the sampling settings). Returns (B, 3, H, W) float32 in [0, 1]."""
        return self.decode(self.generate_latents(class_labels, cfg, top_k, top_p, temperature, seed, seeds, preset,
                                                 progress))

    @torch.no_grad()
    def decode(self, f_hat) -> torch.Tensor:
        """f_hat (B, Cvae, h, w) -> images (B, 3, H, W) float32 in [0, 1], on this pipeline's backend."""
        with ops.use_backend(self.backend):
            return self.vae.fhat_to_img(f_hat)

    @torch.no_grad()
    def generate_latents(self, class_labels, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, seed=0, seeds=None,
                         preset=None, progress=False) -> torch.Tensor:
        """Tokens only: the final f_hat (B, Cvae, h, w) fp32; token ids of every scale in `last_tokens`."""
        params = self.sampling_settings(cfg, top_k, top_p, temperature, preset)
        labels = self.check_labels(class_labels)
        B = labels.numel()
        seeds = check_seeds(B, seed, seeds)
        pool = self.kv_pool(B)
        labels, seeds = labels.to(self.device), seeds.to(self.device)

        def run(lab, sd, bar):
            return run_var(self.models, self.vae, self.schedule, lab, sd, params, pool, progress=bar)
        K = len(self.cfg.patch_nums)
        f_hat, tokens = self._generate((B, params, self.backend), run, labels, seeds, capture=True,
                                       progress=progress, total=K, desc=f"VAR {B} img", unit="scale")
        self.last_tokens = tokens
        self.last_forward_passes = K  # one transformer pass per scale (CoDe's refiner prefill samples scale N)
        self.last_stats = {
            "kv_pool_bytes": pool.nbytes,
            **{f"kv_bytes_{name}": pool.model_bytes(name) for name in self.models},
        }
        return f_hat
