"""Official models by name (var_rt.hub), offline: a Hugging Face cache laid out as the Hub's
(HF_HUB_CACHE/models--ORG--NAME/snapshots/REV/FILE + refs/main) holds tiny random models saved in the official
formats under the official file names; names resolve through the real huggingface_hub code with HF_HUB_OFFLINE=1.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import official_vae_state_dict, official_var_state_dict, tiny_vae, tiny_var
from var_rt import checkpoint, cli, hub
from var_rt.llamagen_pipeline import LlamaGenPipeline
from var_rt.pipeline import VARPipeline

hf = pytest.importorskip("huggingface_hub")
import huggingface_hub.constants  # noqa: E402  (read by hf_hub_download at call time)
REV = "0123456789abcdef0123456789abcdef01234567"


def repo_dir(cache, repo):
    return os.path.join(cache, "models--" + repo.replace("/", "--"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{official file name: bytes} of tiny models in the official formats."""
    from test_llamagen import official_freqs_cis, official_vq_file_dict, tiny_pipe
    d = tmp_path_factory.mktemp("hub_src")
    var, var2, vae = tiny_var(seed=0), tiny_var(seed=1, depth=1), tiny_vae()
    out = {}
    for name, sd in (("var_d30.pth", official_var_state_dict(var)), ("var_d16.pth", official_var_state_dict(var2)),
                     ("drafter_3.pth", official_var_state_dict(var)), ("refiner_3.pth", official_var_state_dict(var2)),
                     (hub.VAE_FILE, official_vae_state_dict(vae))):
        torch.save(sd, d / name)
    lg = tiny_pipe(seed=1)
    gsd = dict(lg.gpt.state_dict())
    gsd["freqs_cis"] = official_freqs_cis(lg.cfg.grid, lg.cfg.head_dim)
    checkpoint.save_state_dict(gsd, d / "c2i_B_256.pt")
    checkpoint.save_state_dict(official_vq_file_dict(lg.vq), d / hub.VQ_FILE, wrap="model")
    return d


@pytest.fixture
def cache(tmp_path, files, monkeypatch):
    """An offline HF cache (HF_HOME / HF_HUB_CACHE in the environment and in huggingface_hub's constants, which it
    reads at import) holding every tiny file under the official repos and names; code-3 is a test name (the
    tiny models have 4 scales) pointing at the official CoDe file names drafter_3 / refiner_3."""
    home = tmp_path / "hf"
    hub_cache = str(home / "hub")
    for repo, names in ((hub.VAR_REPO, ["var_d30.pth", "var_d16.pth", hub.VAE_FILE]),
                        (hub.CODE_REPO, ["drafter_3.pth", "refiner_3.pth"]),
                        (hub.LLAMAGEN_REPO, ["c2i_B_256.pt", hub.VQ_FILE])):
        snap = os.path.join(repo_dir(hub_cache, repo), "snapshots", REV)
        os.makedirs(snap)
        for n in names:
            shutil.copy(files / n, os.path.join(snap, n))
        os.makedirs(os.path.join(repo_dir(hub_cache, repo), "refs"))
        with open(os.path.join(repo_dir(hub_cache, repo), "refs", "main"), "w") as f:
            f.write(REV)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    code3 = hub.MODELS["code-8"]
    monkeypatch.setitem(hub.MODELS, "code-3", hub.ModelEntry(
        "code-3", "var", {"drafter": hub.HubFile(hub.CODE_REPO, "drafter_3.pth"),
                          "refiner": hub.HubFile(hub.CODE_REPO, "refiner_3.pth"), "vae": code3.files["vae"]},
        256, draft_steps=3, preset=None))
    return hub_cache


def snap(cache, repo, name):
    return os.path.join(repo_dir(cache, repo), "snapshots", REV, name)


