"""`var-rt` command line: generate | info | sample | fid | demo | eval-demo.

One module per command (generate.py, info.py, sample.py for `sample` and `fid`, demo.py for `demo` and
`eval-demo`), each with an `add_parser(sub)`; args.py holds the model and sampling arguments they share and what
they build. `python -m var_rt.cli ...` (and `torchrun -m var_rt.cli sample ...`) runs `main` through __main__.py.
Nothing outside this package imports it.
"""
from __future__ import annotations

import argparse
import sys

from var_rt.cli import demo, generate, info, sample


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-rt", description="Fast sampling for VAR (+CoDe) and LlamaGen (+ZipAR).")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in (generate, info, sample, demo):
        cmd.add_parser(sub)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, RuntimeError, PermissionError, FileNotFoundError, MemoryError) as e:
        print(f"var-rt: error: {e}", file=sys.stderr)
        return 2
