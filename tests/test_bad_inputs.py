"""Bad inputs, table-driven: every command (generate, info, sample, fid, demo, eval-demo) and the Python API
(both pipelines' from_checkpoints / random / __call__).

CLI: exit code 2, exactly one line on stderr, `var-rt: error: ...` with the key words, no traceback, nothing on
stdout and nothing written in the output location. API: the exception type with the key words. Every check must
come before the work: a guard (fixture `guard`) makes loading a checkpoint, building a random model, drawing,
loading the demo models and loading the Inception network fail the test if they run. A few subprocess runs check
the exit codes of the real console script and Ctrl-C (one line, exit 130, no partial file).
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import official_vae_state_dict, official_var_state_dict, tiny_vae, tiny_var
from var_rt import checkpoint, cli
from var_rt.checkpoint import CheckpointError, save_state_dict
from var_rt.llamagen_pipeline import LlamaGenPipeline
from var_rt.pipeline import VARPipeline
from var_rt.pipeline_base import PipelineBase

EXE = os.path.join(os.path.dirname(sys.executable), "var-rt")
CMD = [EXE] if os.path.exists(EXE) else [sys.executable, "-m", "var_rt.cli"]


def fill(argv, **paths):
    """Replace {name} in every argument by paths[name] (names hold dots: {var.pth})."""
    return [re.sub(r"\{([^{}]+)\}", lambda m: str(paths[m.group(1)]), a) for a in argv]


class NotAWeight:  # pickled by reference: torch.load(weights_only=True) refuses it
    pass


# ---- files, written once, in the official formats ---------------------------------------------------------------
@pytest.fixture(scope="module")
def f(tmp_path_factory):
    from test_llamagen import official_freqs_cis, official_vq_file_dict, tiny_pipe
    d = tmp_path_factory.mktemp("bad_inputs")
    p = {k: str(d / k) for k in ("var.pth", "vae.pth", "gpt.pt", "vq.pt", "var.safetensors", "trunc.safetensors",
                                 "trunc.pth", "text.pth", "empty.pth", "obj.pth", "unknown.pth", "broken.pth",
                                 "var64.pth", "var3.pth", "samples.npz", "notnpz.npz", "blocker", "dir")}
    var, vae = tiny_var(), tiny_vae()
    var_sd = official_var_state_dict(var)
    torch.save(var_sd, p["var.pth"])
    torch.save(official_vae_state_dict(vae), p["vae.pth"])
    save_state_dict(var_sd, p["var.safetensors"])
    lg = tiny_pipe(seed=1)
    gsd = dict(lg.gpt.state_dict())
    gsd["freqs_cis"] = official_freqs_cis(lg.cfg.grid, lg.cfg.head_dim)
    save_state_dict(gsd, p["gpt.pt"])
    save_state_dict(official_vq_file_dict(lg.vq), p["vq.pt"], wrap="model")
    for src, dst in (("var.safetensors", "trunc.safetensors"), ("var.pth", "trunc.pth")):
        data = open(p[src], "rb").read()
        open(p[dst], "wb").write(data[: len(data) // 2])
    open(p["text.pth"], "w").write("hello, not a checkpoint\n")
    open(p["empty.pth"], "wb").close()
    torch.save({"model": var_sd, "extra": NotAWeight()}, p["obj.pth"])
    torch.save({"foo.weight": torch.zeros(2)}, p["unknown.pth"])
    broken = dict(var_sd)
    del broken["head.bias"]
    torch.save(broken, p["broken.pth"])
    torch.save(official_var_state_dict(tiny_var(vocab=64)), p["var64.pth"])           # VQVAE has 48 tokens
    torch.save(official_var_state_dict(tiny_var(patch_nums=(1, 2, 4))), p["var3.pth"])  # 3 scales, not 4
    np.savez(p["samples.npz"], arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    open(p["notnpz.npz"], "w").write("not a zip")
    open(p["blocker"], "w").write("a file where a folder is expected")
    os.makedirs(p["dir"])
    wd = d / "weights"  # a demo weights folder whose vae.safetensors is a VAR transformer
    wd.mkdir()
    save_state_dict(var_sd, wd / "vae.safetensors")
    save_state_dict(var_sd, wd / "var_drafter.safetensors")
    p["weights"] = str(wd)
    return p


@pytest.fixture(scope="module")
def pipes(f):
    """Loaded pipelines for the __call__ cases (built before the guard)."""
    from test_llamagen import tiny_pipe
    return {"var": VARPipeline.from_checkpoints(var=f["var.pth"], vae=f["vae.pth"], dtype="fp32"),
            "llamagen": tiny_pipe(seed=1)}


@pytest.fixture
def guard(monkeypatch):
    """Loading, building, drawing: any of them running fails the test (the check came too late)."""
    from var_rt import fid
    from var_rt.demo import run as demo_run
    from var_rt.models import llamagen as gpt_model
    from var_rt.models import var as var_model
    from var_rt.models import vqvae as vqvae_model

    def boom(what):
        def fail(*args, **kw):
            raise AssertionError(f"{what} ran before the bad input was reported")
        return fail
    monkeypatch.setattr(checkpoint, "assign_state_dict", boom("loading a checkpoint"))
    monkeypatch.setattr(var_model, "init_random_", boom("building a random VAR"))
    monkeypatch.setattr(vqvae_model, "init_random_", boom("building a random VQVAE"))
    monkeypatch.setattr(gpt_model, "build_meta", boom("building a random LlamaGen"))
    monkeypatch.setattr(PipelineBase, "_generate", boom("drawing"))
    monkeypatch.setattr(demo_run, "methods", boom("loading the demo models"))
    monkeypatch.setattr(fid, "load_inception", boom("loading Inception"))


# ---- the command line -------------------------------------------------------------------------------------------
V = ["--var", "{var.pth}", "--vae", "{vae.pth}"]
L = ["--llamagen", "{gpt.pt}", "--vq", "{vq.pt}"]
G = ["generate", "--device", "cpu", "--out", "{out}/g.png"]
S = ["sample", "--device", "cpu", "--out", "{out}/s"]
DEMO = ["demo", "--out", "{out}/demo.png"]
EVAL = ["eval-demo", "--json", "{out}/rows.json"]

CLI_CASES = [  # (id, argv, words the one line must contain)
    # checkpoint files: identified by their keys, unreadable ones in one complete line naming the argument
    ("truncated-safetensors", G + ["--var", "{trunc.safetensors}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "trunc.safetensors", "truncated"]),
    ("vq-is-a-var-vqvae", G + ["--llamagen", "{gpt.pt}", "--vq", "{vae.pth}", "--classes", "1"],
     ["--vq:", "is a VAR VQVAE checkpoint", "expected a LlamaGen VQ-16 checkpoint (vq_ds16_c2i.pt)"]),
    ("text-file-as-pth", G + ["--var", "{text.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "text.pth", "not a checkpoint file"]),
    ("truncated-pth", G + ["--var", "{var.pth}", "--vae", "{trunc.pth}", "--classes", "1"],
     ["--vae:", "trunc.pth", "truncated or corrupt"]),
    ("var-is-a-vqvae", G + ["--var", "{vae.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "is a VAR VQVAE checkpoint", "expected a VAR transformer"]),
    ("vae-is-a-var", G + ["--var", "{var.pth}", "--vae", "{var.pth}", "--classes", "1"],
     ["--vae:", "is a VAR transformer checkpoint", "expected a VAR VQVAE"]),
    ("llamagen-is-a-var", G + ["--llamagen", "{var.pth}", "--vq", "{vq.pt}", "--classes", "1"],
     ["--llamagen:", "is a VAR transformer", "expected a LlamaGen GPT"]),
    ("drafter-is-a-gpt", G + ["--drafter", "{gpt.pt}", "--refiner", "{var.pth}", "--vae", "{vae.pth}",
                              "--draft-steps", "2", "--classes", "1"], ["--drafter:", "is a LlamaGen GPT"]),
    ("refiner-is-a-vq16", G + ["--drafter", "{var.pth}", "--refiner", "{vq.pt}", "--vae", "{vae.pth}",
                               "--draft-steps", "2", "--classes", "1"], ["--refiner:", "is a LlamaGen VQ-16"]),
    ("missing-file", G + ["--var", "{out}/nope.pth", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "nope.pth", "no such file"]),
    ("empty-file", G + ["--var", "{empty.pth}", "--vae", "{vae.pth}", "--classes", "1"], ["--var:", "empty"]),
    ("pickled-object", G + ["--var", "{obj.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "Python objects", "VAR_RT_TRUST_PICKLE=1"]),
    ("unknown-tensors", G + ["--var", "{unknown.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "none of the checkpoints", "foo.weight"]),
    ("folder-as-checkpoint", G + ["--var", "{dir}", "--vae", "{vae.pth}", "--classes", "1"], ["--var:", "folder"]),
    ("missing-key", G + ["--var", "{broken.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--var:", "missing keys (1)", "head.bias"]),
    ("vocab-mismatch", G + ["--var", "{var64.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["64 tokens", "does not match the VQVAE"]),
    ("scale-mismatch", G + ["--drafter", "{var.pth}", "--refiner", "{var3.pth}", "--vae", "{vae.pth}",
                            "--draft-steps", "2", "--classes", "1"], ["disagree on patch_nums"]),
    # options of the other family, one model source, what each source needs
    ("zipar-window-on-var", G + V + ["--classes", "1", "--zipar-window", "2"], ["--zipar-window", "LlamaGen", "VAR"]),
    ("preset-on-llamagen", G + L + ["--classes", "1", "--preset", "code-eval"], ["--preset", "VAR models"]),
    ("vae-on-llamagen", G + L + ["--classes", "1", "--vae", "{vae.pth}"], ["--vae", "VAR models"]),
    ("draft-steps-on-var", G + V + ["--classes", "1", "--draft-steps", "2"], ["--draft-steps", "CoDe"]),
    ("two-models", G + V + ["--llamagen", "{gpt.pt}", "--classes", "1"], ["give one model", "--var", "--llamagen"]),
    ("refiner-with-var", G + V + ["--refiner", "{var.pth}", "--classes", "1"], ["--refiner", "CoDe"]),
    ("no-model", G + ["--classes", "1"], ["no model"]),
    ("var-without-vae", G + ["--var", "{var.pth}", "--classes", "1"], ["--var needs --vae"]),
    ("llamagen-without-vq", G + ["--llamagen", "{gpt.pt}", "--classes", "1"], ["--llamagen needs --vq"]),
    ("drafter-without-steps", G + ["--drafter", "{var.pth}", "--vae", "{vae.pth}", "--classes", "1"],
     ["--drafter needs --draft-steps"]),
    ("draft-steps-too-many", G + ["--drafter", "{var.pth}", "--refiner", "{var.pth}", "--vae", "{vae.pth}",
                                  "--draft-steps", "9", "--classes", "1"], ["--draft-steps 9", "1..4"]),
    ("code-without-refiner", G + ["--drafter", "{var.pth}", "--vae", "{vae.pth}", "--draft-steps", "2",
                                  "--classes", "1"], ["needs --refiner"]),
    # sampling settings (one rule set: SamplingSettings), presets against the scale count, class ids
    ("preset-vs-scales", G + V + ["--classes", "1", "--preset", "code-eval"],
     ["preset 'code-eval'", "10 per-scale temperature", "10-scale model", "this model has 4 scales"]),
    ("top-p-zero", G + V + ["--classes", "1", "--top-p", "0"], ["top_p=0.0", "(0, 1]"]),
    ("cfg-negative", G + L + ["--classes", "1", "--cfg", "-1"], ["cfg=-1.0", ">= 0"]),
    ("temperature-list-length", G + V + ["--classes", "1", "--temperature", "1,1"], ["temperature", "4 values"]),
    ("per-scale-list-on-llamagen", G + L + ["--classes", "1", "--top-k", "5,6"], ["per-scale lists are for VAR"]),
    ("class-too-large", G + V + ["--classes", "1", "10"], ["class ids [10]", "[0, 10)"]),
    ("class-negative", G + L + ["--classes", "-1"], ["class ids [-1]"]),
    ("zipar-window-too-wide", G + L + ["--classes", "1", "--zipar-window", "7"], ["--zipar-window 7", "1..6"]),
    ("nrow-zero", G + V + ["--classes", "1", "--nrow", "0"], ["--nrow 0"]),
    # random-weight specs, device, image size
    ("random-spec-unknown", G + ["--random-weights", "foo", "--classes", "1"], ["--random-weights foo", "expected"]),
    ("random-code-without-steps", G + ["--random-weights", "d16,d8", "--classes", "1"], ["--draft-steps"]),
    ("random-llamagen-size", G + ["--random-weights", "llamagen-Q", "--classes", "1"], ["unknown LlamaGen size"]),
    ("random-with-file", G + ["--random-weights", "d16", "--vae", "{vae.pth}", "--classes", "1"],
     ["--vae", "takes no checkpoint files"]),
    ("random-class-too-large", G + ["--random-weights", "small", "--classes", "1000"], ["class ids [1000]"]),
    ("bad-device", G + V + ["--classes", "1", "--device", "gpu0"], ["--device gpu0", "cpu, cuda"]),
    ("image-size", G + L + ["--classes", "1", "--image-size", "100"], ["--image-size 100", "multiple of 16"]),
    # output paths: checked before the work, naming the user's path
    ("out-under-a-file", ["generate", "--device", "cpu", *V, "--classes", "1", "--out", "{blocker}/sub/g.png"],
     ["--out", "cannot write", "is a file"]),
    ("out-is-a-folder", ["generate", "--device", "cpu", *V, "--classes", "1", "--out", "{dir}"],
     ["--out", "is a folder"]),
    ("per-image-under-a-file", G + V + ["--classes", "1", "--per-image", "{blocker}/each"],
     ["--per-image", "cannot write"]),
    # argparse's own errors, the same one line
    ("argparse-bad-int", G + V + ["--classes", "x"], ["argument --classes", "invalid int value"]),
    ("argparse-missing", G + V, ["required", "--classes"]),
    ("argparse-unknown-option", G + V + ["--classes", "1", "--bogus"], ["unrecognized arguments", "--bogus"]),
    ("argparse-no-command", [], ["required", "COMMAND"]),
    # sample
    ("sample-batch-zero", S + V + ["--batch", "0"], ["--batch 0", ">= 1"]),
    ("sample-per-class-zero", S + V + ["--per-class", "0"], ["--per-class 0"]),
    ("sample-num-too-many", S + V + ["--per-class", "2", "--num", "21"], ["--num 21", "more than the 20 images"]),
    ("sample-out-is-a-file", ["sample", "--device", "cpu", *V, "--out", "{blocker}"], ["--out", "not a folder"]),
    ("sample-zipar-on-random-var", S + ["--random-weights", "small", "--zipar-window", "2"], ["--zipar-window"]),
    ("sample-wrong-file", S + ["--var", "{vq.pt}", "--vae", "{vae.pth}"], ["--var:", "LlamaGen VQ-16"]),
    # info
    ("info-bad-device", ["info", "--device", "gpu"], ["--device gpu"]),
    ("info-bad-backend", ["info", "--backend", "cuda9"], ["argument --backend", "invalid choice"]),
    # fid
    ("fid-missing-samples", ["fid", "{out}/none.npz", "--ref", "{samples.npz}"], ["none.npz"]),
    ("fid-not-an-npz", ["fid", "{notnpz.npz}", "--ref", "{samples.npz}"], ["notnpz.npz", "npz"]),
    ("fid-batch-zero", ["fid", "{samples.npz}", "--ref", "{samples.npz}", "--batch", "0"], ["--batch"]),
    ("fid-json-under-a-file", ["fid", "{samples.npz}", "--ref", "{samples.npz}", "--json", "{blocker}/r.json"],
     ["--json", "cannot write"]),
    # demo / eval-demo
    ("demo-samples-zero", DEMO + ["--samples", "0"], ["--samples 0"]),
    ("demo-class", DEMO + ["--classes", "3", "12"], ["class ids [12]", "[0, 10)"]),
    ("demo-scale", DEMO + ["--scale", "0"], ["--scale 0"]),
    ("demo-threads", DEMO + ["--threads", "0"], ["--threads 0"]),
    ("demo-out-under-a-file", ["demo", "--out", "{blocker}/d.png"], ["--out", "cannot write"]),
    ("demo-weights-missing", DEMO + ["--weights", "{out}/w"], ["--weights", "no such folder"]),
    ("demo-weights-wrong-file", DEMO + ["--weights", "{weights}"],
     ["--weights:", "vae.safetensors", "expected a VAR VQVAE"]),
    ("eval-json-under-a-file", ["eval-demo", "--json", "{blocker}/rows.json"], ["--json", "cannot write"]),
    ("eval-batch-zero", EVAL + ["--batch", "0"], ["--batch 0"]),
    ("eval-samples-zero", EVAL + ["--samples-per-class", "0"], ["--samples-per-class 0"]),
    ("eval-weights-with-llamagen", EVAL + ["--methods", "llamagen", "--weights", "{weights}"],
     ["--weights", "llamagen"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(f, guard, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    blocker_before = open(f["blocker"]).read()
    rc = cli.main(fill(argv, out=out, **f))
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert rc == 2, cap
    assert len(lines) == 1 and lines[0].startswith("var-rt: error: "), cap.err
    assert "Traceback" not in cap.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert cap.out == ""                      # nothing happened before the error
    assert not out.exists()                   # nothing written
    assert open(f["blocker"]).read() == blocker_before and os.listdir(f["dir"]) == []


def test_unwritable_folder(f, guard, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    for argv in (["generate", "--device", "cpu", *V, "--classes", "1", "--out", str(ro / "g.png")],
                 ["demo", "--out", str(ro / "d.png")], ["eval-demo", "--json", str(ro / "x.json")]):
        assert cli.main(fill(argv, **f)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write in" in err and "permission denied" in err
    assert os.listdir(ro) == []


def test_demo_llamagen_weights_missing(guard, tmp_path, capsys, monkeypatch):
    from var_rt.demo import models
    monkeypatch.setattr(models, "GPT_FILE", "absent_llamagen_gpt.safetensors")
    assert cli.main(["demo", "--methods", "llamagen", "--out", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("var-rt: error: --methods llamagen:") and "missing" in err
    assert os.listdir(tmp_path) == []


# ---- the Python API ---------------------------------------------------------------------------------------------
API_CASES = [  # (id, call(files, pipes), exception type, words)
    ("var-with-refiner", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], refiner=f["var.pth"],
                                                                   vae=f["vae.pth"]), ValueError, ["not var= with refiner="]),
    ("var-with-drafter", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], drafter=f["var.pth"],
                                                                   vae=f["vae.pth"]), ValueError, ["drafter="]),
    ("no-vae", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"]), ValueError, ["vae="]),
    ("drafter-without-steps", lambda f, p: VARPipeline.from_checkpoints(drafter=f["var.pth"], refiner=f["var.pth"],
                                                                        vae=f["vae.pth"]), ValueError, ["draft_steps"]),
    ("draft-steps-with-var", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], vae=f["vae.pth"],
                                                                       draft_steps=2), ValueError, ["draft_steps=2", "CoDe"]),
    ("vae-is-a-vq16", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], vae=f["vq.pt"]), CheckpointError,
     ["vae:", "is a LlamaGen VQ-16 checkpoint", "expected a VAR VQVAE"]),
    ("var-truncated", lambda f, p: VARPipeline.from_checkpoints(var=f["trunc.safetensors"], vae=f["vae.pth"]),
     CheckpointError, ["var:", "truncated"]),
    ("var-text", lambda f, p: VARPipeline.from_checkpoints(var=f["text.pth"], vae=f["vae.pth"]), CheckpointError,
     ["not a checkpoint file"]),
    ("var-missing", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"] + ".nope", vae=f["vae.pth"]),
     FileNotFoundError, ["no such file"]),
    ("draft-steps-too-many", lambda f, p: VARPipeline.from_checkpoints(drafter=f["var.pth"], refiner=f["var.pth"],
                                                                       vae=f["vae.pth"], draft_steps=7),
     ValueError, ["draft_steps=7", "1..4"]),
    ("code-without-refiner", lambda f, p: VARPipeline.from_checkpoints(drafter=f["var.pth"], vae=f["vae.pth"],
                                                                       draft_steps=2), ValueError, ["needs a refiner"]),
    ("vocab-mismatch", lambda f, p: VARPipeline.from_checkpoints(var=f["var64.pth"], vae=f["vae.pth"]), ValueError,
     ["does not match the VQVAE"]),
    ("bad-dtype", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], vae=f["vae.pth"], dtype="fp8"),
     ValueError, ["dtype"]),
    ("bad-device", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], vae=f["vae.pth"], device="gpu"),
     ValueError, ["device='gpu'"]),
    ("bad-backend", lambda f, p: VARPipeline.from_checkpoints(var=f["var.pth"], vae=f["vae.pth"], backend="tpu"),
     ValueError, ["backend='tpu'"]),
    ("random-depth-zero", lambda f, p: VARPipeline.random(0), ValueError, ["depth=0"]),
    ("random-draft-steps", lambda f, p: VARPipeline.random(4, refiner_depth=2, draft_steps=11), ValueError,
     ["draft_steps=11", "1..10"]),
    ("llamagen-vq-is-a-vqvae", lambda f, p: LlamaGenPipeline.from_checkpoints(gpt=f["gpt.pt"], vq=f["vae.pth"]),
     CheckpointError, ["vq:", "is a VAR VQVAE checkpoint", "expected a LlamaGen VQ-16 checkpoint (vq_ds16_c2i.pt)"]),
    ("llamagen-gpt-is-a-var", lambda f, p: LlamaGenPipeline.from_checkpoints(gpt=f["var.pth"], vq=f["vq.pt"]),
     CheckpointError, ["gpt:", "is a VAR transformer checkpoint"]),
    ("llamagen-gpt-truncated", lambda f, p: LlamaGenPipeline.from_checkpoints(gpt=f["trunc.pth"], vq=f["vq.pt"]),
     CheckpointError, ["gpt:", "truncated"]),
    ("llamagen-image-size", lambda f, p: LlamaGenPipeline.from_checkpoints(gpt=f["gpt.pt"], vq=f["vq.pt"],
                                                                           image_size=100), ValueError, ["multiple of 16"]),
    ("llamagen-random-name", lambda f, p: LlamaGenPipeline.random("Q"), ValueError, ["'Q'"]),
    ("llamagen-random-size", lambda f, p: LlamaGenPipeline.random("B", image_size=0), ValueError, ["image_size=0"]),
    ("call-preset-vs-scales", lambda f, p: p["var"]([0], preset="code-eval"), ValueError,
     ["10 per-scale temperature", "10-scale model", "4 scales"]),
    ("call-class", lambda f, p: p["var"]([10]), ValueError, ["[10]", "[0, 10)"]),
    ("call-top-p", lambda f, p: p["var"]([1], top_p=0), ValueError, ["top_p=0"]),
    ("call-seeds-count", lambda f, p: p["var"]([1, 2], seeds=[1]), ValueError, ["1 seeds for 2 images"]),
    ("call-seed-type", lambda f, p: p["var"]([1], seed="x"), ValueError, ["seed='x'"]),
    ("call-empty", lambda f, p: p["var"]([]), ValueError, ["empty"]),
    ("call-float-class", lambda f, p: p["var"]([1.5]), ValueError, ["integers"]),
    ("call-temperature-list", lambda f, p: p["var"]([1], temperature=[1.0] * 3), ValueError, ["4 values"]),
    ("llamagen-call-window", lambda f, p: p["llamagen"]([1], zipar_window=0), ValueError, ["zipar_window 0"]),
    ("llamagen-call-list", lambda f, p: p["llamagen"]([1], top_k=[5, 6]), ValueError, ["per-scale lists"]),
    ("llamagen-call-cfg-interval", lambda f, p: p["llamagen"]([1], cfg_interval=-2), ValueError, ["cfg_interval"]),
    ("llamagen-call-class", lambda f, p: p["llamagen"]([-1]), ValueError, ["[-1]"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(f, pipes, guard, call, exc, words):
    with pytest.raises(exc) as e:
        call(f, pipes)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_table_size():
    assert len(CLI_CASES) + len(API_CASES) >= 40
    commands = {c[1][0] for c in CLI_CASES if c[1]}
    assert commands == {"generate", "info", "sample", "fid", "demo", "eval-demo"}


# ---- one warning, not a wall of text --------------------------------------------------------------------------
def test_fast_backend_on_a_cpu_warns_once(f, tmp_path, capsys, monkeypatch):
    from var_rt.ops import dispatch
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a machine without a GPU, outside the tests
    monkeypatch.setattr(dispatch, "_warned", set())
    out = tmp_path / "g.png"
    assert cli.main(["generate", *fill(V, **f), "--classes", "1", "2", "--backend", "cuda",
                     "--device", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings_ = [ln for ln in err.replace("\r", "\n").splitlines() if "warning" in ln.lower()]
    assert len(warnings_) == 1 and warnings_[0].startswith("var-rt: warning: "), err
    assert out.is_file()


# ---- the real console script: exit codes, Ctrl-C -------------------------------------------------------------------
def _env():
    # one OpenMP thread: on a loaded machine (CI beside other jobs) spinning OpenMP threads can slow a child
    # process by orders of magnitude, and these tests time it out
    return {**os.environ, "TQDM_DISABLE": "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("argv,words", [
    (["generate", "--classes", "x"], ["invalid int value"]),
    (["generate", "--var", "{text.pth}", "--vae", "{vae.pth}", "--classes", "1", "--out", "{out}/g.png"],
     ["not a checkpoint file"]),
], ids=["argparse", "checkpoint"])
def test_console_script_exit_code(f, tmp_path, argv, words):
    r = subprocess.run(CMD + fill(argv, out=tmp_path / "out", **f), capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("var-rt: error: ")
    assert all(w in r.stderr for w in words)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_sample(f, tmp_path):
    from var_rt.evaluation import is_complete
    out = tmp_path / "s"
    argv = CMD + ["sample", *fill(V, **f), "--device", "cpu", "--per-class", "1000", "--batch", "1",
                  "--out", str(out)]
    # the child gets Python's own SIGINT handling even where this test runs with SIGINT ignored (a job a
    # non-interactive shell started in the background: the ignore is inherited, and Python then keeps it)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, proc.kill)  # a hung process fails the test instead of blocking the suite
    watchdog.start()
    try:
        line = proc.stdout.readline()               # "var-rt sample: N images, ... to go": sampling starts
        assert "to go" in line, line
        deadline = time.time() + 60
        while len(os.listdir(out)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err == "var-rt: interrupted\n"
    names = os.listdir(out)
    assert names and all(n.endswith(".png") and not n.startswith(".tmp-") for n in names), names
    assert all(is_complete(str(out / n), 16) for n in names)
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