def test_names_table():
    assert hub.MODELS["var-d30"].files["var"].filename == "var_d30.pth"
    assert hub.MODELS["var-d36"].image_size == 512
    e = hub.MODELS["code-8"]
    assert (e.files["drafter"].repo, e.files["drafter"].filename, e.files["refiner"].filename) == \
        ("Zigeng/VAR_CoDe", "drafter_8.pth", "refiner_8.pth")
    assert (e.draft_steps, e.preset, e.files["vae"].repo) == (8, "code-eval", "FoundationVision/var")
    assert [hub.MODELS[f"code-free-{n}"].files["drafter"].filename for n in (1, 9)] == ["var_d30.pth"] * 2
    assert hub.MODELS["llamagen-xl-384"].files["gpt"].filename == "c2i_XL_384.pt"
    assert "llamagen-xl-256" not in hub.MODELS   # not among the files the LlamaGen README lists


def test_from_pretrained_offline(cache):
    pipe = VARPipeline.from_pretrained("var-d30", backend="torch")
    assert pipe.hub_model.name == "var-d30" and pipe.cfg.depth == 2
    img = pipe([1], top_k=10, seed=0)
    assert img.shape[0] == 1
    code = VARPipeline.from_pretrained("code-free-2", backend="torch")
    assert code.draft_steps == 2 and code.models["refiner"].cfg.depth == 1
    assert VARPipeline.from_pretrained("code-3", backend="torch").draft_steps == 3
    lg = LlamaGenPipeline.from_pretrained("llamagen-b-256", backend="torch")
    assert lg.hub_model.files["vq"].filename == hub.VQ_FILE
    paths = hub.resolve("var-d30")
    assert paths["var"] == snap(cache, hub.VAR_REPO, "var_d30.pth")


def test_wrong_family_and_unknown_name(cache):
    with pytest.raises(ValueError, match=r"llamagen-b-256 is a LlamaGen model.*LlamaGenPipeline.*var-d16"):
        VARPipeline.from_pretrained("llamagen-b-256")
    with pytest.raises(ValueError, match=r"VARPipeline.*llamagen-3b-384"):
        LlamaGenPipeline.from_pretrained("var-d30")
    with pytest.raises(ValueError, match=r"unknown model 'var-d99'; known names: var-d16, var-d20.*code-free-9") as ei:
        VARPipeline.from_pretrained("var-d99")
    assert "llamagen" not in str(ei.value)  # the names of the class's family
    with pytest.raises(ValueError, match=r"unknown model 'xl'; known names: llamagen-b-256.*llamagen-3b-384"):
        LlamaGenPipeline.from_pretrained("xl")
    with pytest.raises(ValueError, match="draft_steps=2 is for the CoDe names"):
        VARPipeline.from_pretrained("var-d30", draft_steps=2)


def test_missing_file_offline_is_one_line(cache):
    os.remove(snap(cache, hub.VAR_REPO, "var_d16.pth"))
    with pytest.raises(FileNotFoundError) as ei:
        VARPipeline.from_pretrained("var-d16")
    msg = str(ei.value)
    assert "\n" not in msg
    for part in ("var_d16.pth", "FoundationVision/var", "HF_HUB_OFFLINE=1", "`var-rt download var-d16`"):
        assert part in msg


def test_truncated_cached_file_is_the_strict_loaders_message(cache):
    p = snap(cache, hub.VAR_REPO, "var_d30.pth")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"var_d30\.pth.*(truncated|unreadable|damaged).*"
                                                          r"var-rt download var-d30 --force"):
        VARPipeline.from_pretrained("var-d30")


def run_cli(*args):
    return cli.main([str(a) for a in args])


