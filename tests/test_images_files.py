"""Files var_rt writes: modes follow the umask, writes are atomic, nothing partial or temporary survives a failure."""
import os

import numpy as np
import pytest
import torch

from var_rt import images


def _with_umask(mask, fn):
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_writer_honours_the_umask(tmp_path, mask, mode):
    img = torch.rand(2, 3, 8, 8)
    paths = {
        "grid": lambda: images.save_grid(img, str(tmp_path / "g.png")),
        "png": lambda: images.write_png(images.to_uint8(img)[0], str(tmp_path / "a.png")),
        "json": lambda: images.write_json({"a": 1}, str(tmp_path / "m.json")),
        "npz": lambda: images.write_npz(str(tmp_path / "s.npz"), arr_0=np.zeros((1, 2, 2, 3), np.uint8)),
    }
    for name, write in paths.items():
        _with_umask(mask, write)
    for f in ("g.png", "a.png", "m.json", "s.npz"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == mode, f
    assert not [p for p in os.listdir(tmp_path) if p.startswith(images.TMP_PREFIX)]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "sub" / "x.json"
    images.write_json({"v": 1}, str(target))  # missing folders are created
    with pytest.raises(RuntimeError):
        with images.atomic_open(str(target), "w") as f:
            f.write('{"v": 2, "partial": ')
            raise RuntimeError("disk full")
    assert target.read_text().strip().startswith('{') and '"partial"' not in target.read_text()
    assert os.listdir(target.parent) == ["x.json"]


def test_interrupt_mid_write_removes_the_temp(tmp_path):
    target = tmp_path / "y.png"
    with pytest.raises(KeyboardInterrupt):
        with images.atomic_path(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"\x89PNG half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
