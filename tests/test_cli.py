"""`var-rt generate` / `info` end to end, through the same code a user runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from var_rt import cli


def run_cli(*args):
    return cli.main([str(a) for a in args])


def test_generate_grid_and_per_image_from_official_files(tmp_path, tiny_files, capsys):
    out, per = tmp_path / "grid.png", tmp_path / "each"
    rc = run_cli("generate", "--var", tiny_files["var"], "--vae", tiny_files["vae"], "--classes", 1, 2, 3,
                 "--cfg", 4, "--top-k", 20, "--top-p", 0.95, "--seed", 0, "--out", out, "--per-image", per, "--device", "cpu")
    assert rc == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[2] == 3
    files = sorted(os.listdir(per))
    assert files == ["000_class1.png", "001_class2.png", "002_class3.png"]
    assert np.asarray(Image.open(per / files[0])).shape == (16, 16, 3)
    assert "3 images" in capsys.readouterr().out
    # same seed -> same bytes
    out2 = tmp_path / "grid2.png"
    run_cli("generate", "--var", tiny_files["var"], "--vae", tiny_files["vae"], "--classes", 1, 2, 3,
            "--cfg", 4, "--top-k", 20, "--top-p", 0.95, "--seed", 0, "--out", out2, "--device", "cpu")
    assert np.array_equal(np.asarray(Image.open(out2)), grid)


def test_code_from_files_verbose_reports_kv_memory(tmp_path, tiny_files, capsys):
    rc = run_cli("generate", "--drafter", tiny_files["var"], "--refiner", tiny_files["var"], "--vae", tiny_files["vae"],
                 "--draft-steps", 2, "--classes", 5, "--out", tmp_path / "g.png", "--verbose", "--device", "cpu")
    assert rc == 0
    out = capsys.readouterr().out
    assert "kv_bytes_drafter" in out and "kv_bytes_refiner" in out


@pytest.mark.parametrize("args,msg", [
    (["--classes", "10"], "outside [0, 10)"),
    (["--classes", "1", "--top-p", "0"], "top_p"),
    (["--classes", "1", "--cfg", "-1"], "cfg"),
])
def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, tiny_files, capsys, args, msg):
    out = tmp_path / "g.png"
    rc = run_cli("generate", "--var", tiny_files["var"], "--vae", tiny_files["vae"], "--out", out, "--device", "cpu", *args)
    assert rc == 2 and msg in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_and_wrong_family(tmp_path, tiny_files, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = run_cli("generate", "--var", tiny_files["var"], "--vae", tiny_files["vae"], "--classes", 1,
                 "--out", blocker / "sub" / "g.png", "--device", "cpu")
    assert rc == 2 and "cannot write" in capsys.readouterr().err
    rc = run_cli("generate", "--var", tiny_files["vae"], "--vae", tiny_files["vae"], "--classes", 1,
                 "--out", tmp_path / "g.png", "--device", "cpu")
    assert rc == 2 and "expected a VAR transformer" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_random_weights_says_so(tmp_path, capsys):
    rc = run_cli("generate", "--random-weights", "small", "--classes", 207, "--out", tmp_path / "g.png", "--device", "cpu",
                 "--top-k", 50)
    assert rc == 0 and "RANDOM WEIGHTS" in capsys.readouterr().out
    assert Image.open(tmp_path / "g.png").size[0] >= 256


def test_info_runs_as_a_console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "var-rt")
    cmd = [exe, "info"] if os.path.exists(exe) else [sys.executable, "-m", "var_rt.cli", "info"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "rvq_step" in out and "var_attention" in out


def test_generate_llamagen_zipar_from_official_files(tmp_path, capsys):
    from var_rt.checkpoint import save_state_dict
    from test_llamagen import official_freqs_cis, official_vq_file_dict, tiny_pipe
    pipe = tiny_pipe(seed=1)
    sd = dict(pipe.gpt.state_dict())
    sd["freqs_cis"] = official_freqs_cis(pipe.cfg.grid, pipe.cfg.head_dim)
    save_state_dict(sd, tmp_path / "c2i_T.pt")
    save_state_dict(official_vq_file_dict(pipe.vq), tmp_path / "vq_ds16_c2i.pt", wrap="model")
    out = tmp_path / "g.png"
    rc = run_cli("generate", "--llamagen", tmp_path / "c2i_T.pt", "--vq", tmp_path / "vq_ds16_c2i.pt", "--classes", 1, 2,
                 "--zipar-window", 2, "--top-k", 30, "--out", out, "--verbose", "--device", "cpu")
    assert rc == 0
    assert "\"forward_passes\": 20" in capsys.readouterr().out  # 6x6 grid, w=2: 2*6 + (6-2)*2
    assert Image.open(out).size[0] > 0
