"""Evaluation runs (`var-rt sample`): many images (50 per class), resumable, sharded over
processes with torchrun. The command line's argument handling is in var_rt.cli.sample; this module does not
import the command line (`run` takes the pipeline builder and the sampling-argument reader as callables).

Image i has class i // per_class and seed mix_seed(seed, i): the result depends on neither the number of
processes nor the batch size. Rank r of W takes the indices i with i % W == r that are not on disk yet. PNGs are
written atomically (temporary file + rename), a rerun verifies what is there (readable, right size) and redoes
the rest. At the end rank 0 packs DIR.npz (arr_0: uint8 (N, H, W, 3), index order) and DIR/manifest.json, the
input of `var-rt fid` (var_rt.fid).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
import torch

CRASH_ENV = "VAR_RT_TEST_CRASH_AFTER"  # test hook: a process exits abruptly after writing this many images


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def is_complete(path: str, size: int) -> bool:
    """A PNG that decodes fully at the expected size."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (size, size) and im.mode == "RGB"
    except Exception:
        return False


def clean_partials(out_dir: str) -> None:
    """Remove the temporary files a killed run left (images.atomic_path): in DIR, and DIR.npz's beside it."""
    from var_rt.images import TMP_PREFIX
    parent, npz = os.path.split(out_dir + ".npz")
    for folder, prefix in ((out_dir, TMP_PREFIX), (parent, f"{TMP_PREFIX}{npz}-")):
        for name in os.listdir(folder):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join(folder, name))
                except FileNotFoundError:
                    pass


def progress_bar(show: bool, **kw):
    """A tqdm bar on stderr, or None when not shown (--quiet, ranks other than 0)."""
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, **kw)


class Dist:
    """torch.distributed when launched by torchrun (NCCL on GPUs, gloo on the CPU), else a single process."""

    def __init__(self, device: str):
        import torch.distributed as dist
        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.on = self.world > 1
        self.device = device
        if self.on and not dist.is_initialized():
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                self.device = f"cuda:{torch.cuda.current_device()}"
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))

    def all_reduce(self, value: float, op: str = "sum") -> float:
        if not self.on:
            return value
        dev = self.device if self.device.startswith("cuda") else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=dev)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.MAX)
        return float(t.item())

    def barrier(self):
        if self.on:
            self.dist.barrier()

    def close(self, ok: bool = True):
        """Tear the process group down. After a normal end every rank first meets the others in a barrier, so no
        rank destroys its group (closing its gloo sockets) while another still has a collective in flight, and
        after destroying it waits (on the rendezvous store, up to 60 s) until every rank has, so none exits while
        another is still tearing down: a rank whose peer vanished under it could abort at exit ("terminate called
        without an active exception"). After an error the group is destroyed at once (the other ranks may never
        reach a barrier)."""
        if not (self.on and self.dist.is_initialized()):
            return
        store = None
        try:
            if ok:
                self.dist.barrier()
                try:  # the rendezvous store (torchrun's agent holds it): outlives the group
                    store = self.dist.distributed_c10d._get_default_store()
                except Exception:
                    store = None
        finally:
            self.dist.destroy_process_group()
        if store is not None:  # and no rank exits (closing its sockets) before every rank has torn its group down
            try:
                store.add("var_rt/sample/closed", 1)
                deadline = time.monotonic() + 60
                while store.add("var_rt/sample/closed", 0) < self.world and time.monotonic() < deadline:
                    time.sleep(0.01)
            except Exception:
                pass


