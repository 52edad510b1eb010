"""`var-rt demo` and `var-rt eval-demo`: the arguments; the commands are in var_rt.demo.run (embedded models)."""
from __future__ import annotations


def add_parser(sub) -> None:
    try:
        from var_rt.demo import run
    except ImportError:  # an install without the demo package: the other commands still work
        return
    d = sub.add_parser("demo", help="generate a labelled PNG grid with the embedded demo models (SHAPES-10)")
    d.add_argument("--out", default="out/demo.png", help="PNG path")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--samples", type=int, default=2, help="images per class and method")
    d.add_argument("--classes", type=int, nargs="+", help="class ids (default: all 10)")
    d.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of the 32 px images")
    _common(d)
    d.set_defaults(fn=run.cmd_demo)
    e = sub.add_parser("eval-demo", help="classifier accuracy and Frechet distance of the demo models' samples")
    e.add_argument("--samples-per-class", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=int, default=100)
    e.add_argument("--json", help="also write the rows as JSON here")
    _common(e)
    e.set_defaults(fn=run.cmd_eval)


def _common(p) -> None:
    p.add_argument("--methods", choices=["all", "var", "llamagen"], default="all", help="which model families")
    p.add_argument("--weights", help="folder of the VAR demo files (default: the shipped ones)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