def test_cli_generate_model(cache, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert run_cli("generate", "--model", "code-3", "--classes", 1, 2, "--top-k", 10, "--out", out,
                   "--device", "cpu", "--backend", "torch") == 0
    assert Image.open(out).size[0] > 0
    out2 = tmp_path / "l.png"
    assert run_cli("generate", "--model", "llamagen-b-256", "--classes", 1, "--top-k", 10, "--out", out2,
                   "--device", "cpu", "--backend", "torch") == 0
    assert Image.open(out2).size[0] > 0


@pytest.mark.parametrize("args,msg", [
    (["--model", "nope"], "--model nope: unknown model 'nope'; known names: var-d16"),
    (["--model", "var-d30", "--var", "x.pth"], "give one model, not --model and --var"),
    (["--model", "var-d30", "--vae", "x.pth"], "--vae: --model var-d30 names all its files"),
    (["--model", "var-d30", "--draft-steps", "2"], "--draft-steps is for the CoDe names"),
    (["--var", "x.pth", "--vae", "y.pth", "--revision", "v1"], "--revision is for --model"),
    (["--model", "code-8"], "drafter_8.pth of Zigeng/VAR_CoDe is not in the Hugging Face cache"),
])
def test_cli_model_errors(cache, tmp_path, capsys, args, msg):
    out = tmp_path / "g.png"
    assert run_cli("generate", *args, "--classes", 1, "--out", out, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("var-rt: error: ") and msg in err[0], err
    assert not out.exists()


def test_cli_truncated_file_and_download_force(cache, tmp_path, capsys, monkeypatch, files):
    p = snap(cache, hub.VAR_REPO, "var_d30.pth")
    good = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(good[:1000])
    assert run_cli("generate", "--model", "var-d30", "--classes", 1, "--out", tmp_path / "g.png", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "var_d30.pth" in err[0] and "var-rt download var-d30 --force" in err[0], err
    calls = []

    def fake_download(repo_id, filename, force_download=False, local_dir=None, **kw):  # the Hub: a local folder
        calls.append((repo_id, filename, force_download))
        dst = snap(cache, repo_id, filename)
        if force_download or not os.path.exists(dst):
            shutil.copy(files / filename, dst)
        return dst
    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    assert run_cli("download", "var-d30", "--force") == 2   # offline: --force cannot refetch
    assert "cannot download again (force) while downloads are off" in capsys.readouterr().err
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", False)  # the fake hub is online
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert run_cli("download", "var-d30", "--force") == 0
    assert calls == [(hub.VAR_REPO, "var_d30.pth", True), (hub.VAR_REPO, hub.VAE_FILE, True)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"var-d30\tvar\t{p}", f"var-d30\tvae\t{snap(cache, hub.VAR_REPO, hub.VAE_FILE)}"]
    assert open(p, "rb").read() == good
    assert run_cli("generate", "--model", "var-d30", "--classes", 1, "--top-k", 10, "--out", tmp_path / "g.png",
                   "--device", "cpu", "--backend", "torch") == 0


def test_cli_download_and_models_errors(cache, capsys):
    assert run_cli("download", "var-d30", "bogus") == 2
    assert "unknown model 'bogus'" in capsys.readouterr().err
    os.remove(snap(cache, hub.CODE_REPO, "drafter_3.pth"))
    assert run_cli("download", "code-3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drafter_3.pth of Zigeng/VAR_CoDe" in err[0] and "var-rt download code-3" in err[0]
    assert run_cli("models") == 0
    out = capsys.readouterr().out
    for part in ("var-d36", "512px", "FoundationVision/LlamaGen/c2i_XXL_384.pt", "Zigeng/VAR_CoDe/drafter_8.pth",
                 "FID 1.98", "FID 3.55"):
        assert part in out


def test_console_script_offline_exit_code(tmp_path):
    """The real console script, offline with an empty cache: exit 2 and one line naming file, repo, command."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    env.pop("HF_HUB_CACHE", None)
    exe = os.path.join(os.path.dirname(sys.executable), "var-rt")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "var_rt.cli"]
    r = subprocess.run(cmd + ["generate", "--model", "var-d16", "--classes", "1", "--device", "cpu", "--out",
                              str(tmp_path / "x.png")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "var_d16.pth of FoundationVision/var" in lines[0] and \
        "`var-rt download var-d16`" in lines[0], r.stderr
