"""`var-rt demo` and `var-rt eval-demo`: the embedded, trained SHAPES-10 demo models.

demo: one labelled PNG grid, a row per class; columns: VAR drafter alone, CoDe at two N, LlamaGen sequential and
ZipAR at two windows (when the LlamaGen demo weights are there; else the VAR columns only).
eval-demo: a table of classifier accuracy, Frechet distance of classifier features vs real held-out SHAPES-10
images, and time, for each method. The models load through var_rt.demo.models; the arguments are var_rt.cli.demo.
"""
from __future__ import annotations

import os
import time

import torch

from var_rt import ops
from var_rt.demo.data import CLASSES, NUM_CLASSES


def _var_methods(weights, cfg_skip=(0,)):
    """[(column name, generate(labels, seed, progress=False) -> images01, info())] for the VAR drafter and CoDe
    (progress: the pipeline's bars, scales then decoding); one column per guidance skip M in `cfg_skip` (the last M
    scales without guidance: cfg_skip_last)."""
    from var_rt.demo import models as dm
    samp = dm.demo_sampling(weights)
    out = []
    for n in (None, *dm.demo_code_steps(weights)):
        pipe = dm.load_demo_var(n, weights)
        for m in cfg_skip:
            name = ("VAR drafter" if n is None else f"CoDe N={n}") + (f" skip {m}" if m else "")

            def gen(labels, seed, pipe=pipe, m=m, progress=False):
                return pipe(labels, seeds=[ops.mix_seed(seed, i) for i in range(len(labels))], progress=progress,
                            cfg_skip_last=m, **samp)
            out.append((name, gen, lambda: ""))
    return out


def parse_cfg_skip(spec: str, num_scales: int | None = None) -> tuple:
    """--cfg-skip-last: comma-separated ints in 0..num_scales-1 (>= 0 when the scale count is unknown: the pipeline
    checks) -> tuple. ValueError on anything else."""
    try:
        vals = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        vals = ()
    hi = num_scales - 1 if num_scales else None
    if not vals or any(v < 0 or (hi is not None and v > hi) for v in vals):
        raise ValueError(f"{spec!r}: expected comma-separated ints in 0..{hi if hi is not None else 'K-1'} (the last "
                         "scales drawn without guidance; 0 = off)")
    return vals


def parse_llamagen_methods(spec: str) -> list:
    """--llamagen-methods: comma-separated seq | zipar-W | zipar-W-official | sjd-L | sjd-L-relaxed-K |
    zipar-W-sjd-L (SJD + ZipAR) -> [(column name, pipeline keyword arguments)]. ValueError on anything else."""
    out = []
    for m in (x.strip() for x in spec.split(",") if x.strip()):
        f = m.split("-")
        try:
            if f == ["seq"]:
                out.append(("LlamaGen seq", {}))
            elif f[0] == "zipar" and len(f) == 4 and f[2] == "sjd" and int(f[3]) >= 1:
                out.append((f"ZipAR w={int(f[1])} + SJD L={int(f[3])}",
                            dict(zipar_window=int(f[1]), sjd_window=int(f[3]))))
            elif f[0] == "zipar" and len(f) in (2, 3) and (len(f) == 2 or f[2] in ("exact", "official")):
                mask = f[2] if len(f) == 3 else "exact"
                out.append((f"ZipAR w={int(f[1])}" + (" official" if mask == "official" else ""),
                             dict(zipar_window=int(f[1]), zipar_mask=mask)))
            elif f[0] == "sjd" and (len(f) == 2 or (len(f) == 4 and f[2] == "relaxed")) and int(f[1]) >= 1:
                k = int(f[3]) if len(f) == 4 else 0
                out.append((f"SJD L={int(f[1])}" + (f" relaxed {k}" if k else ""),
                             dict(sjd_window=int(f[1]), sjd_relaxed=k)))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"LlamaGen method {m!r}: expected seq, zipar-W, zipar-W-official, sjd-L, "
                             "sjd-L-relaxed-K or zipar-W-sjd-L") from None
    return out


def _llamagen_methods(log=print, spec=None):
    """LlamaGen sequential + ZipAR at the two demo windows (or the methods of `spec`, parse_llamagen_methods), or
    [] (with the reason printed) when missing."""
    try:
        from var_rt.demo import models as dm
        pipe = dm.load_demo_llamagen(device="cpu")
        windows, samp = tuple(dm.LLAMAGEN_ZIPAR_WINDOWS), dict(dm.LLAMAGEN_SAMPLING)
    except (ImportError, FileNotFoundError, AttributeError) as e:
        log(f"LlamaGen demo models not available ({type(e).__name__}: {e}): VAR columns only")
        return []
    todo = parse_llamagen_methods(spec or ",".join(["seq", *(f"zipar-{w}" for w in windows)]))
    out = []
    for name, kw in todo:
        stats = {"passes": [], "acc": []}

        def gen(labels, seed, kw=kw, stats=stats, progress=False):
            seeds = [ops.mix_seed(seed, i) for i in range(len(labels))]
            imgs = pipe(torch.as_tensor(labels), seeds=seeds, progress=progress, **kw, **samp)
            st = getattr(pipe, "last_stats", {}) or {}
            stats["passes"] += st.get("sjd_passes", [pipe.last_forward_passes] * len(labels))
            stats["acc"] += st.get("sjd_acceptance", [])
            return imgs

        def info(stats=stats):
            p, a = stats["passes"], stats["acc"]
            txt = f"{sum(p) / max(len(p), 1):.1f} passes/img" if p else "? passes"
            return txt + (f", acceptance {sum(a) / len(a):.3f}" if a else "")
        out.append((name, gen, info))
    return out


