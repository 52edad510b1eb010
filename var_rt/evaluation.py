"""Evaluation runs (`var-rt sample`, `var-rt fid`): many images (50 per class), resumable, sharded over
processes with torchrun. The command line's argument handling is in var_rt.cli.sample; this module does not
import the command line (`run` takes the pipeline builder and the sampling-argument reader as callables).

Image i has class i // per_class and seed mix_seed(seed, i): the result depends on neither the number of
processes nor the batch size. Rank r of W takes the indices i with i % W == r that are not on disk yet. PNGs are
written atomically (temporary file + rename), a rerun verifies what is there (readable, right size) and redoes
the rest. At the end rank 0 packs DIR.npz (arr_0: uint8 (N, H, W, 3), index order) and DIR/manifest.json.
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
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(out_dir, name))


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

    def close(self):
        if self.on and self.dist.is_initialized():
            self.dist.destroy_process_group()


def run(a, build_pipeline, sampling_kwargs) -> int:
    from var_rt import images
    from var_rt.ops import mix_seed
    ctx = Dist(a.device)
    a.device = ctx.device
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
        mine = [i for i in range(ctx.rank, total, ctx.world)
                if not is_complete(os.path.join(out_dir, png_name(i)), size)]
        batches = [mine[j:j + a.batch] for j in range(0, len(mine), a.batch)]
        rounds = int(ctx.all_reduce(len(batches), "max"))
        todo_all = int(ctx.all_reduce(len(mine)))
        bar = None
        if ctx.rank == 0:
            from tqdm import tqdm
            print(f"var-rt sample: {total} images, {total - todo_all} already done, {todo_all} to go, "
                  f"{ctx.world} process(es), batch {a.batch} -> {out_dir}")
            bar = tqdm(total=todo_all, unit="img", dynamic_ncols=True)
        crash_after = int(os.environ.get(CRASH_ENV, "0"))
        written, t0 = 0, time.perf_counter()
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
                bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.2f}")
        if bar is not None:
            bar.close()
        ctx.barrier()
        if ctx.rank == 0:
            pack(out_dir, total, size, a, pipe)
        ctx.barrier()
        return 0
    finally:
        ctx.close()


def pack(out_dir: str, total: int, size: int, a, pipe) -> None:
    """DIR.npz with arr_0 (N, H, W, 3) uint8 in index order, and DIR/manifest.json."""
    from PIL import Image
    import var_rt
    arr = np.empty((total, size, size, 3), np.uint8)
    for i in range(total):
        path = os.path.join(out_dir, png_name(i))
        if not is_complete(path, size):
            raise RuntimeError(f"{path} is missing or unreadable after sampling")
        with Image.open(path) as im:
            arr[i] = np.asarray(im.convert("RGB"))
    npz = out_dir + ".npz"
    tmp = out_dir + ".tmp.npz"
    np.savez(tmp, arr_0=arr)
    os.replace(tmp, npz)
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
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    print(f"var-rt sample: wrote {npz} ({total} x {size} x {size} x 3 uint8) and {out_dir}/manifest.json")


def fid(npz: str, ref: str) -> float:
    """FID between two npz files (arr_0: uint8 (N, H, W, 3)) with pytorch-fid, where it and its Inception weights
    are present locally."""
    try:
        from pytorch_fid import fid_score  # noqa: F401
        from pytorch_fid.inception import FID_WEIGHTS_URL
    except ImportError:
        raise ValueError("var-rt fid needs the pytorch-fid package (pip install pytorch-fid) and its Inception "
                         "weights in the torch hub cache; nothing is downloaded at run time") from None
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    if not os.path.exists(weights):
        raise ValueError(f"Inception weights for FID not found at {weights}; copy "
                         f"{os.path.basename(FID_WEIGHTS_URL)} there (no download at run time)")
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(dev).eval()

    def stats(path):
        x = np.load(path)["arr_0"]
        feats = []
        with torch.no_grad():
            for j in range(0, len(x), 100):
                b = torch.from_numpy(x[j:j + 100]).to(dev).permute(0, 3, 1, 2).float() / 255
                feats.append(model(b)[0].squeeze(-1).squeeze(-1).cpu().numpy())
        f = np.concatenate(feats)
        return f.mean(0), np.cov(f, rowvar=False)
    m1, s1 = stats(npz)
    m2, s2 = stats(ref)
    return float(calculate_frechet_distance(m1, s1, m2, s2))
