"""What the commands write: every file through one atomic writer (var_rt.images.atomic_path) that honours the umask
and leaves nothing behind on a failure (the writers themselves: test_images_files.py); and progress on stderr,
silenced by --quiet on every command that draws."""
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from var_rt import cli, images

from test_sample import sample_args


@pytest.fixture
def umask():
    """Set the process umask for a test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.startswith(images.TMP_PREFIX))


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o077, 0o600)])
def test_sample_outputs_honour_the_umask(tmp_path, tiny_files, umask, mask, want):
    umask(mask)
    out = tmp_path / "s"
    assert cli.main(sample_args(tiny_files, out, "--batch", "4", "--quiet")) == 0
    files = [out / f"{i:06d}.png" for i in range(6)] + [out / "manifest.json", tmp_path / "s.npz"]
    assert {str(p): oct(mode(p)) for p in files} == {str(p): oct(want) for p in files}


def test_png_and_npz_writers_clean_up_when_the_encoder_fails(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **kw):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        images.write_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    with pytest.raises(ValueError):  # an object array cannot be written without pickle: fails inside the zip entry
        images.write_npz(tmp_path / "a.npz", arr_0=np.zeros(3), arr_1=np.array([object()]))
    assert os.listdir(tmp_path) == []


def test_npz_is_byte_reproducible_and_loads(tmp_path):
    arr = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    images.write_npz(tmp_path / "a.npz", arr_0=arr)
    images.write_npz(tmp_path / "b.npz", arr_0=arr)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], arr)


def test_sample_removes_stale_temporary_files(tmp_path, tiny_files):
    out = tmp_path / "s"
    out.mkdir()
    stale = [out / ".tmp-000001.png-1234abcd.png", tmp_path / ".tmp-s.npz-1234abcd.npz"]
    for p in stale:
        p.write_bytes(b"partial")
    (tmp_path / "keep.txt").write_text("not ours")
    assert cli.main(sample_args(tiny_files, out, "--batch", "6", "--quiet")) == 0
    assert not any(p.exists() for p in stale) and (tmp_path / "keep.txt").exists()


# ---- progress and --quiet ---------------------------------------------------------------------------------------
def generate_args(files, out, *extra):
    return ["generate", "--var", str(files["var"]), "--vae", str(files["vae"]), "--classes", "1", "2", "--top-k",
            "20", "--device", "cpu", "--out", str(out), *extra]


def test_generate_progress_and_quiet(tmp_path, tiny_files, capsys):
    assert cli.main(generate_args(tiny_files, tmp_path / "g.png")) == 0
    err = capsys.readouterr().err
    assert "scale" in err and "decode" in err  # the scales of the generation, then the decoding
    assert cli.main(generate_args(tiny_files, tmp_path / "q.png", "--quiet")) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "q.png" in cap.out
    assert mode(tmp_path / "q.png") == 0o666 & ~_current_umask()


def test_sample_progress_and_quiet(tmp_path, tiny_files, capsys):
    assert cli.main(sample_args(tiny_files, tmp_path / "a", "--batch", "2")) == 0
    err = capsys.readouterr().err
    assert "sample" in err and "img/s" in err  # the bar: images, rate and ETA
    assert cli.main(sample_args(tiny_files, tmp_path / "b", "--batch", "2", "--quiet")) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "wrote" in cap.out


def test_demo_commands_take_quiet(tmp_path, capsys):
    assert cli.main(["demo", "--methods", "var", "--classes", "0", "--samples", "1", "--out",
                     str(tmp_path / "d.png"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["eval-demo", "--methods", "var", "--samples-per-class", "1", "--batch", "5", "--json",
                     str(tmp_path / "e.json"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "e.json").read_text()) and leftovers(tmp_path) == []
    assert mode(tmp_path / "d.png") == mode(tmp_path / "e.json") == 0o666 & ~_current_umask()


def _current_umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m
