"""`var-rt generate`: images for some classes, written as one PNG grid (and optionally one PNG each, and with
--previews one grid per streaming preview: VARPipeline.stream, LlamaGenPipeline.stream)."""
from __future__ import annotations

import json
import os
import time

import torch

from var_rt.cli.args import (UsageError, add_model_args, add_quiet, add_sampling_args, build_pipeline, check_classes,
                             check_count, check_model, check_output, check_sampling, make_parent, sampling_kwargs)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample images for some classes and write a PNG grid")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--classes", type=int, nargs="+", required=True, help="class ids, one image each")
    g.add_argument("--out", default="grid.png", help="PNG grid path")
    g.add_argument("--per-image", metavar="DIR", help="also write one PNG per image here")
    g.add_argument("--nrow", type=int, help="images per grid row")
    g.add_argument("--previews", metavar="DIR",
                   help="streaming previews: also write one PNG grid per preview here (VAR: scale_00.png ... after "
                        "each scale, decoded from the running f_hat; LlamaGen: rows_NN.png once NN token rows are "
                        "complete); the last is the final grid")
    g.add_argument("--preview-every", type=int, metavar="K",
                   help="--previews: a preview every K scales (VAR, 1..scales) or K token rows (LlamaGen); default 1")
    g.add_argument("--verbose", action="store_true", help="print KV memory and other stats")
    add_quiet(g)
    g.set_defaults(fn=cmd_generate)


def check_previews(a, plan) -> None:
    """--previews / --preview-every, before anything is loaded: a writable folder, K within the model's scales
    (VAR) or token rows (LlamaGen)."""
    if a.previews is None:
        if a.preview_every is not None:
            raise UsageError("--preview-every needs --previews DIR")
        return
    check_output(a.previews, "--previews", is_dir=True)
    if plan.family == "var":
        check_count(a.preview_every, "--preview-every", 1, plan.num_scales)
        return
    check_count(a.preview_every, "--preview-every", 1, plan.grid)


def cmd_generate(a) -> int:
    from var_rt import images
    plan = check_model(a)  # everything before anything is loaded (the outputs: cli.main)
    check_classes(a.classes, plan)
    check_sampling(a, plan)
    check_count(a.nrow, "--nrow")
    check_previews(a, plan)
    t0 = time.perf_counter()
    pipe = build_pipeline(a, plan=plan)
    t_load = time.perf_counter() - t0
    kw = sampling_kwargs(pipe, a)
    labels = pipe.check_labels(a.classes)
    t0 = time.perf_counter()
    if a.previews:  # the previews are written as they come (their writes are in t_gen)
        every = {"every" if plan.family == "var" else "every_rows": a.preview_every or 1}
        out, n_previews = None, 0
        for preview in pipe.stream(labels, seed=a.seed, progress=not a.quiet, **every, **kw):
            out = preview.images
            images.save_grid(out, os.path.join(a.previews, f"{preview._fields[0]}_{preview[0]:02d}.png"),
                             nrow=a.nrow)
            n_previews += 1
    else:
        out = pipe(labels, seed=a.seed, progress=not a.quiet, **kw)  # bars: scales / passes, then decoding
    if out.is_cuda:
        torch.cuda.synchronize()
    t_gen = time.perf_counter() - t0
    make_parent(a.out)
    images.save_grid(out, a.out, nrow=a.nrow)
    if a.per_image:
        images.save_each(out, a.per_image, [f"{i:03d}_class{int(c)}.png" for i, c in enumerate(labels)])
    print(f"var-rt: {len(labels)} images ({out.shape[-1]} px) in {t_gen:.2f} s (load {t_load:.1f} s) -> {a.out}"
          + (f" and {a.per_image}/" if a.per_image else "")
          + (f" ({n_previews} previews in {a.previews}/)" if a.previews else ""))
    if a.verbose:
        stats = dict(getattr(pipe, "last_stats", {}) or {})
        if getattr(pipe, "last_forward_passes", None) is not None:
            stats["forward_passes"] = pipe.last_forward_passes
        print("var-rt: " + json.dumps(stats))
    return 0
