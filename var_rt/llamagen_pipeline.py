"""User API for LlamaGen c2i (+ ZipAR): `LlamaGenPipeline.from_checkpoints(gpt=..., vq=...)`, then
`pipe(class_labels, ...)`. The decoding itself (plan, prefill, passes, draw; sampling semantics in its docstring)
is the LlamaGen engine, var_rt.runtime.llamagen."""
from __future__ import annotations

from typing import NamedTuple

import torch

from var_rt import loaders, ops
from var_rt.loaders import load_llamagen, load_vq16
from var_rt.models import llamagen as gpt_model
from var_rt.models import vq16
from var_rt.pipeline_base import PipelineBase, SamplingSettings, check_device, check_int, check_seeds, resolve_dtype
from var_rt.runtime import llamagen as engine
from var_rt.runtime import sjd, zipar
from var_rt.runtime.kv_pool import KVPool
from var_rt.runtime.llamagen import PassPlan, build_plan, draw_tokens, filter_logits  # noqa: F401  (re-exported)

__all__ = ["LlamaGenPipeline", "SamplingSettings", "PassPlan", "build_plan", "draw_tokens", "filter_logits"]


def check_image_size(image_size) -> None:
    """None (read off the file) or a positive multiple of 16 (the token grid is image_size // 16)."""
    if image_size is not None and check_int(image_size, "image_size", 16) % 16:
        raise ValueError(f"image_size={image_size}: expected a multiple of 16 (256 or 384 for the official models)")


class RowsPreview(NamedTuple):
    """One yield of LlamaGenPipeline.stream: `images` (B, 3, H, W) float32 in [0, 1] once `rows` token rows are
    complete (rows = the grid height: the final images)."""
    rows: int
    images: torch.Tensor


