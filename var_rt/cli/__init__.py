"""`var-rt` command line: generate | edit | info | sample | fid | demo | eval-demo | download | models | serve.

One module per command (generate.py, edit.py, info.py, sample.py, fid.py, demo.py for `demo` and `eval-demo`), each
with an `add_parser(sub)`; args.py holds the model and sampling arguments they share and what they build.
`python -m var_rt.cli ...` (and `torchrun -m var_rt.cli sample ...`) runs `main` through __main__.py. Nothing
outside this package imports it.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

# Every user error is one line on stderr, `var-rt: error: ...`, exit code 2 (argparse's own errors too); a warning
# is one line `var-rt: warning: ...`; Ctrl-C is `var-rt: interrupted`, exit code 130 (writers are atomic: no
# partial file is left). Output paths are checked (OUTPUTS) before the command loads anything.
USER_ERRORS = (ValueError, OSError, RuntimeError, MemoryError, ImportError)
OUTPUTS = {  # command -> [(argument, option, is a folder)]: checked before the command runs
    "generate": [("out", "--out", False), ("per_image", "--per-image", True)],
    "edit": [("out", "--out", False)],
    "sample": [("out", "--out", True)],
    "demo": [("out", "--out", False)],
    "eval-demo": [("json", "--json", False)],
    "fid": [("json", "--json", False)],
    "download": [("dir", "--dir", True)],
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (UsageError) instead of usage text + exit."""

    def error(self, message):
        from var_rt.cli.args import UsageError
        cmd = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UsageError(f"{cmd}{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from var_rt.cli import demo, edit, fid, generate, hub, info, sample, serve  # here: Ctrl-C is caught
    p = _Parser(prog="var-rt", description="Fast sampling for VAR (+CoDe) and LlamaGen (+ZipAR).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for cmd in (generate, edit, info, sample, fid, demo, hub, serve):
        cmd.add_parser(sub)
    return p


def one_line(e: BaseException) -> str:
    """An exception as one line: an OSError as 'path: reason', anything else its message with newlines folded."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        name = os.fspath(e.filename)
        if os.path.basename(name).startswith(".tmp-"):  # an atomic writer's temporary file: name the folder
            text = f"cannot write in {os.path.dirname(name) or '.'}: {e.strerror}"
        else:
            text = f"{name}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _warning_line(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    print(f"var-rt: warning: {text.removeprefix('var_rt: ')}", file=sys.stderr, flush=True)


def _close_bars() -> None:
    """Close live tqdm bars, so that the last line on stderr is ours."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:
            pass


def check_outputs(a) -> None:
    from var_rt.cli.args import check_output
    for dest, option, is_dir in OUTPUTS.get(getattr(a, "cmd", None), []):
        check_output(getattr(a, dest, None), option, is_dir)


def main(argv=None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            a = build_parser().parse_args(argv)
            check_outputs(a)
            return a.fn(a)
        except KeyboardInterrupt:
            _close_bars()
            print("var-rt: interrupted", file=sys.stderr, flush=True)
            return 130
        except USER_ERRORS as e:
            if os.environ.get("VAR_RT_TRACEBACK") == "1":
                raise
            _close_bars()
            print(f"var-rt: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 2