def run(a, build_pipeline, sampling_kwargs) -> int:
    from var_rt import images
    from var_rt.ops import mix_seed
    ctx = Dist(a.device)
    a.device = ctx.device
    ok = False  # set once every rank is done: then Dist.close meets the others before tearing down
    out_dir = os.path.abspath(a.out.rstrip("/"))
    try:
        if ctx.rank == 0:
            images.check_writable(out_dir, is_dir=True)
            os.makedirs(out_dir, exist_ok=True)
            clean_partials(out_dir)
        ctx.barrier()
        pipe = build_pipeline(a, log=print if ctx.rank == 0 else (lambda *_: None))
        kw = sampling_kwargs(pipe, a)
        total = pipe.num_classes * a.per_class if a.num is None else a.num
        if total <= 0 or a.per_class <= 0:
            raise ValueError(f"nothing to sample: --per-class {a.per_class}, --num {a.num}")
        size = pipe.image_size
        show = ctx.rank == 0 and not getattr(a, "quiet", False)  # progress: tqdm bars on rank 0's stderr
        owned = range(ctx.rank, total, ctx.world)
        check = progress_bar(show, total=len(owned), desc="verify existing", unit="png", leave=False)
        mine = []
        for i in owned:
            path = os.path.join(out_dir, png_name(i))
            if not (os.path.exists(path) and is_complete(path, size)):
                mine.append(i)
            if check is not None:
                check.update(1)
        if check is not None:
            check.close()
        batches = [mine[j:j + a.batch] for j in range(0, len(mine), a.batch)]
        rounds = int(ctx.all_reduce(len(batches), "max"))
        todo_all = int(ctx.all_reduce(len(mine)))
        if ctx.rank == 0:
            print(f"var-rt sample: {total} images, {total - todo_all} already done, {todo_all} to go, "
                  f"{ctx.world} process(es), batch {a.batch} -> {out_dir}", flush=True)
        bar = progress_bar(show, total=todo_all, desc="sample", unit="img", smoothing=0.1)  # img/s and ETA
        crash_after = int(os.environ.get(CRASH_ENV, "0"))
        written = 0
        for r in range(rounds):
            error = ""
            if r < len(batches):
                idx = batches[r]
                try:
                    labels = [i // a.per_class for i in idx]
                    seeds = [mix_seed(a.seed, i) for i in idx]
                    imgs = pipe(labels, seeds=seeds, **kw)
                    for arr, i in zip(images.to_uint8(imgs), idx):
                        images.write_png(arr, os.path.join(out_dir, png_name(i)))
                        written += 1
                        if crash_after and written >= crash_after:
                            os._exit(17)
                except Exception as e:  # tell every rank, so the whole run stops with this message
                    error = f"{type(e).__name__}: {e}"
            failed = ctx.all_reduce(1.0 if error else 0.0)
            if failed:
                if error:
                    print(f"var-rt sample: rank {ctx.rank} failed: {error}", file=sys.stderr)
                raise RuntimeError(f"{int(failed)} rank(s) failed (see above); images written so far are kept, "
                                   "rerun the same command to resume")
            done = int(ctx.all_reduce(len(batches[r]) if r < len(batches) else 0))
            if bar is not None:
                bar.update(done)
        if bar is not None:
            bar.close()
        ctx.barrier()
        if ctx.rank == 0:
            pack(out_dir, total, size, a, pipe, progress=show)
        ok = True
        return 0
    finally:
        ctx.close(ok)


def pack(out_dir: str, total: int, size: int, a, pipe, progress: bool = False) -> None:
    """DIR.npz with arr_0 (N, H, W, 3) uint8 in index order, and DIR/manifest.json (progress: a bar of PNGs)."""
    from PIL import Image
    import var_rt
    arr = np.empty((total, size, size, 3), np.uint8)
    bar = progress_bar(progress, total=total, desc="pack npz", unit="png", leave=False)
    for i in range(total):
        if bar is not None:
            bar.update(1)
        path = os.path.join(out_dir, png_name(i))
        try:  # read once: decodes fully at the right size (as is_complete), then kept
            with Image.open(path) as im:
                im.load()
                good = im.size == (size, size) and im.mode == "RGB"
                if good:
                    arr[i] = np.asarray(im)
        except Exception:
            good = False
        if not good:
            raise RuntimeError(f"{path} is missing or unreadable after sampling")
    if bar is not None:
        bar.close()
    from var_rt.images import atomic_path, write_npz
    npz = out_dir + ".npz"
    write_npz(npz, arr_0=arr)  # atomic (Ctrl-C or a crash: no partial npz is left) and byte-reproducible
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    config = {k: v for k, v in vars(a).items() if k != "fn"}
    manifest = {
        "images": total, "image_size": size, "npz": npz,
        "class_of_index": "index // per_class", "seed_of_index": "var_rt.ops.mix_seed(seed, index)",
        "config": config, "model": type(pipe).__name__,
        "versions": {"var_rt": var_rt.__version__, "torch": torch.__version__, "triton": triton_v},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    with atomic_path(os.path.join(out_dir, "manifest.json"), suffix=".json") as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    print(f"var-rt sample: wrote {npz} ({total} x {size} x {size} x 3 uint8) and {out_dir}/manifest.json")