class LlamaGenPipeline(PipelineBase):
    """LlamaGen c2i sampling, sequential or ZipAR. Images come back as (B, 3, H, W) floats in [0, 1]."""

    def __init__(self, gpt: gpt_model.LlamaGenGPT, vq: vq16.VQ16, device="cpu", backend=None):
        self.check_configs(gpt.cfg, vq.cfg)
        self.gpt, self.vq = gpt.fuse_weights_(), vq   # w1 | w3 as one GEMM on the fast path
        self._init_base(device, backend)
        self._plans: dict = {}   # (window, zipar_mask) -> [PassPlan]
        self._guides: dict = {}  # (window, cfg, cfg_interval) -> the fast draw's per-pass guidance tensors

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

    @staticmethod
    def check_configs(gpt_cfg, vq_cfg) -> None:
        """The GPT and the VQ fit together (checked on their configs, before anything is loaded)."""
        if gpt_cfg.vocab_size != vq_cfg.codebook_size:
            raise ValueError(f"the GPT's vocabulary ({gpt_cfg.vocab_size} tokens) does not match the VQ's codebook "
                             f"({vq_cfg.codebook_size} entries)")

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, gpt, vq, device="cpu", dtype=None, image_size=None, backend=None, n_head=None):
        """Official c2i_*.pt (weights under `model`, or raw for the FSDP ones; .safetensors too) and
        vq_ds16_c2i.pt. image_size: 256 / 384 (token grid = image_size // 16); default from the saved freqs_cis,
        else the file name (c2i_XL_384.pt). n_head: only for non-official widths (official ones are known).
        dtype (the GPT's; the VQ stays fp32) None: bf16 on CUDA, fp32 on the CPU. Every argument and both files
        (family, config, keys and shapes: loaders.inspect) are checked before either is loaded."""
        check_device(device)
        dt = resolve_dtype(dtype, device)
        ops.resolve_backend(backend, device)
        check_image_size(image_size)
        if n_head is not None:
            check_int(n_head, "n_head", 1)
        cls.check_configs(loaders.inspect(gpt, "llamagen", "gpt", image_size=image_size, n_head=n_head),
                          loaders.inspect(vq, "vq16", "vq"))
        model = load_llamagen(gpt, device=device, dtype=dt, image_size=image_size, n_head=n_head)
        tok = load_vq16(vq, device=device)
        return cls(model, tok, device=device, backend=backend)

    @classmethod
    def from_pretrained(cls, name, device="cpu", dtype=None, revision=None, cache_dir=None, local_files_only=None,
                        backend=None, image_size=None) -> "LlamaGenPipeline":
        """An official model by name ('llamagen-xl-384': var_rt.hub.MODELS, `var-rt models`), its files fetched
        through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE; revision pins the repo), then loaded by
        from_checkpoints (image_size None: read off the file)."""
        from var_rt import hub
        return hub.from_pretrained(cls, "llamagen", name, device=device, dtype=dtype, revision=revision,
                                   cache_dir=cache_dir, local_files_only=local_files_only, backend=backend,
                                   image_size=image_size)

    @classmethod
    def random(cls, config="B", image_size=None, vq_config=None, device="cpu", dtype=None, seed=0, std=0.02,
               backend=None):
        """Random weights: config is a name ('B', 'L', 'XL', 'XXL', '3B') with image_size (default 256) and the
        full VQ-16, or a LlamaGenConfig (any small size) with a thin VQ unless vq_config is given.
        dtype None: bf16 on CUDA, fp32 on the CPU."""
        check_device(device)
        dt = resolve_dtype(dtype, device)
        ops.resolve_backend(backend, device)
        check_image_size(image_size)
        if isinstance(config, str):
            cfg = gpt_model.config_for(config, image_size or 256)
            vcfg = vq_config or vq16.VQ16Config(codebook_size=cfg.vocab_size)
        else:
            cfg = config if image_size is None else gpt_model.with_grid(config, image_size // 16)
            vcfg = vq_config or vq16.VQ16Config(codebook_size=cfg.vocab_size, z_channels=32, ch=32, ch_mult=(1, 1),
                                                num_res_blocks=1)
        cls.check_configs(cfg, vcfg)
        model = gpt_model.build_meta(cfg).to_empty(device=device)
        model = gpt_model.init_random_(model, seed, std).to(dt).eval().requires_grad_(False)
        with torch.device("meta"):
            tok = vq16.VQ16(vcfg)
        tok = vq16.init_random_(tok.to_empty(device=device), seed + 1).eval().requires_grad_(False)
        return cls(model, tok, device=device, backend=backend)

    # ---- plan, guidance, KV cache (cached: captured CUDA graphs read them at every replay) --------------------
    def plan(self, zipar_window=None, zipar_mask="exact") -> list:
        """The passes of sequential decoding (None) or ZipAR with window w, cached."""
        if zipar_window is not None:
            zipar.check_window(zipar_window, self.cfg.grid)
        zipar.check_mask(zipar_mask)
        key = (zipar_window, zipar_mask)
        if key not in self._plans:
            self._plans[key] = engine.plan_for(self.cfg, zipar_window, self.device, zipar_mask)
        return self._plans[key]

    def guidance(self, zipar_window, cfg: float, cfg_interval: int) -> list:
        """Per pass of plan(zipar_window): the fast draw's per-query guidance t, (S,) fp32 on the device
        (runtime.llamagen.guidance_tensors), cached: captured CUDA graphs read them at every replay."""
        key = (zipar_window, float(cfg), int(cfg_interval))
        if key not in self._guides:
            self._guides[key] = engine.guidance_tensors(self.plan(zipar_window), float(cfg), int(cfg_interval),
                                                        self.device)
        return self._guides[key]

    def kv_pool(self, rows: int) -> KVPool:
        """The arena of N = `rows` KV rows (2B with CFG, else B)."""
        return self._kv_pool(rows, lambda: {"llamagen": [self.gpt.kv_shape(rows)] * self.cfg.n_layer},
                             self.gpt.tok_embeddings.weight.dtype)

    def kv_layers(self, rows: int) -> list:
        """Per-layer views (2, N, Hkv, L, D) of kv_pool(rows)."""
        return self.kv_pool(rows).views["llamagen"]

    # ---- sampling -------------------------------------------------------------------------------------------
    @staticmethod
    def sampling_settings(cfg=4.0, top_k=2000, top_p=1.0, temperature=1.0, cfg_interval=-1) -> SamplingSettings:
        """The validated settings of a call: one value each (per-scale lists are VAR-only)."""
        return SamplingSettings.build(cfg, top_k, top_p, temperature, cfg_interval)

    def prepare_graphs(self, batch_sizes, zipar_window=None, **sampling) -> None:
        """Capture CUDA graphs ahead of time, largest batch first (they share one memory pool)."""
        for b in sorted(set(batch_sizes), reverse=True):
            self.generate_tokens([0] * b, zipar_window=zipar_window, **sampling)

    @torch.no_grad()
    def __call__(self, class_labels, cfg=4.0, cfg_interval=-1, top_k=2000, top_p=1.0, temperature=1.0, seed=0,
                 zipar_window=None, progress=False, seeds=None, zipar_mask="exact", sjd_window=0,
                 sjd_relaxed=0) -> torch.Tensor:
        """One image per class label -> (B, 3, H, W) float32 in [0, 1]. Same seed -> same images; image i uses
        seed ops.mix_seed(seed, i). zipar_window: None = sequential, else ZipAR with that window. zipar_mask:
        "exact" (a query sees its decoded predecessors) or "official" (every slot before it, as the official ZipAR
        code; runtime.zipar). sjd_window L > 0: Speculative Jacobi Decoding with L drafts per pass (runtime.sjd;
        with zipar_window, SJD + ZipAR: a window per active row, "exact" mask only); sjd_relaxed k > 0: its
        GSD-style relaxed acceptance over k codebook neighbours (approximate, off by default)."""
        return self.decode(self.generate_tokens(class_labels, cfg, cfg_interval, top_k, top_p, temperature, seed,
                                                zipar_window, progress, seeds, zipar_mask, sjd_window,
                                                sjd_relaxed), progress=progress)

    @torch.no_grad()
    def decode(self, ids, progress=False) -> torch.Tensor:
        """Token ids (B, h*w) -> images (B, 3, H, W) float32 in [0, 1], on this pipeline's backend, in chunks of
        `decode_chunk` images (an image's bytes do not depend on the batch: pipeline_base.DECODE_CHUNK)."""
        return self._decode(lambda t: (self.vq.decode_tokens(t) + 1) / 2, ids, progress)

    @torch.no_grad()
    def generate_tokens(self, class_labels, cfg=4.0, cfg_interval=-1, top_k=2000, top_p=1.0, temperature=1.0,
                        seed=0, zipar_window=None, progress=False, seeds=None, zipar_mask="exact", sjd_window=0,
                        sjd_relaxed=0) -> torch.Tensor:
        """Token ids (B, h*w) int64 in raster order; also `last_tokens`, `last_forward_passes`.
        seeds: explicit per-image seeds (B,), overriding `seed`."""
        settings = self.sampling_settings(cfg, top_k, top_p, temperature, cfg_interval)
        labels = self.check_labels(class_labels).to(self.device)
        if sjd.check_window(sjd_window) or sjd_relaxed:
            return self._generate_sjd(labels, settings, seed, seeds, zipar_window, sjd_window, sjd_relaxed, progress,
                                      zipar_mask)
        plan = self.plan(zipar_window, zipar_mask)
        B = labels.numel()
        seeds = check_seeds(B, seed, seeds).to(self.device)
        N = 2 * B if settings.cfg > 1.0 else B
        pool = self.kv_pool(N)
        s = engine.sampler(plan, settings, self.backend, self.device,   # the guidance cached: graphs replay it
                           guides=lambda: self.guidance(zipar_window, settings.cfg, settings.cfg_interval))

        def run(lab, sd, bar):
            return (engine.decode_passes(self.gpt, plan, lab, sd, pool.views["llamagen"], s, progress=bar),)
        mode = "sequential" if zipar_window is None else f"ZipAR w={zipar_window}, {zipar_mask} mask"
        # the whole plan is static for (batch, window, settings): with the fast draw (no host sync) one CUDA graph
        (tokens,) = self._generate((B, zipar_window, zipar_mask, settings, self.backend), run, labels, seeds, capture=s.fast,
                                   progress=progress, total=len(plan), desc=f"LlamaGen {B} img, {mode}", unit="pass")
        self.last_tokens = tokens
        self.last_forward_passes = len(plan)
        self.last_stats = {"kv_pool_bytes": pool.nbytes}
        return tokens

    STREAM_OPTIONS = ("cfg", "cfg_interval", "top_k", "top_p", "temperature", "zipar_window", "zipar_mask",
                      "sjd_window", "sjd_relaxed")

    def stream(self, class_labels, seed=0, seeds=None, every_rows=1, progress=False, **sampling):
        """Streaming previews: a generator of RowsPreview(rows, images) each time `every_rows` more token rows are
        complete, and after the last pass: images (B, 3, H, W) float32 in [0, 1] decoded from the tokens drawn so
        far, every token not drawn yet set to 0 (codebook entry 0: a preview, not a sample). sampling: the keyword
        settings of __call__ (STREAM_OPTIONS). The last RowsPreview holds exactly the images of
        pipe(class_labels, same settings, same seed). Everything is checked here, before the first `next`. The
        passes run eagerly (no CUDA graph), the same decode_pass / prefill calls as runtime.llamagen.decode_passes;
        cost over __call__: one decode per preview. SJD (sjd_window > 0: a variable number of passes per image)
        gives no previews: the images are drawn in this call and the generator yields them once.
        Consume (or close) it before the next generation of the same batch size on this pipeline: they share the
        KV cache."""
        unknown = sorted(set(sampling) - set(self.STREAM_OPTIONS))
        if unknown:
            raise TypeError(f"stream() got an unexpected keyword argument {unknown[0]!r}")
        labels = self.check_labels(class_labels)
        seeds = check_seeds(labels.numel(), seed, seeds)
        every_rows = check_int(every_rows, "every_rows", 1, self.cfg.grid)
        if sampling.get("sjd_window") or sampling.get("sjd_relaxed"):
            return iter([RowsPreview(self.cfg.grid, self(labels, seeds=seeds, progress=progress, **sampling))])
        settings = self.sampling_settings(**{k: sampling[k] for k in ("cfg", "cfg_interval", "top_k", "top_p",
                                                                      "temperature") if k in sampling})
        zipar_window = sampling.get("zipar_window")
        plan = self.plan(zipar_window, sampling.get("zipar_mask", "exact"))
        return self._stream_rows(labels, seeds, settings, zipar_window, plan, every_rows, progress)

    @torch.no_grad()
    def _stream_rows(self, labels, seeds, settings, zipar_window, plan, every_rows, progress):
        """stream's generator: the engine's passes one at a time (runtime.llamagen.iter_passes, which
        decode_passes runs through), a preview whenever every_rows more rows are complete."""
        c, B = self.cfg, labels.numel()
        labels, seeds = labels.to(self.device), seeds.to(self.device)
        pool = self.kv_pool(2 * B if settings.cfg > 1.0 else B)
        s = engine.sampler(plan, settings, self.backend, self.device,
                           guides=lambda: self.guidance(zipar_window, settings.cfg, settings.cfg_interval))
        passes = engine.iter_passes(self.gpt, plan, labels, seeds, pool.views["llamagen"], s)
        per_row = [0] * c.grid  # tokens drawn in each row
        shown = 0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(plan), desc=f"LlamaGen {B} img, stream", unit="pass", leave=False)
        try:
            for p in plan:
                with ops.use_backend(self._backend):   # the pass runs inside next()
                    _, tokens = next(passes)
                for t in p.steps:
                    per_row[t // c.grid] += 1
                if bar is not None:
                    bar.update(1)
                complete = sum(n == c.grid for n in per_row)
                if shown + every_rows <= complete < c.grid:
                    shown = complete
                    yield RowsPreview(complete, self.decode(tokens))
        finally:
            if bar is not None:
                bar.close()
        self.last_tokens = tokens
        self.last_forward_passes = len(plan)
        self.last_stats = {"kv_pool_bytes": pool.nbytes}
        yield RowsPreview(c.grid, self.decode(tokens))

    def _generate_sjd(self, labels, settings, seed, seeds, zipar_window, L, relaxed, progress, zipar_mask="exact"):
        """Speculative Jacobi Decoding (runtime.sjd). Plain SJD: the whole batch at once (runtime.sjd.generate_batch:
        static shapes, one KV pool of N rows, one CUDA graph of a pass replayed on CUDA with the fast backend; an
        image's tokens do not depend on the batch). Relaxed acceptance, and SJD + ZipAR (generate_one_zipar;
        "exact" mask only): eagerly, one image at a time (its own KV rows). last_forward_passes: the most passes
        any image took; last_stats: per image "sjd_passes" and "sjd_acceptance" (accepted / tested drafts)."""
        sjd.check_settings(L, relaxed, zipar_window, zipar_mask, self.cfg.grid)
        B = labels.numel()
        if zipar_window is None and not relaxed:
            seeds = check_seeds(B, seed, seeds).to(self.device)
            pool = self.kv_pool(2 * B if settings.cfg > 1.0 else B)
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=self.cfg.grid ** 2, desc=f"LlamaGen {B} img, SJD L={L}", unit="tok", leave=False)
            with ops.use_backend(self._backend):
                tokens, passes, acc, n = sjd.generate_batch(self.gpt, labels, seeds, pool.views["llamagen"], settings,
                                                            L, self.backend, progress=bar,
                                                            graph=self.use_graphs and self.backend != "torch")
            if bar is not None:
                bar.close()
            self.last_tokens = tokens
            self.last_forward_passes = int(passes.max())
            self.last_stats = {"kv_pool_bytes": pool.nbytes, "sjd_passes": passes.tolist(),
                               "sjd_acceptance": (acc.double() / n.clamp(min=1)).tolist()}
            return tokens
        seeds = check_seeds(B, seed, seeds).tolist()
        pool = self.kv_pool(2 if settings.cfg > 1.0 else 1)
        nb = None
        if relaxed:
            emb = torch.nn.functional.normalize(self.vq.quantize.embedding.weight.detach().float(), dim=-1)  # as looked up
            nb = sjd.codebook_neighbours(emb.to(self.device), relaxed)
        out, passes, acc = [], [], []
        bar = None
        if progress:
            from tqdm import tqdm
            mode = f"SJD L={L}" + ("" if zipar_window is None else f" + ZipAR w={zipar_window}")
            bar = tqdm(total=B, desc=f"LlamaGen {B} img, {mode}", unit="img", leave=False)
        with ops.use_backend(self._backend):
            for b in range(B):
                args = (self.gpt, int(labels[b]), int(seeds[b]), pool.views["llamagen"], settings, L)
                if zipar_window is None:
                    t, i, a, n = sjd.generate_one(*args, self.backend, nb)
                else:
                    t, i, a, n = sjd.generate_one_zipar(*args, zipar_window, self.backend, nb)
                out.append(t)
                passes.append(i)
                acc.append(a / max(n, 1))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        tokens = torch.stack(out)
        self.last_tokens = tokens
        self.last_forward_passes = max(passes)
        self.last_stats = {"kv_pool_bytes": pool.nbytes, "sjd_passes": passes, "sjd_acceptance": acc}
        return tokens