def methods(which="all", weights=None, log=print, llamagen=None, cfg_skip=None):
    """cfg_skip: None, or the --cfg-skip-last spec (parse_cfg_skip): VAR/CoDe columns per guidance skip."""
    from var_rt.demo import models as dm
    weights = weights or dm.WEIGHTS_DIR
    out = []
    if which in ("all", "var"):
        skips = (0,)
        if cfg_skip is not None:
            skips = parse_cfg_skip(cfg_skip, len(dm.load_manifest(weights).get("patch_nums", ())))
        out += _var_methods(weights, skips)
    if which in ("all", "llamagen"):
        out += _llamagen_methods(log, llamagen)
    return out


def draw_grid(columns, classes, samples: int, scale: int, path: str) -> str:
    """columns: [(name, subtitle, images01 (len(classes)*samples, 3, h, w) ordered class-major)]."""
    from PIL import Image, ImageDraw, ImageFont
    from var_rt.images import to_uint8, write_png
    import numpy as np
    font = ImageFont.load_default()
    h, w = columns[0][2].shape[-2:]
    cell_h, cell_w, pad, gap = h * scale, w * scale, 4, 12
    label_w, head_h = 128, 34
    group_w = samples * (cell_w + pad) - pad
    W = label_w + len(columns) * (group_w + gap)
    H = head_h + len(classes) * (cell_h + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for ci, (name, sub, imgs) in enumerate(columns):
        x0 = label_w + ci * (group_w + gap)
        draw.text((x0, 4), name, fill="black", font=font)
        draw.text((x0, 18), sub, fill=(90, 90, 90), font=font)
        arr = to_uint8(imgs)
        for ri in range(len(classes)):
            for s in range(samples):
                tile = Image.fromarray(arr[ri * samples + s]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (x0 + s * (cell_w + pad), head_h + ri * (cell_h + pad)))
    for ri, c in enumerate(classes):
        draw.text((4, head_h + ri * (cell_h + pad) + cell_h // 2 - 6), f"{c}: {CLASSES[c]}", fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(np.asarray(canvas), path)
    return path


# ---- the zero-shot editing grid (a second PNG of `var-rt demo`) ----------------------------------------------------
# (row label, class of the input image, its render seed, mask, class drawn in the masked region)
EDIT_TASKS = (
    ("inpaint (red disk)", 0, 11, "centre", 0),
    ("edit to yellow ring", 0, 11, "centre", 6),
    ("edit to magenta cross", 0, 11, "centre", 7),
    ("inpaint right half", 5, 4, "right", 5),
    ("outpaint (stripes)", 3, 4, "border", 3),
)
EDIT_SEEDS = 4  # outputs per row


def edit_mask(kind: str, size: int) -> torch.Tensor:
    """(1, size, size) float, 1 = regenerate: 'centre' (the middle half of each side), 'right' (the right half) or
    'border' (all but the centre)."""
    m = torch.zeros(1, size, size)
    q = size // 4
    if kind == "right":
        m[:, :, size // 2:] = 1
    else:
        m[:, q:size - q, q:size - q] = 1
        if kind == "border":
            m = 1 - m
    return m


def edit_grid_path(out: str) -> str:
    """The editing grid's path beside the main grid: out/demo.png -> out/demo_edit.png."""
    root, ext = os.path.splitext(out)
    return f"{root}_edit{ext or '.png'}"


def edit_rows(weights=None, seed=0, n=EDIT_SEEDS, progress=False) -> list:
    """[(label, input (3, h, w), mask (1, h, w), outputs (n, 3, h, w))] of EDIT_TASKS on the demo VAR drafter:
    VARPipeline.edit with the demo sampling settings, output i with seed mix_seed(seed, i)."""
    import numpy as np

    from var_rt.demo import models as dm
    from var_rt.demo.data import render
    pipe = dm.load_demo_var(None, weights or dm.WEIGHTS_DIR)
    samp, size, rows = dm.demo_sampling(weights or dm.WEIGHTS_DIR), pipe.image_size, []
    xs = [torch.from_numpy(render(src, np.random.default_rng(rs), size)).permute(2, 0, 1)
          for _, src, rs, _, _ in EDIT_TASKS]
    ms = [edit_mask(kind, size) for *_, kind, _ in EDIT_TASKS]
    # one batch for all rows (an image's bytes do not depend on its batch): n outputs per row, seeds 0..n-1
    out = pipe.edit(torch.stack(xs).repeat_interleave(n, 0), torch.stack(ms).repeat_interleave(n, 0),
                    [t[-1] for t in EDIT_TASKS for _ in range(n)],
                    seeds=[ops.mix_seed(seed, i) for _ in EDIT_TASKS for i in range(n)], progress=progress, **samp)
    for r, (label, *_) in enumerate(EDIT_TASKS):
        rows.append((label, xs[r], ms[r], out[r * n:(r + 1) * n]))
    return rows


def draw_edit_grid(rows, scale: int, path: str) -> str:
    """rows: edit_rows' output; columns: input | mask (white = regenerate) | the outputs."""
    from PIL import Image, ImageDraw, ImageFont

    from var_rt.images import to_uint8, write_png
    import numpy as np
    font = ImageFont.load_default()
    h, w = rows[0][1].shape[-2:]
    cell_h, cell_w, pad = h * scale, w * scale, 4
    label_w, head_h, n = 150, 20, rows[0][3].shape[0]
    W, H = label_w + (n + 2) * (cell_w + pad) + 8, head_h + len(rows) * (cell_h + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for ci, title in enumerate(["input", "mask"] + [f"seed {i}" for i in range(n)]):
        draw.text((label_w + ci * (cell_w + pad) + (8 if ci >= 2 else 0), 4), title, fill="black", font=font)
    for ri, (label, x, m, out) in enumerate(rows):
        y = head_h + ri * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black", font=font)
        tiles = to_uint8(torch.cat([x[None], m.expand(3, -1, -1)[None], out]))
        for ci, arr in enumerate(tiles):
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + ci * (cell_w + pad) + (8 if ci >= 2 else 0), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_png(np.asarray(canvas), path)
    return path


def cmd_demo(a) -> int:
    torch.set_num_threads(max(1, a.threads or torch.get_num_threads()))
    classes = a.classes or list(range(NUM_CLASSES))
    labels = [c for c in classes for _ in range(a.samples)]
    cols = []
    for name, gen, info in methods(a.methods, a.weights, llamagen=getattr(a, "llamagen_methods", None),
                                   cfg_skip=getattr(a, "cfg_skip_last", None)):
        t0 = time.time()
        with torch.no_grad():
            imgs = gen(labels, a.seed, progress=not getattr(a, "quiet", False))
        dt = time.time() - t0
        extra = info()
        cols.append((name, f"{dt:.2f} s" + (f", {extra}" if extra else ""), imgs))
        print(f"{name:14s} {len(labels)} images in {dt:6.2f} s{'  (' + extra + ')' if extra else ''}")
    if not cols:
        print("no demo model available")
        return 1
    path = draw_grid(cols, classes, a.samples, a.scale, a.out)
    print(f"wrote {path}")
    edit_out = getattr(a, "edit_out", None) or edit_grid_path(a.out)
    if a.methods in ("all", "var") and edit_out != "none":  # the zero-shot editing grid, VAR drafter
        t0 = time.time()
        with torch.no_grad():
            rows = edit_rows(a.weights, a.seed, progress=not getattr(a, "quiet", False))
        print(f"{'VAR edit':14s} {len(rows) * EDIT_SEEDS} edits in {time.time() - t0:6.2f} s")
        print(f"wrote {draw_edit_grid(rows, a.scale, edit_out)}")
    return 0


def cmd_eval(a) -> int:
    from var_rt.demo import classifier
    torch.set_num_threads(max(1, a.threads or torch.get_num_threads()))
    n = a.samples_per_class
    labels = torch.arange(NUM_CLASSES).repeat(n)
    xr, yr = classifier.real_images(n, seed=classifier.HELDOUT_SEED + 1)
    rows = [classifier.evaluate("real SHAPES-10 (other seed)", xr, yr)]
    for name, gen, info in methods(a.methods, a.weights, llamagen=getattr(a, "llamagen_methods", None),
                                   cfg_skip=getattr(a, "cfg_skip_last", None)):
        t0, out = time.time(), []
        bar = None
        if not getattr(a, "quiet", False):  # per method, advanced per batch: img/s and ETA
            from tqdm import tqdm
            bar = tqdm(total=len(labels), desc=name, unit="img", leave=False, dynamic_ncols=True)
        with torch.no_grad():
            for i in range(0, len(labels), a.batch):  # per-chunk seeds: image j's seed depends on (seed, j) only
                out.append(gen(labels[i:i + a.batch].tolist(), ops.mix_seed(a.seed, i)))
                if bar is not None:
                    bar.update(len(out[-1]))
        if bar is not None:
            bar.close()
        rows.append(classifier.evaluate(name, torch.cat(out), labels, time.time() - t0))
        if info():
            rows[-1]["info"] = info()
        print(classifier.format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"SHAPES-10, {n} samples per class, seed {a.seed}; Frechet distance of classifier features vs "
          f"{n} real held-out images per class")
    print(classifier.format_table(rows))
    if a.json:
        import json
        from var_rt.images import atomic_path
        with atomic_path(a.json, suffix=".json") as tmp, open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
