"""`var-rt sample`: index-determined images, resumable after a crash, identical under torchrun (gloo)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from var_rt import cli, images
from var_rt.ops import mix_seed
from var_rt.pipeline import VARPipeline


def sample_args(files, out, *extra):
    return ["sample", "--var", str(files["var"]), "--vae", str(files["vae"]), "--per-class", "2", "--num-images", "6",
            "--top-k", "20", "--seed", "3", "--device", "cpu", "--out", str(out), *map(str, extra)]


def run_module(args, env=None, launcher=()):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *launcher, "-m", "var_rt.cli", *args], capture_output=True, text=True,
                          env=e, timeout=600)


def read_all(folder, n):
    return [open(os.path.join(folder, f"{i:06d}.png"), "rb").read() for i in range(n)]


def test_npz_order_dtype_and_seed_rule(tmp_path, tiny_files):
    out = tmp_path / "s"
    assert cli.main(sample_args(tiny_files, out, "--batch", "4")) == 0
    arr = np.load(str(out) + ".npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (6, 16, 16, 3)
    pipe = VARPipeline.from_checkpoints(var=tiny_files["var"], vae=tiny_files["vae"], dtype="fp32")
    for i in (0, 3, 5):  # image i: class i // per_class, seed mix_seed(seed, i), alone in its batch
        want = images.to_uint8(pipe([i // 2], seeds=[mix_seed(3, i)], top_k=20))[0]
        assert np.array_equal(arr[i], want)
        assert np.array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), want)
    manifest = (out / "manifest.json").read_text()
    assert '"images": 6' in manifest and "torch" in manifest
    # batch size does not change any image
    out1 = tmp_path / "b1"
    assert cli.main(sample_args(tiny_files, out1, "--batch", "1")) == 0
    assert read_all(out, 6) == read_all(out1, 6)


def test_crash_midway_then_resume_gives_the_complete_identical_set(tmp_path, tiny_files):
    ref = tmp_path / "ref"
    assert cli.main(sample_args(tiny_files, ref, "--batch", "2")) == 0
    out = tmp_path / "s"
    r = run_module(sample_args(tiny_files, out, "--batch", "2"), env={"VAR_RT_TEST_CRASH_AFTER": "3"})
    assert r.returncode == 17, r.stderr
    done = sorted(os.listdir(out))
    assert len([f for f in done if f.endswith(".png") and not f.startswith(".")]) == 3
    assert not os.path.exists(str(out) + ".npz")
    # a truncated PNG (as a crash of another writer might leave) is detected and redone
    first = out / "000000.png"
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    (out / ".tmp-junk.png").write_bytes(b"partial")
    kept = (out / "000001.png").stat().st_mtime_ns
    r = run_module(sample_args(tiny_files, out, "--batch", "2"))
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout
    assert (out / "000001.png").stat().st_mtime_ns == kept  # verified images are not rewritten
    assert read_all(out, 6) == read_all(ref, 6)
    assert np.array_equal(np.load(str(out) + ".npz")["arr_0"], np.load(str(ref) + ".npz")["arr_0"])
    assert not (out / ".tmp-junk.png").exists()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process(tmp_path, tiny_files):
    one = tmp_path / "one"
    assert cli.main(sample_args(tiny_files, one, "--batch", "4")) == 0
    two = tmp_path / "two"
    r = run_module(sample_args(tiny_files, two, "--batch", "2"),
                   launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())))
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_all(one, 6) == read_all(two, 6)
    assert np.array_equal(np.load(str(one) + ".npz")["arr_0"], np.load(str(two) + ".npz")["arr_0"])
