"""`var-rt fid`: FID / Inception Score (/ precision-recall) of a samples npz under the ADM evaluator's protocol;
the metrics themselves are var_rt.fid."""
from __future__ import annotations


def add_parser(sub) -> None:
    f = sub.add_parser("fid", help="FID + Inception Score of SAMPLES.npz against an ADM reference batch "
                                   "(VIRTUAL_imagenet256_labeled.npz): TF Inception via torch-fidelity, local weights")
    f.add_argument("npz", metavar="SAMPLES.npz", help="arr_0: uint8 (N, H, W, 3), as `var-rt sample` writes DIR.npz")
    f.add_argument("--ref", required=True, metavar="REF.npz",
                   help="ADM reference batch: its stored mu/sigma are used; arr_0 only: statistics computed from it")
    f.add_argument("--inception-weights", metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: $VAR_RT_INCEPTION_WEIGHTS, else the torch "
                        "hub cache's checkpoints/); never downloaded")
    f.add_argument("--json", metavar="OUT", help="write all numbers, the protocol and provenance here")
    f.add_argument("--batch", type=int, default=64, help="images per Inception batch (ADM: 64)")
    f.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    f.add_argument("--precision-recall", action="store_true",
                   help="also ADM's k=3 precision/recall (runs the reference's 10k images through Inception)")
    f.add_argument("--quiet", action="store_true", help="no progress bar or notes; only the result lines")
    f.set_defaults(fn=cmd_fid)


def cmd_fid(a) -> int:
    from var_rt import fid
    return fid.run(a)
