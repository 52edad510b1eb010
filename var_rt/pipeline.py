"""User API for VAR and CoDe: `VARPipeline.from_checkpoints(...)`, then `pipe(class_labels, ...)`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from var_rt import loaders, ops
from var_rt.loaders import load_var, load_vqvae
from var_rt.models import var as var_model
from var_rt.models import vqvae as vqvae_model
from var_rt.pipeline_base import (PipelineBase, SamplingSettings, check_class_labels, check_device, check_int,
                                  check_seeds, decode_in_chunks, image_seeds, resolve_dtype)
from var_rt.runtime.kv_pool import KVPool
from var_rt.runtime.schedule import var_schedule
from var_rt.runtime.graphs import GraphCache
from var_rt.runtime.var import PRESETS, new_state, run_var

__all__ = ["VARPipeline", "Preview", "PRESETS", "SamplingSettings", "resolve_dtype", "image_seeds",
           "check_class_labels"]


def check_model_args(var=None, drafter=None, refiner=None, draft_steps=None) -> None:
    """One model source: var= (plain VAR) or drafter= (+ refiner= and draft_steps=, CoDe); ValueError otherwise."""
    if var is not None and (drafter is not None or refiner is not None):
        both = ", ".join(n for n, v in (("drafter=", drafter), ("refiner=", refiner)) if v is not None)
        raise ValueError(f"give either var= (plain VAR) or drafter= and refiner= (CoDe), not var= with {both}")
    if var is None and drafter is None:
        raise ValueError("no model: give var= or drafter= (+ refiner= and draft_steps=)" +
                         (" (refiner= needs a drafter=)" if refiner is not None else ""))
    if drafter is not None and draft_steps is None:
        raise ValueError("CoDe (drafter=) needs draft_steps=N: the scales the drafter runs (N = all scales: the "
                         "drafter alone)")


def var_settings(num_scales: int, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, preset=None,
                 cfg_skip_last=0) -> SamplingSettings:
    """The validated settings of a call to a VAR model of `num_scales` scales (SamplingSettings' rules); a preset
    ('code-eval', 'var-demo') overrides the four values and must fit the scale count. cfg_skip_last: the last M
    scales drawn without guidance, on the conditional rows alone (0 = off; not part of a preset)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
        p = PRESETS[preset]
        for k in ("top_k", "top_p", "temperature"):
            if isinstance(p[k], (list, tuple)) and len(p[k]) != num_scales:
                raise ValueError(f"preset {preset!r} has {len(p[k])} per-scale {k} values (one per scale of a "
                                 f"{len(p[k])}-scale model); this model has {num_scales} scales: give the sampling "
                                 "settings instead")
        cfg, top_k, top_p, temperature = (p[k] for k in ("cfg", "top_k", "top_p", "temperature"))
    return SamplingSettings.build(cfg, top_k, top_p, temperature, steps=num_scales, cfg_skip_last=cfg_skip_last)


class Preview(NamedTuple):
    """One yield of VARPipeline.stream: `images` (B, 3, H, W) float32 in [0, 1] decoded from f_hat after scale
    `scale` (0-based; K - 1: the final images)."""
    scale: int
    images: torch.Tensor


def stream_segments(num_scales: int, every: int) -> list[range]:
    """The scales run between two previews: [0, every), [every, 2 every), ..., the last ending at scale K - 1."""
    return [range(s, min(s + every, num_scales)) for s in range(0, num_scales, every)]


def carried_state(prev, models: dict, vae, batch: int, device) -> dict:
    """The run_var state a stream segment starts from, without writing `prev` ((f_hat, rows, tokens) of the
    segment before, or None for the first): f_hat a fresh copy (or zeros), the rows/tokens lists copied, their
    tensors shared and only read. Not writing its inputs keeps a segment a function of them, which a chain of
    CUDA graphs needs (runtime/graphs.py: the warm-up run of a capture must not advance the state)."""
    if prev is None:
        return new_state(models, vae, batch, device)
    f_hat, rows, tokens = prev
    return {"f_hat": f_hat.clone(), "rows": list(rows), "tokens": list(tokens)}


class VARPipeline(PipelineBase):
    """VAR sampling; with a drafter and a refiner, CoDe. Images come back as (B, 3, H, W) floats in [0, 1]."""

    def __init__(self, vae, var=None, drafter=None, refiner=None, draft_steps=None, device="cpu", backend=None):
        check_model_args(var, drafter, refiner, draft_steps)
        self.check_configs({k: m.cfg for k, m in (("main", var), ("drafter", drafter), ("refiner", refiner))
                            if m is not None}, vae.cfg, draft_steps)
        self.vae = vae
        self._init_base(device, backend)
        if var is not None:
            self.models = {"main": var}
            self.draft_steps = None
        else:
            self.models = {"drafter": drafter}
            if draft_steps < len(drafter.cfg.patch_nums):
                self.models["refiner"] = refiner
            self.draft_steps = draft_steps
        self.schedule = var_schedule(len(self.cfg.patch_nums), self.draft_steps)
        self._kv_takes: dict = {}   # batch -> generations that took its KV pool (a paused stream checks it)
        self._carries: dict = {}    # stream graph key -> the chain's carried (f_hat, rows, tokens) buffers
        # cudnn.benchmark stays as the user set it (off by default): with it on, cuDNN times candidate conv algorithms
        # in each process and may pick different ones in two processes (a resumed or torchrun-sharded run), and the
        # decoded bytes would then depend on the process (see pipeline_base.DECODE_CHUNK).

    @property
    def cfg(self) -> var_model.VARConfig:
        return next(iter(self.models.values())).cfg

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def image_size(self) -> int:
        return self.cfg.patch_nums[-1] * self.vae.cfg.downsample

    @staticmethod
    def check_configs(cfgs: dict, vae_cfg, draft_steps=None) -> None:
        """The models fit together, checked on their configs (so before anything is loaded): cfgs is
        {"main": VARConfig} or {"drafter": ..., "refiner": ...} (the refiner may be absent at draft_steps = K);
        draft_steps in 1..K for CoDe (a refiner needed below K), None for plain VAR."""
        ref_name, ref = next(iter(cfgs.items()))
        K = len(ref.patch_nums)
        if "drafter" in cfgs:
            check_int(draft_steps, "draft_steps", 1, K)
            if draft_steps < K and "refiner" not in cfgs:
                raise ValueError(f"draft_steps={draft_steps} < {K} scales needs a refiner (refiner=), or "
                                 f"draft_steps={K} for the drafter alone")
        elif draft_steps is not None:
            raise ValueError(f"draft_steps={draft_steps!r} is for CoDe (drafter= and refiner=), not var=")
        for name, c in cfgs.items():
            for field in ("vocab", "cvae", "patch_nums", "num_classes"):
                a, b = getattr(ref, field), getattr(c, field)
                if a != b:
                    raise ValueError(f"{ref_name} and {name} disagree on {field}: {a} vs {b}")
        if (ref.vocab, ref.cvae) != (vae_cfg.vocab, vae_cfg.cvae):
            raise ValueError(f"the VAR model ({ref.vocab} tokens x {ref.cvae} channels) does not match the VQVAE "
                             f"({vae_cfg.vocab} x {vae_cfg.cvae})")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, var=None, vae=None, drafter=None, refiner=None, draft_steps=None, device="cpu",
                         dtype=None, backend=None) -> "VARPipeline":
        """dtype None: bf16 on CUDA, fp32 on the CPU (as the command line). Every argument and every file (its
        family, config, keys and shapes: loaders.inspect) is checked before any file is loaded."""
        check_model_args(var, drafter, refiner, draft_steps)
        if vae is None:
            raise ValueError("vae= (vae_ch160v4096z32.pth) is required")
        kw = dict(device=check_device(device), dtype=resolve_dtype(dtype, device))
        ops.resolve_backend(backend, device)
        files = {"main": var} if var is not None else {"drafter": drafter, "refiner": refiner}
        files = {k: v for k, v in files.items() if v is not None}
        vae_cfg = loaders.inspect(vae, "vqvae", "vae")
        cfgs = {k: loaders.inspect(f, "var", "var" if k == "main" else k) for k, f in files.items()}
        cls.check_configs(cfgs, vae_cfg, draft_steps)
        if draft_steps is not None and draft_steps == len(cfgs["drafter"].patch_nums):
            files.pop("refiner", None)  # the drafter alone: the refiner is not loaded
        models = {k: load_var(f, what="VAR checkpoint" if k == "main" else k, **kw) for k, f in files.items()}
        vq = load_vqvae(vae, **kw)
        if var is not None:
            return cls(vq, var=models["main"], device=device, backend=backend)
        return cls(vq, drafter=models["drafter"], refiner=models.get("refiner"), draft_steps=draft_steps,
                   device=device, backend=backend)

    @classmethod
    def from_pretrained(cls, name, device="cpu", dtype=None, revision=None, cache_dir=None, local_files_only=None,
                        backend=None, draft_steps=None) -> "VARPipeline":
        """An official model by name ('var-d30', 'code-8', 'code-free-8': var_rt.hub.MODELS, `var-rt models`), its
        files fetched through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE; revision pins the model's repo),
        then loaded by from_checkpoints. draft_steps: CoDe names only (default: the name's N). The name's sampling
        preset is `pipe.hub_model.preset` (code-eval for CoDe: pipe(labels, preset="code-eval"))."""
        from var_rt import hub
        return hub.from_pretrained(cls, "var", name, device=device, dtype=dtype, revision=revision,
                                   cache_dir=cache_dir, local_files_only=local_files_only, backend=backend,
                                   draft_steps=draft_steps)

    @classmethod
    def random(cls, depth=16, refiner_depth=None, draft_steps=None, vae_cfg=None, device="cpu", dtype=None,
               seed=0, backend=None, **var_kw) -> "VARPipeline":
        """Random weights (no files): `depth` is an official depth or a VARConfig; for tests and benchmarks.
        dtype None: bf16 on CUDA, fp32 on the CPU."""
        check_device(device)
        dt = resolve_dtype(dtype, device)
        ops.resolve_backend(backend, device)

        def config(d, name):
            if isinstance(d, var_model.VARConfig):
                return d
            return var_model.VARConfig.official(check_int(d, name, 1, 64), **var_kw)
        vae_cfg = vae_cfg or vqvae_model.VQVAEConfig()
        if refiner_depth is None and draft_steps is None:
            cfgs = {"main": config(depth, "depth")}
        else:
            cfgs = {"drafter": config(depth, "depth")}
            if refiner_depth is not None:
                cfgs["refiner"] = config(refiner_depth, "refiner_depth")
        cls.check_configs(cfgs, vae_cfg, draft_steps)  # before anything is built

        def build(cfg, s):
            m = var_model.init_random_(var_model.VAR(cfg), s).to(device=device, dtype=dt)
            return m.eval().requires_grad_(False)
        vae = vqvae_model.init_random_(vqvae_model.VQVAE(vae_cfg), seed)
        vae = vae.to(device).eval().requires_grad_(False)
        vae.decoder.to(dt)
        if "main" in cfgs:
            return cls(vae, var=build(cfgs["main"], seed), device=device, backend=backend)
        d = build(cfgs["drafter"], seed)
        r = build(cfgs["refiner"], seed + 1) if "refiner" in cfgs else None
        return cls(vae, drafter=d, refiner=r, draft_steps=draft_steps, device=device, backend=backend)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def prepare_graphs(self, batch_sizes, **sampling) -> None:
        """Capture CUDA graphs ahead of time, largest batch first (they share one memory pool)."""
        for b in sorted(set(batch_sizes), reverse=True):
            self.generate_latents([0] * b, **sampling)

    def kv_pool(self, batch: int) -> KVPool:
        """The arena of a batch (2B rows per model); CoDe's refiner reuses the drafter's bytes. Every generation
        takes it here: counted per batch, so that a paused `stream` sees another generation overwrite its cache."""
        self._kv_takes[batch] = self._kv_takes.get(batch, 0) + 1
        return self._kv_pool(batch, lambda: {name: [m.kv_shape(2 * batch, self.kv_tokens(name))] * m.cfg.depth
                                             for name, m in self.models.items()},
                             next(iter(self.models.values())).head.weight.dtype, share=True)

    def kv_tokens(self, model: str) -> int:
        """KV slots a model's cache needs: the tokens up to the last scale it runs (CoDe's drafter at N=8 needs
        255 of 680, which keeps the shared arena the refiner's size rather than the drafter's whole pyramid)."""
        bounds = self.cfg.scale_bounds()
        return max(bounds[max(p.scales)][1] for p in self.schedule if p.model == model)

    def sampling_settings(self, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, preset=None,
                          cfg_skip_last=0) -> SamplingSettings:
        """The validated settings of a call: scalars or one value per scale; a preset ('code-eval', 'var-demo')
        overrides the four values. cfg_skip_last=M: the last M scales without guidance (README, "Guidance
        skipping"; 0 = off)."""
        return var_settings(len(self.cfg.patch_nums), cfg, top_k, top_p, temperature, preset, cfg_skip_last)

    @torch.no_grad()
    def __call__(self, class_labels, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, seed=0, seeds=None,
                 preset=None, progress=False, cfg_skip_last=0) -> torch.Tensor:
        """Sample one image per class label. Same seed (or per-image `seeds`) -> same images.
        cfg, top_k, top_p, temperature: scalars or lists of one value per scale (rules: SamplingSettings).
        preset: 'code-eval' or 'var-demo' (overrides the sampling settings). cfg_skip_last=M: the last M scales run
        the conditional rows alone and draw without guidance (0 = off). Returns (B, 3, H, W) float32 in [0, 1]."""
        f_hat, images = self._sample(class_labels, cfg, top_k, top_p, temperature, seed, seeds, preset, progress,
                                     decode=True, cfg_skip_last=cfg_skip_last)
        return images if images is not None else self.decode(f_hat, progress=progress)

    @torch.no_grad()
    def decode(self, f_hat, progress=False) -> torch.Tensor:
        """f_hat (B, Cvae, h, w) -> images (B, 3, H, W) float32 in [0, 1], on this pipeline's backend, in chunks of
        `decode_chunk` images (an image's bytes do not depend on the batch: pipeline_base.DECODE_CHUNK)."""
        return self._decode(self.vae.fhat_to_img, f_hat, progress)

    @torch.no_grad()
    def generate_latents(self, class_labels, cfg=4.0, top_k=900, top_p=0.95, temperature=1.0, seed=0, seeds=None,
                         preset=None, progress=False, cfg_skip_last=0) -> torch.Tensor:
        """Tokens only: the final f_hat (B, Cvae, h, w) fp32; token ids of every scale in `last_tokens`."""
        return self._sample(class_labels, cfg, top_k, top_p, temperature, seed, seeds, preset, progress,
                            cfg_skip_last=cfg_skip_last)[0]

    @torch.no_grad()
    def edit(self, images, masks, class_labels, seed=0, seeds=None, progress=False, paste=False,
             **sampling) -> torch.Tensor:
        """Zero-shot editing (VAR paper; inpainting, outpainting, class-conditional editing), plain VAR and CoDe.
        images (B, 3, H, W) float in [0, 1] (or uint8), H = W = image_size; masks (B, H, W) or (B, 1, H, W), bool
        or in [0, 1]: 1 = regenerate, 0 = keep. At every scale a token is regenerated when more than half of its
        area-pooling window of pixels is masked; all others are teacher-forced to the VQVAE encoder's tokens of the
        image (var_rt.editing). class_labels: the class to draw the masked region as (num_classes = the null
        class: unconditional inpainting, as the official demo). seed / seeds as __call__; **sampling: the settings
        of `sampling_settings` (cfg, top_k, top_p, temperature, preset, ...). paste: put the input's pixels back
        outside the mask (default False: the model's decode everywhere). The encoder + quant_conv are loaded from
        the VQVAE file on first use (a random one for `random` pipelines). Runs eagerly (no CUDA graph).
        Returns (B, 3, H, W) float32 in [0, 1]; token ids of every scale in `last_tokens`."""
        from var_rt import editing
        return editing.edit(self, images, masks, class_labels, seed=seed, seeds=seeds, progress=progress,
                            paste=paste, **sampling)

    def stream(self, class_labels, seed=0, seeds=None, every=1, progress=False, **sampling):
        """Streaming previews: a generator of Preview(scale, images) after every `every` scales and after the last:
        images (B, 3, H, W) float32 in [0, 1] decoded from f_hat, the residual-VQ sum of the scales drawn so far (the
        official VQVAE decodes intermediate scales the same way: embed_to_img with last_one=False). sampling: the
        keyword settings of __call__ (cfg, top_k, top_p, temperature, preset, ...: `sampling_settings`). The last
        Preview holds exactly the images of pipe(class_labels, same settings, same seed). progress: a tqdm bar of
        scales (the previews' decodes in its time). Everything is checked here, before the first `next`. Cost over
        __call__: one eager decode per preview and a copy of f_hat per segment; with CUDA graphs one graph per
        segment. Consume (or close) it before the next generation of the
        same batch size on this pipeline: one started meanwhile overwrites the KV cache, and this stream then
        raises RuntimeError instead of continuing."""
        params = self.sampling_settings(**sampling)
        labels = self.check_labels(class_labels)
        seeds = check_seeds(labels.numel(), seed, seeds)
        every = check_int(every, "every", 1, len(self.cfg.patch_nums))
        return self._stream(labels, seeds, params, every, progress)

    @torch.no_grad()
    def _stream(self, labels, seeds, params: SamplingSettings, every: int, progress: bool):
        K, B = len(self.cfg.patch_nums), labels.numel()
        pool = self.kv_pool(B)
        takes = self._kv_takes[B]
        labels, seeds = labels.to(self.device), seeds.to(self.device)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=K, desc=f"VAR {B} img", unit="scale", leave=False)
        state = None  # (f_hat, rows, tokens) after the last segment: with graphs, that graph's own outputs
        try:
            for seg in stream_segments(K, every):
                if self._kv_takes[B] != takes:
                    raise RuntimeError(f"this stream was paused at scale {seg.start - 1} while another generation of "
                                       f"{B} images ran on the same pipeline (it overwrote the KV cache): consume "
                                       "or close a stream before starting the next generation")

                def run(lab, sd, seg_bar, seg=seg, prev=state):
                    st = carried_state(prev, self.models, self.vae, B, lab.device)
                    run_var(self.models, self.vae, self.schedule, lab, sd, params, pool, progress=seg_bar, scales=seg,
                            state=st)
                    return st["f_hat"], st["rows"], st["tokens"]
                # the key names the chain (every), not just the segment: a graph reads its predecessor's outputs
                state = self._run_segment(("stream", B, params, self.backend, every, seg.start), run, labels, seeds,
                                          bar, len(seg))
                images = self.decode(state[0])  # eager, between graphs: a fresh tensor, safe from the next replay
                if seg.stop == K:
                    self.last_tokens = [t.clone() for t in state[2]]  # graph-owned: the next replay rewrites them
                    self.last_forward_passes = K
                    self.last_stats = {"kv_pool_bytes": pool.nbytes,
                                       **{f"kv_bytes_{name}": pool.model_bytes(name) for name in self.models}}
                yield Preview(seg.stop - 1, images)
        finally:
            if bar is not None:
                bar.close()

    def _run_segment(self, key, fn, labels, seeds, bar, n: int):
        """One segment of a stream, in this pipeline's backend: fn(labels, seeds, bar) -> (f_hat, rows, tokens).
        With graphs, one CUDA graph per key, returning its live outputs (GraphCache.run clone=False): the next
        segment's graph is captured reading them in place. Separate graphs rather than one over the whole chain
        because the host decodes and yields between segments. Eagerly otherwise, `bar` advanced per scale."""
        with ops.use_backend(self._backend):
            if not self.use_graphs:
                return fn(labels, seeds, bar)
            if self._graphs is None:
                self._graphs = GraphCache(self.device)
            out = self._graphs.run(key, lambda lab, sd: fn(lab, sd, None), labels, seeds, backend=self._backend,
                                   clone=False)
            if self._graphs.last_mode == "graph":
                out = self._carry(key, out)
        if bar is not None:
            bar.update(n)
        return out

    def _carry(self, key, out):
        """The live outputs (f_hat, rows, tokens) of a segment's graph copied into buffers of this chain's own,
        allocated outside the graphs' shared memory pool, and returned: the next segment's graph is captured
        reading these. Why not the graph's outputs themselves: the graphs share one pool, and a graph captured
        earlier (another batch size, or pipe()) may use the same bytes as scratch, so replaying it between two
        segments would overwrite them. The same buffers at every run of the chain (copy_ into them)."""
        carries = self._carries
        if key not in carries:
            carries[key] = tuple(o.clone() if torch.is_tensor(o) else [t if t is None else t.clone() for t in o]
                                 for o in out)
            return carries[key]
        for dst, src in zip(carries[key], out):
            for d, x in (zip(dst, src) if isinstance(dst, list) else ((dst, src),)):
                if d is not None:
                    d.copy_(x)
        return carries[key]

    def _sample(self, class_labels, cfg, top_k, top_p, temperature, seed, seeds, preset, progress, decode=False,
                cfg_skip_last=0):
        """(f_hat, images or None). With CUDA graphs at batch 1 the decoder runs inside the generation's graph
        (its ~100 launches cost more than its work there), as one chunk of `decode_chunk` (padded like `decode`,
        so the bytes are those of an eager decode); otherwise images are left to `decode`."""
        params = self.sampling_settings(cfg, top_k, top_p, temperature, preset, cfg_skip_last)
        labels = self.check_labels(class_labels)
        B = labels.numel()
        seeds = check_seeds(B, seed, seeds)
        pool = self.kv_pool(B)
        labels, seeds = labels.to(self.device), seeds.to(self.device)
        in_graph = decode and B == 1 and self.use_graphs

        def run(lab, sd, bar):
            f_hat, tokens = run_var(self.models, self.vae, self.schedule, lab, sd, params, pool, progress=bar)
            if not in_graph:
                return f_hat, tokens
            return f_hat, tokens, decode_in_chunks(self.vae.fhat_to_img, f_hat, self.decode_chunk)
        K = len(self.cfg.patch_nums)
        key = (B, params, self.backend, self.decode_chunk if in_graph else 0)
        out = self._generate(key, run, labels, seeds, capture=True, progress=progress, total=K, desc=f"VAR {B} img",
                             unit="scale")
        f_hat, tokens = out[0], out[1]
        self.last_tokens = tokens
        self.last_forward_passes = K  # one transformer pass per scale (CoDe's refiner prefill samples scale N)
        self.last_stats = {
            "kv_pool_bytes": pool.nbytes,
            **{f"kv_bytes_{name}": pool.model_bytes(name) for name in self.models},
        }
        return f_hat, (out[2] if in_graph else None)
