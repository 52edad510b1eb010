"""`var-rt download NAME...` (fetch official models ahead of time, e.g. on a login node) and `var-rt models` (the
names, their Hub files, approximate sizes and the papers' figures). The table and the fetching: var_rt.hub."""
from __future__ import annotations


def add_parser(sub) -> None:
    d = sub.add_parser("download", help="fetch official models by name into the Hugging Face cache (or --dir)")
    d.add_argument("names", nargs="+", metavar="NAME", help="model names (var-rt models lists them)")
    d.add_argument("--dir", help="copy the files into this folder (plain files for --var/--vae ...) instead of "
                                 "only the Hugging Face cache")
    d.add_argument("--revision", help="the Hub revision (branch, tag or commit) of each model's repo")
    d.add_argument("--force", action="store_true", help="download again even when cached (a damaged file)")
    d.add_argument("--no-check", action="store_true",
                   help="skip checking each file with the strict loader (keys and shapes, nothing loaded)")
    d.set_defaults(fn=cmd_download)
    m = sub.add_parser("models", help="the official model names, their Hub files, sizes and paper figures")
    m.set_defaults(fn=cmd_models)


def cmd_download(a) -> int:
    from var_rt import hub
    from var_rt.cli.args import UsageError
    entries = []
    for n in a.names:  # every name checked before anything is fetched
        try:
            entries.append(hub.entry(n))
        except ValueError as e:
            raise UsageError(str(e)) from None
    for e in entries:
        paths = hub.resolve(e.name, revision=a.revision, force_download=a.force, local_dir=a.dir)
        if not a.no_check:
            hub.check_files(e, paths)
        for role, p in paths.items():
            print(f"{e.name}\t{role}\t{p}", flush=True)
    return 0


def cmd_models(a) -> int:
    from var_rt import hub
    rows = hub.rows()
    head = ("name", "image", "files (Hub repo/file)", "size", "paper figure", "note")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    for r in [head] + rows:
        cols = [str(c).ljust(w) for c, w in zip(r[:4], widths)] + [r[4], r[5]]
        print("  ".join(cols).rstrip())
    print("sizes: approximate (parameters x 4 bytes); figures: the papers' (FID, 50k ImageNet samples), not "
          "measured by var_rt")
    return 0
