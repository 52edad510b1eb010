"""`var-rt generate`: images for some classes, written as one PNG grid (and optionally one PNG each)."""
from __future__ import annotations

import json
import time

import torch

from var_rt.cli.args import (add_model_args, add_quiet, add_sampling_args, build_pipeline, check_classes, check_count,
                             check_model, check_sampling, make_parent, sampling_kwargs)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample images for some classes and write a PNG grid")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--classes", type=int, nargs="+", required=True, help="class ids, one image each")
    g.add_argument("--out", default="grid.png", help="PNG grid path")
    g.add_argument("--per-image", metavar="DIR", help="also write one PNG per image here")
    g.add_argument("--nrow", type=int, help="images per grid row")
    g.add_argument("--verbose", action="store_true", help="print KV memory and other stats")
    add_quiet(g)
    g.set_defaults(fn=cmd_generate)


def cmd_generate(a) -> int:
    from var_rt import images
    plan = check_model(a)  # everything before anything is loaded (the outputs: cli.main)
    check_classes(a.classes, plan)
    check_sampling(a, plan)
    check_count(a.nrow, "--nrow")
    t0 = time.perf_counter()
    pipe = build_pipeline(a, plan=plan)
    t_load = time.perf_counter() - t0
    kw = sampling_kwargs(pipe, a)
    labels = pipe.check_labels(a.classes)
    t0 = time.perf_counter()
    out = pipe(labels, seed=a.seed, progress=not a.quiet, **kw)  # bars: scales / passes, then decoding
    if out.is_cuda:
        torch.cuda.synchronize()
    t_gen = time.perf_counter() - t0
    make_parent(a.out)
    images.save_grid(out, a.out, nrow=a.nrow)
    if a.per_image:
        images.save_each(out, a.per_image, [f"{i:03d}_class{int(c)}.png" for i, c in enumerate(labels)])
    print(f"var-rt: {len(labels)} images ({out.shape[-1]} px) in {t_gen:.2f} s (load {t_load:.1f} s) -> {a.out}"
          + (f" and {a.per_image}/" if a.per_image else ""))
    if a.verbose:
        stats = dict(getattr(pipe, "last_stats", {}) or {})
        if getattr(pipe, "last_forward_passes", None) is not None:
            stats["forward_passes"] = pipe.last_forward_passes
        print("var-rt: " + json.dumps(stats))
    return 0
