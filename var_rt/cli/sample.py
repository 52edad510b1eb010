"""`var-rt sample` and `var-rt fid`: the arguments of evaluation runs; the runs themselves are var_rt.evaluation."""
from __future__ import annotations

from var_rt.cli.args import add_model_args, add_sampling_args, build_pipeline, sampling_kwargs


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
    s.set_defaults(fn=cmd_sample)
    f = sub.add_parser("fid", help="FID of DIR.npz against a reference npz (pytorch-fid, local weights only)")
    f.add_argument("npz")
    f.add_argument("--ref", required=True)
    f.set_defaults(fn=cmd_fid)


def cmd_sample(a) -> int:
    from var_rt import evaluation
    return evaluation.run(a, build_pipeline, sampling_kwargs)


def cmd_fid(a) -> int:
    from var_rt import evaluation
    print(f"FID {evaluation.fid(a.npz, a.ref):.3f}")
    return 0
