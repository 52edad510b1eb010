"""What a server runs: its pipelines, what a request means for them, one batch run and one stream.

A request is a JSON object `{"class_label": 207, "n": 1, "seed": 0, ...}`, where `...` are the sampling settings
of the offline pipeline under the same names (those of VARPipeline.__call__ / LlamaGenPipeline.__call__, read off
their signatures, plus `draft_steps` where the server can switch it). It is checked here, before it is queued,
by the same code the command line and the pipelines run (SamplingSettings, var_settings, the ZipAR / SJD checks,
check_int), so a bad request is answered with the same one-line message. Image i of a request is drawn with seed
`mix_seed(seed, i)`, as `pipe([class_label] * n, seed=seed)` draws it, so a request gives the bytes of that call
whatever it is batched with (images do not depend on the batch: README "Batch independence").

Requests with the same `key` (the pipeline and the validated settings) can share a model run.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from var_rt.pipeline_base import as_int, check_int, image_seeds

# the fields every request may have beside the sampling settings
COMMON = ("class_label", "n", "seed", "stream")
NOT_SETTINGS = {"self", "class_labels", "seed", "seeds", "progress"}
# the four values a preset overrides: a request that gives one of them drops a default preset (as the CLI does)
PRESET_VALUES = ("cfg", "top_k", "top_p", "temperature")
FLOAT_OPTIONS = ("cfg", "top_p", "temperature")  # float-typed options of the command line


@dataclass
class Request:
    """One validated request: `n` images of `label`, per-image `seeds`, the call's keyword settings `kwargs` (on
    pipeline `pipe_key`), and `key`: requests with equal keys can run in one batch."""
    label: int
    n: int
    seed: int
    seeds: list
    kwargs: dict
    pipe_key: object
    key: tuple
    stream: bool = False


def _as_cli(name: str, v):
    """A JSON value as the command line parses it: the float options (--cfg, --top-p, --temperature) as floats, so
    that a bad value reads the same in both (top_p=0.0)."""
    def one(x):
        return float(x) if isinstance(x, int) and not isinstance(x, bool) else x
    if name not in FLOAT_OPTIONS:
        return v
    return [one(x) for x in v] if isinstance(v, list) else one(v)


def _settings_names(fn) -> list:
    return [n for n in inspect.signature(fn).parameters if n not in NOT_SETTINGS]


class Engine:
    """The pipelines of one server and the request rules. family: "var" (VAR or CoDe) or "llamagen".

    VAR with a drafter and a refiner (CoDe, and the demo): requests choose `draft_steps` in 1..K (K: the drafter
    alone); one pipeline per value, built on first use, all sharing the same modules (the KV pools are theirs);
    `refiner` gives the refiner module when `pipe` runs the drafter alone. defaults: the settings a request that
    gives none gets (the command line's sampling options, or the demo's)."""

    def __init__(self, pipe, defaults: dict | None = None, default_seed: int = 0, max_n: int = 64,
                 class_names=None, name: str = "model", refiner=None):
        from var_rt.pipeline import VARPipeline
        self.family = "var" if isinstance(pipe, VARPipeline) else "llamagen"
        self.base = pipe
        self.name = name
        self.defaults = dict(defaults or {})
        self.default_seed = default_seed
        self.max_n = max_n
        self.class_names = list(class_names) if class_names is not None else None
        self._refiner = refiner or (pipe.models.get("refiner") if self.family == "var" else None)
        self.switch_draft_steps = self.family == "var" and "drafter" in pipe.models and self._refiner is not None
        self._pipes = {self._base_key(): pipe}
        self.options = _settings_names(type(pipe).__call__) + (["draft_steps"] if self.switch_draft_steps else [])

    # ---- the model ----------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def num_scales(self) -> int | None:
        return len(self.base.cfg.patch_nums) if self.family == "var" else None

    @property
    def image_size(self) -> int:
        return self.base.image_size

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def pads(self) -> bool:
        """Whether batches are padded to a bucket size: where the pipeline replays CUDA graphs (one per batch
        size). On the CPU there is nothing to replay and padding would only add work."""
        return bool(self.base.use_graphs)

    def _base_key(self):
        return self.base.draft_steps if self.switch_draft_steps else None

    def pipe(self, pipe_key):
        """The pipeline of a request's pipe_key (its draft_steps when they switch), built on first use."""
        if pipe_key not in self._pipes:
            from var_rt.pipeline import VARPipeline
            b = self.base
            p = VARPipeline(b.vae, drafter=b.models["drafter"], refiner=self._refiner, draft_steps=pipe_key,
                            device=b.device, backend=b.backend)
            p.use_graphs = b.use_graphs
            self._pipes[pipe_key] = p
        return self._pipes[pipe_key]

    def info(self) -> dict:
        """What the page and clients need: the model, its classes, the settings and their defaults."""
        d = {"family": self.family, "model": self.name, "num_classes": self.num_classes,
             "image_size": self.image_size, "options": self.options, "defaults": self.defaults,
             "default_seed": self.default_seed, "max_n": self.max_n, "class_names": self.class_names}
        if self.family == "var":
            d["num_scales"] = self.num_scales
            d["draft_steps"] = getattr(self.base, "draft_steps", None)
            d["draft_steps_range"] = [1, self.num_scales] if self.switch_draft_steps else None
        else:
            d["tokens_per_row"] = self.base.tokens_per_row
        return d

    # ---- requests -----------------------------------------------------------------------------------------------
    def parse(self, body) -> Request:
        """A request body (decoded JSON) -> Request, or ValueError with one line naming what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object, e.g. {\"class_label\": 0}")
        unknown = [k for k in body if k not in COMMON and k not in self.options]
        if unknown == ["draft_steps"] and self.family == "var":
            raise ValueError("draft_steps is for CoDe models (a drafter and a refiner); this server's model runs "
                             + (f"draft_steps={self.base.draft_steps} only (no refiner loaded)"
                                if self.base.draft_steps else "plain VAR"))
        if unknown:
            known = ", ".join(COMMON + tuple(self.options))
            raise ValueError(f"unknown field {unknown[0]!r}; expected some of: {known}")
        if "class_label" not in body:
            raise ValueError("class_label: required (one class id; n images of it)")
        label = body["class_label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"class_label {label!r}: expected an integer class id")
        if not 0 <= label < self.num_classes:  # the command line's message (cli.args.check_classes)
            raise ValueError(f"class_label: class ids [{label}] outside [0, {self.num_classes}) (this model has "
                             f"{self.num_classes} classes)")
        n = check_int(body.get("n", 1), "n", 1, self.max_n)
        seed = as_int(body.get("seed", self.default_seed), "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ValueError(f"stream={stream!r}: expected true or false")
        given = {k: _as_cli(k, body[k]) for k in self.options if k in body}
        kw = dict(self.defaults)
        if "preset" in kw and "preset" not in given and any(k in given for k in PRESET_VALUES):
            kw.pop("preset")
        kw.update(given)
        kw = {k: v for k, v in kw.items() if k in self.options}
        pipe_key, key = self._key(kw)
        kw.pop("draft_steps", None)
        try:
            seeds = image_seeds(seed, range(n)).tolist()
        except (OverflowError, RuntimeError):
            raise ValueError(f"seed={seed}: expected a 64-bit integer") from None
        return Request(label, n, seed, seeds, kw, pipe_key, key, stream)

    def _key(self, kw: dict):
        """(pipe_key, group key) of validated settings, through the pipelines' own checks."""
        if self.family == "var":
            pipe_key = None
            if self.switch_draft_steps:
                pipe_key = check_int(kw.get("draft_steps", self.base.draft_steps), "draft_steps", 1, self.num_scales)
            pipe = self.pipe(pipe_key)
            names = _settings_names(pipe.sampling_settings)
            settings = pipe.sampling_settings(**{k: v for k, v in kw.items() if k in names})
            return pipe_key, ("var", pipe_key, settings)
        p = self.base
        settings = p.sampling_settings(**{k: kw[k] for k in _settings_names(p.sampling_settings) if k in kw})
        zw, mask = kw.get("zipar_window"), kw.get("zipar_mask", "exact")
        L, relaxed = kw.get("sjd_window", 0), kw.get("sjd_relaxed", 0)
        from var_rt.runtime import sjd, zipar
        if sjd.check_window(L) or relaxed:  # the pipeline's own SJD rules, before the request is queued
            sjd.check_settings(L, relaxed, zw, mask, p.tokens_per_row)
            zipar.check_mask(mask)
        else:
            p.plan(zw, mask)  # checks the window and the mask
        return None, ("llamagen", settings, zw, mask, L, relaxed)

    def warm_up(self, buckets, log=print) -> int:
        """Capture the CUDA graphs of the default settings for every batch bucket before the first request,
        largest first (they share one memory pool), so no request waits for a capture (a request with other
        settings still captures its own on first use). Only where batches are padded (graphs replay: `pads`);
        returns the number of buckets run."""
        if not self.pads:
            return 0
        req = self.parse({"class_label": 0})
        for b in sorted(set(buckets), reverse=True):
            log(f"var-rt: capturing CUDA graphs for batches of {b}")
            self.run(req, [0] * b, list(range(b)))
        return len(set(buckets))

    # ---- running (in the worker thread) ---------------------------------------------------------------------------
    def run(self, req: Request, labels: list, seeds: list) -> torch.Tensor:
        """One model run for requests sharing req.key: (B, 3, H, W) float32 in [0, 1]."""
        return self.pipe(req.pipe_key)(labels, seeds=seeds, **req.kwargs)

    def stream(self, req: Request):
        """A generator of (step, images (n, 3, H, W), final) previews, the last one the final images (those of
        `run`): after every scale (VAR: VARPipeline.stream) or every few token rows (LlamaGen: about 8 previews)."""
        p = self.pipe(req.pipe_key)
        labels = [req.label] * req.n
        if self.family == "var":
            last = self.num_scales - 1
            for scale, images in p.stream(labels, seeds=req.seeds, every=1, **req.kwargs):
                yield scale, images, scale == last
            return
        rows = p.tokens_per_row
        for done, images in p.stream(labels, seeds=req.seeds, every_rows=max(1, rows // 8), **req.kwargs):
            yield done, images, done == rows


def is_oom(e: BaseException) -> bool:
    """An out-of-memory failure (CUDA's, the pipelines' MemoryError for a KV pool, or the host's)."""
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
