"""`var-rt sample`: the arguments of evaluation runs; the runs themselves are var_rt.evaluation (`var-rt fid`:
fid.py)."""
from __future__ import annotations

from var_rt.cli.args import (UsageError, add_model_args, add_quiet, add_sampling_args, build_pipeline, check_count,
                             check_model, check_output, check_sampling, sampling_kwargs)


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="many images for evaluation: resumable, torchrun-sharded, FID-ready npz")
    add_model_args(s)
    add_sampling_args(s)
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--num", "--num-images", dest="num", type=int, default=None,
                   help="only the first N images (index order); under torchrun write --num-images (torchrun's own "
                        "parser takes --num for its --numa-binding)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--out", required=True, help="folder for {index:06d}.png; DIR.npz is written beside it")
    add_quiet(s)
    s.set_defaults(fn=cmd_sample)


def cmd_sample(a) -> int:
    from var_rt import evaluation
    check_count(a.batch, "--batch")  # everything before anything is loaded (the output folder: cli.main)
    check_count(a.per_class, "--per-class")
    check_count(a.num, "--num")
    check_output(a.out.rstrip("/") + ".npz", "--out (DIR.npz beside it)")
    plan = check_model(a)
    check_sampling(a, plan)
    if a.num is not None and a.num > plan.num_classes * a.per_class:
        raise UsageError(f"--num {a.num}: more than the {plan.num_classes * a.per_class} images of "
                         f"{plan.num_classes} classes x --per-class {a.per_class}")
    return evaluation.run(a, lambda a, log=print: build_pipeline(a, log, plan), sampling_kwargs)
