"""VARPipeline.stream (streaming previews): the last yield is pipe(...)'s bytes, each preview decodes the
residual-VQ sum of the scales drawn so far, the scales yielded, the checks, `var-rt generate --previews`, and the
chain of CUDA graphs (simulated on the CPU by a fake graph that replays the captured function; on a GPU for real).
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from var_rt import cli
from var_rt.images import make_grid
from var_rt.models.vqvae import VQVAEConfig
from var_rt.pipeline import Preview, VARPipeline, stream_segments
from var_rt.runtime import graphs

from conftest import tiny_var_cfg
from official_ref import phi_conv

LABELS3 = [1, 4, 7]
KW = dict(cfg=2.0, top_k=20, top_p=0.9)
SMALL_VAE = VQVAEConfig(vocab=48, cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1)  # 8 px: a cheap decoder


def tiny_pipe(code=False, backend="torch", device="cpu"):
    """K = 4 scales; CoDe with N = 3, so that every=2 ([0, 1], [2, 3]) puts a drafter and the refiner's prefill
    in one segment and every=1 splits exactly at the hand-over."""
    kw = dict(refiner_depth=tiny_var_cfg(depth=1), draft_steps=3) if code else {}
    return VARPipeline.random(tiny_var_cfg(), vae_cfg=SMALL_VAE, backend=backend, device=device, **kw)


def check_stream(pipe, labels, every, seed=3):
    ref = pipe(labels, seed=seed, **KW)
    ref_tokens = [t.clone() for t in pipe.last_tokens]
    got = list(pipe.stream(labels, seed=seed, every=every, **KW))
    K = len(pipe.cfg.patch_nums)
    assert [p.scale for p in got] == [min(s + every, K) - 1 for s in range(0, K, every)]
    assert all(isinstance(p, Preview) and p.images.shape == ref.shape and p.images.dtype == torch.float32
               for p in got)
    assert torch.equal(got[-1].images, ref)  # the same bytes
    assert all(torch.equal(a, b) for a, b in zip(pipe.last_tokens, ref_tokens))
    return got


@pytest.mark.parametrize("code", [False, True], ids=["var", "code"])
@pytest.mark.parametrize("labels", [[5], LABELS3], ids=["b1", "b3"])
@pytest.mark.parametrize("every", [1, 2])
def test_last_yield_is_the_call_torch(code, labels, every):
    check_stream(tiny_pipe(code), labels, every)


@pytest.mark.parametrize("code,labels,every", [(False, [5], 1), (True, LABELS3, 2)],
                         ids=["var-b1-every1", "code-b3-every2"])  # the Triton interpreter is slow: two of the eight
def test_last_yield_is_the_call_fast(code, labels, every, one_thread):
    check_stream(tiny_pipe(code, backend="fast"), labels, every)


def partial_fhat(vae, patch_nums, tokens, upto):
    """The official residual-VQ sum of scales 0..upto (VQVAE.embed_to_fhat with last_one=False), written out:
    h = codebook[tokens] upsampled bicubic to the full size (but at the last scale), f_hat += 0.5 h + 0.5 Phi(h)."""
    sd = vae.state_dict()
    emb, K, H = sd["quantize.embedding.weight"], len(patch_nums), patch_nums[-1]
    B, Cv = tokens[0].shape[0], emb.shape[1]
    f_hat = torch.zeros(B, Cv, H, H)
    for si in range(upto + 1):
        pn = patch_nums[si]
        h = emb[tokens[si]].transpose(1, 2).reshape(B, Cv, pn, pn)
        if si != K - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        w, b = phi_conv(sd, si, K)
        f_hat = f_hat + h * 0.5 + F.conv2d(h, w, b, padding=1) * 0.5
    return f_hat


@pytest.mark.parametrize("code", [False, True], ids=["var", "code"])
def test_each_preview_decodes_the_sum_so_far(code):
    pipe = tiny_pipe(code)
    got = list(pipe.stream(LABELS3, seed=1, every=1, **KW))
    pns = pipe.cfg.patch_nums
    for p in got:
        want = pipe.vae.fhat_to_img(partial_fhat(pipe.vae, pns, pipe.last_tokens, p.scale))
        assert torch.allclose(p.images, want, atol=1e-4), p.scale
    assert not torch.allclose(got[0].images, got[-1].images, atol=1e-3)  # previews do change


def test_segments():
    assert stream_segments(10, 1) == [range(i, i + 1) for i in range(10)]
    assert stream_segments(10, 3) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert stream_segments(10, 10) == [range(0, 10)]
    pipe = tiny_pipe()
    assert [p.scale for p in pipe.stream([2], every=3, **KW)] == [2, 3]
    assert [p.scale for p in pipe.stream([2], every=4, **KW)] == [3]


@pytest.mark.parametrize("args,kw,err,msg", [
    ([[1]], dict(every=0), ValueError, "every=0"),
    ([[1]], dict(every=5), ValueError, "every=5: expected 1..4"),
    ([[1]], dict(every=True), ValueError, "every=True"),
    ([[1]], dict(every=1.5), ValueError, "every=1.5"),
    ([[10]], {}, ValueError, "outside"),
    ([[]], {}, ValueError, "empty"),
    ([[1, 2]], dict(seeds=[1]), ValueError, "1 seeds for 2 images"),
    ([[1]], dict(top_p=0), ValueError, "top_p"),
    ([[1]], dict(cfg=-1), ValueError, "cfg"),
    ([[1]], dict(preset="code-eval"), ValueError, "per-scale"),
    ([[1]], dict(bogus=1), TypeError, "bogus"),
])
def test_bad_input_is_refused_before_any_work(args, kw, err, msg):
    pipe = tiny_pipe()
    with pytest.raises(err, match=msg):
        pipe.stream(*args, **kw)  # at the call, not at the first next()
    assert not pipe._pools and pipe.last_tokens is None


def test_a_generation_in_between_stops_the_stream():
    pipe = tiny_pipe()
    ref = pipe([1, 2], seed=0, **KW)
    s = pipe.stream([1, 2], seed=0, every=1, **KW)
    next(s)
    other = pipe([3], seed=5, **KW)  # another batch size: its own KV arena, the stream goes on
    assert torch.equal(list(s)[-1].images, ref)
    assert torch.equal(pipe([3], seed=5, **KW), other)
    s = pipe.stream([1, 2], seed=0, every=1, **KW)
    next(s)
    pipe([5, 6], seed=1, **KW)  # the same batch size: it overwrote the KV cache
    with pytest.raises(RuntimeError, match="another generation of 2 images"):
        next(s)
    s = pipe.stream([1, 2], seed=0, every=1, **KW)
    next(s)
    s.close()  # abandoned: the next call is not affected
    assert torch.equal(pipe([1, 2], seed=0, **KW), ref)


# ---- the chain of CUDA graphs, simulated on the CPU ------------------------------------------------------------------
class _ReplayGraph:
    """A captured 'graph': replay runs the function captured (with the static inputs and whatever state it closed
    over, as a CUDA graph's baked pointers) and writes the results into the first run's output tensors in place."""

    def __init__(self, fn, labels, seeds, outputs):
        self.fn, self.labels, self.seeds, self.outputs = fn, labels, seeds, outputs

    def replay(self):
        def copy(dst, src):
            if torch.is_tensor(dst):
                if dst is not src:
                    dst.copy_(src)
            elif isinstance(dst, (list, tuple)):
                for d, s in zip(dst, src):
                    copy(d, s)
        copy(self.outputs, self.fn(self.labels, self.seeds))


def simulated_graphs(pipe, monkeypatch):
    """pipe with graphs 'on' (a cache for cuda, every run captured) whose capture runs fn once, as the warm-up
    does on a GPU (the capture itself executes nothing), and whose replay runs it again in place."""
    cache = graphs.GraphCache("cuda")
    captured = []

    def capture(key, fn, labels, seeds):
        static_labels, static_seeds = labels.clone(), seeds.clone()
        outputs = fn(static_labels, static_seeds)  # the warm-up's side effects (KV cache, inputs if written)
        captured.append(key)
        cache.graphs[key] = graphs._Captured(_ReplayGraph(fn, static_labels, static_seeds, outputs), static_labels,
                                             static_seeds, outputs)
        return cache.graphs[key]
    monkeypatch.setattr(cache, "capture", capture)
    monkeypatch.setattr(cache, "eager_reason", lambda backend=None: None)
    pipe._graphs, pipe.use_graphs = cache, True
    return cache, captured


@pytest.mark.parametrize("code", [False, True], ids=["var", "code"])
def test_graph_chain_simulated(code, monkeypatch):
    eager = tiny_pipe(code)
    want = {e: [p.images for p in eager.stream(LABELS3, seed=2, every=e, **KW)] for e in (1, 2)}
    pipe = tiny_pipe(code)
    cache, captured = simulated_graphs(pipe, monkeypatch)
    for rep in range(2):  # capture (first), then replay every segment's graph
        for every in (1, 2):  # two chains on one pipeline: a segment's graph belongs to its chain
            n = len(captured)
            got = [p.images for p in pipe.stream(LABELS3, seed=2, every=every, **KW)]
            assert cache.last_mode == "graph"
            assert len(captured) - n == (len(stream_segments(4, every)) if rep == 0 else 0)
            assert len(got) == len(want[every]) and all(torch.equal(a, b) for a, b in zip(got, want[every]))
    assert all(k[0] == "stream" for k in captured)
    assert torch.equal(pipe(LABELS3, seed=2, **KW), want[1][-1])  # the whole-generation graph beside the chains


def test_graph_cache_clone_false_returns_the_live_outputs(monkeypatch):
    cache = graphs.GraphCache("cuda")
    out = (torch.zeros(2), [torch.ones(1)])
    monkeypatch.setattr(cache, "capture", lambda key, fn, lab, sd: cache.graphs.setdefault(
        key, graphs._Captured(type("G", (), {"replay": lambda self: None})(), lab.clone(), sd.clone(), out)))
    lab, sd = torch.tensor([1]), torch.tensor([2])
    assert cache.run("k", None, lab, sd, backend="fast", clone=False) is out
    cloned = cache.run("k", None, lab, sd, backend="fast")  # the default: copies, as before
    assert cloned[0] is not out[0] and cloned[1][0] is not out[1][0] and torch.equal(cloned[1][0], out[1][0])


def test_cost_model_counts_the_previews():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import cost_model as cm
    call = cm.run_one("tiny-var", 1, track_memory=False)
    one = cm.run_one("tiny-var", 1, track_memory=False, stream_every=4)  # one segment: the call's work
    each = cm.run_one("tiny-var", 1, track_memory=False, stream_every=1)
    assert one["stream_every"] == 4 and all(one["launches"][k] == call["launches"][k] for k in ("tokens", "decode"))
    assert each["launches"]["decode"] == 4 * call["launches"]["decode"]  # a decode per scale
    assert each["launches"]["tokens"] > call["launches"]["tokens"]  # per segment: f_hat copy, model.prepare


# ---- the command line ----------------------------------------------------------------------------------------------
def run_cli(*args):
    return cli.main([str(a) for a in args])


def test_cli_writes_one_grid_per_preview(tmp_path, tiny_files, capsys):
    base = ["generate", "--var", tiny_files["var"], "--vae", tiny_files["vae"], "--classes", 1, 2, 3,
            "--top-k", 20, "--seed", 4, "--device", "cpu", "-q"]
    assert run_cli(*base, "--out", tmp_path / "plain.png") == 0
    prev = tmp_path / "prev"
    assert run_cli(*base, "--out", tmp_path / "g.png", "--previews", prev) == 0
    assert "4 previews" in capsys.readouterr().out
    assert sorted(os.listdir(prev)) == [f"scale_{s:02d}.png" for s in range(4)]
    final = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(final, np.asarray(Image.open(tmp_path / "plain.png")))
    assert np.array_equal(np.asarray(Image.open(prev / "scale_03.png")), final)
    # the grids are the stream's previews, same layout as generate's grid
    pipe = VARPipeline(tiny_files["vae_model"], var=tiny_files["var_model"])
    previews = list(pipe.stream([1, 2, 3], seed=4, top_k=20))
    for p in previews[:-1]:
        assert np.array_equal(np.asarray(Image.open(prev / f"scale_{p.scale:02d}.png")), make_grid(p.images))
    every2 = tmp_path / "every2"
    assert run_cli(*base, "--out", tmp_path / "g2.png", "--previews", every2, "--preview-every", 3, "--nrow", 1) == 0
    assert sorted(os.listdir(every2)) == ["scale_02.png", "scale_03.png"]
    assert Image.open(every2 / "scale_02.png").size[1] > Image.open(every2 / "scale_02.png").size[0]  # one column


@pytest.mark.parametrize("extra,msg", [
    (["--preview-every", "2"], "--preview-every needs --previews"),
    (["--previews", "{tmp}/p", "--preview-every", "5"], "--preview-every 5: expected 1..4"),
    (["--previews", "{tmp}/p", "--preview-every", "0"], "--preview-every 0: expected 1..4"),
    (["--previews", "{tmp}/file"], "--previews {tmp}/file: exists and is not a folder"),
])
def test_cli_bad_preview_options(tmp_path, tiny_files, capsys, extra, msg):
    (tmp_path / "file").write_text("x")
    rc = run_cli("generate", "--var", tiny_files["var"], "--vae", tiny_files["vae"], "--classes", 1,
                 "--out", tmp_path / "g.png", "--device", "cpu", *[e.format(tmp=tmp_path) for e in extra])
    err = capsys.readouterr().err
    assert rc == 2 and msg.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "p").exists()


def test_cli_llamagen_previews_where_it_streams(tmp_path, capsys):
    from var_rt.checkpoint import save_state_dict
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    from test_llamagen import official_freqs_cis, official_vq_file_dict, tiny_pipe as tiny_llamagen
    if not hasattr(LlamaGenPipeline, "stream"):
        pytest.skip("LlamaGenPipeline.stream does not exist (the next test checks the refusal)")
    pipe = tiny_llamagen(seed=1)
    sd = dict(pipe.gpt.state_dict())
    sd["freqs_cis"] = official_freqs_cis(pipe.cfg.grid, pipe.cfg.head_dim)
    save_state_dict(sd, tmp_path / "c2i_T.pt")
    save_state_dict(official_vq_file_dict(pipe.vq), tmp_path / "vq_ds16_c2i.pt", wrap="model")
    base = ["generate", "--llamagen", tmp_path / "c2i_T.pt", "--vq", tmp_path / "vq_ds16_c2i.pt", "--classes", 1, 2,
            "--zipar-window", 2, "--top-k", 30, "--device", "cpu", "-q"]
    assert run_cli(*base, "--out", tmp_path / "plain.png") == 0
    assert run_cli(*base, "--out", tmp_path / "g.png", "--previews", tmp_path / "p", "--preview-every", 4) == 0
    grid = pipe.cfg.grid
    assert sorted(os.listdir(tmp_path / "p")) == [f"rows_{r:02d}.png" for r in (*range(4, grid, 4), grid)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "plain.png")))
    rc = run_cli(*base, "--out", tmp_path / "g.png", "--previews", tmp_path / "p", "--preview-every", grid + 1)
    assert rc == 2 and f"--preview-every {grid + 1}: expected 1..{grid}" in capsys.readouterr().err


# ---- on a GPU: the real chain of CUDA graphs (benchmarks/run_gpu_suite.sh runs -m cuda) ------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("code", [False, True], ids=["var", "code"])
def test_cuda_graph_chain(code):
    pipe = tiny_pipe(code, backend="fast", device="cuda")
    for labels in ([5], LABELS3):
        ref = pipe(labels, seed=3, **KW)
        eager = VARPipeline(pipe.vae, device="cuda", backend="fast", **(
            {"drafter": pipe.models["drafter"], "refiner": pipe.models["refiner"], "draft_steps": 3} if code
            else {"var": pipe.models["main"]}))
        eager.use_graphs = False
        for every in (1, 2):
            want = [p.images for p in eager.stream(labels, seed=3, every=every, **KW)]
            for _ in range(2):  # captured, then replayed
                got = [p.images for p in pipe.stream(labels, seed=3, every=every, **KW)]
                assert pipe._graphs.last_mode == "graph" and pipe._graphs.disabled_reason is None
                assert torch.equal(got[-1], ref)
                assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_graph_chain_survives_other_graphs_reusing_its_outputs(monkeypatch):
    """The graphs share one memory pool: replaying another graph between two segments may overwrite a segment
    graph's own outputs (bytes another graph uses as scratch). Simulated by clobbering every stream graph's
    outputs whenever a preview is decoded: the chain must read its own carried copies, not those outputs."""
    eager = tiny_pipe(False)
    want = [p.images for p in eager.stream(LABELS3, seed=2, every=1, **KW)]
    pipe = tiny_pipe(False)
    cache, _ = simulated_graphs(pipe, monkeypatch)
    decode = pipe.decode

    def clobbering_decode(f_hat, progress=False):
        out = decode(f_hat, progress)
        carried = {t.data_ptr() for c in pipe._carries.values()
                   for o in c for t in (o if isinstance(o, list) else [o]) if t is not None}
        for key, entry in cache.graphs.items():  # the tensors a segment's graph made (not those it passes on)
            if key[0] == "stream":
                for t in [entry.outputs[0], *entry.outputs[1], *entry.outputs[2]]:
                    if t is not None and t.data_ptr() not in carried:
                        t.fill_(-1 if t.dtype == torch.int64 else float("nan"))
        return out
    monkeypatch.setattr(pipe, "decode", clobbering_decode)
    for _ in range(2):  # capture, then replay
        got = [p.images for p in pipe.stream(LABELS3, seed=2, every=1, **KW)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
