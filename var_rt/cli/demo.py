"""`var-rt demo` and `var-rt eval-demo`: the arguments; the commands are in var_rt.demo.run (embedded models)."""
from __future__ import annotations


def add_parser(sub) -> None:
    try:
        from var_rt.demo import run
    except ImportError:  # an install without the demo package: the other commands still work
        return
    d = sub.add_parser("demo", help="generate a labelled PNG grid with the embedded demo models (SHAPES-10)")
    d.add_argument("--out", default="out/demo.png", help="PNG path")
    d.add_argument("--edit-out", metavar="PATH",
                   help="the zero-shot editing grid (VAR drafter: inpainting, class edits, outpainting); default: "
                        "beside --out (out/demo_edit.png); 'none': not drawn")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--samples", type=int, default=2, help="images per class and method")
    d.add_argument("--classes", type=int, nargs="+", help="class ids (default: all 10)")
    d.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of the 32 px images")
    _common(d)
    d.set_defaults(fn=_checked(run.cmd_demo))
    e = sub.add_parser("eval-demo", help="classifier accuracy and Frechet distance of the demo models' samples")
    e.add_argument("--samples-per-class", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=int, default=100)
    e.add_argument("--json", help="also write the rows as JSON here")
    _common(e)
    e.set_defaults(fn=_checked(run.cmd_eval))


def _common(p) -> None:
    p.add_argument("--methods", choices=["all", "var", "llamagen"], default="all", help="which model families")
    p.add_argument("--weights", help="folder of the VAR demo files (default: the shipped ones)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    from var_rt.cli.args import add_quiet
    add_quiet(p)
    p.add_argument("--llamagen-methods", metavar="LIST",
                   help="LlamaGen columns, comma-separated: seq, zipar-W, zipar-W-official, sjd-L, sjd-L-relaxed-K, "
                        "zipar-W-sjd-L (default: seq and ZipAR at the demo windows)")
    p.add_argument("--cfg-skip-last", metavar="LIST",
                   help="VAR/CoDe columns per guidance skip M, comma-separated (e.g. 0,1,2,3): the last M scales "
                        "without guidance (default: 0 only)")


def _checked(cmd):
    def fn(a):
        check_args(a)
        return cmd(a)
    return fn


def check_args(a) -> None:
    """Every demo argument before any model is loaded: counts, class ids, the weights folder and its VAR files
    (family, config, keys: loaders.inspect); the output paths are checked by cli.main."""
    import os

    from var_rt import loaders
    from var_rt.cli.args import UsageError, check_count
    from var_rt.demo import models as dm
    from var_rt.demo.data import NUM_CLASSES
    if a.cmd == "demo":
        if getattr(a, "edit_out", None) not in (None, "none"):
            from var_rt.cli.args import check_output
            check_output(a.edit_out, "--edit-out")
        check_count(a.samples, "--samples")
        check_count(a.scale, "--scale", 1, 64)
        bad = [c for c in a.classes or [] if not 0 <= c < NUM_CLASSES]
        if bad:
            raise UsageError(f"--classes: class ids {bad} outside [0, {NUM_CLASSES}) (SHAPES-10)")
    else:
        check_count(a.samples_per_class, "--samples-per-class")
        check_count(a.batch, "--batch")
    check_count(a.threads, "--threads")
    if getattr(a, "llamagen_methods", None) is not None:
        from var_rt.demo.run import parse_llamagen_methods
        try:
            parse_llamagen_methods(a.llamagen_methods)
        except ValueError as e:
            raise UsageError(f"--llamagen-methods: {e}") from None
    if getattr(a, "cfg_skip_last", None) is not None:
        from var_rt.demo.run import parse_cfg_skip
        if a.methods == "llamagen":
            raise UsageError("--cfg-skip-last is for the VAR/CoDe columns; --methods llamagen has none")
        try:
            parse_cfg_skip(a.cfg_skip_last, len(dm.load_manifest(a.weights or dm.WEIGHTS_DIR).get("patch_nums", ())))
        except ValueError as e:
            raise UsageError(f"--cfg-skip-last: {e}") from None
    if a.weights is not None and a.methods == "llamagen":
        raise UsageError("--weights is the folder of the VAR demo files; --methods llamagen does not use it")
    if a.methods == "llamagen":  # with "all", missing LlamaGen files leave the VAR columns only
        for name, family in ((dm.GPT_FILE, "llamagen"), (dm.VQ_FILE, "vq16")):
            path = os.path.join(dm.WEIGHTS_DIR, name)
            if not os.path.isfile(path):
                raise UsageError(f"--methods llamagen: the LlamaGen demo weights are missing ({path}; train: python "
                                 "examples/shapes10/train_llamagen.py, in the repository)")
            loaders.inspect(path, family, "LlamaGen demo weights")
        return
    folder = a.weights or dm.WEIGHTS_DIR
    if not os.path.isdir(folder):
        raise UsageError(f"--weights {folder}: no such folder")
    label = "--weights" if a.weights is not None else "demo weights"
    files = [("vae", "vqvae"), ("var_drafter", "var")] + ([("var_refiner", "var")] if dm.demo_code_steps(folder) else [])
    for name, family in files:
        path = os.path.join(folder, name + ".safetensors")
        if not os.path.isfile(path):
            raise UsageError(f"{label}: {path} is missing (train: python {dm.TRAIN_VAR}, in the repository)")
        loaders.inspect(path, family, label)
