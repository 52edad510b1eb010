"""Guidance skipping (SamplingSettings.cfg_skip_last = M): the last M VAR scales run the conditional rows alone and
draw from the conditional logits (guidance t = 0 there). Checked against the official restatement (greedy), against
the unskipped engine with t forced to 0 at those scales (stochastic, both backends, VAR and CoDe), across batches,
and for bad values."""
import argparse

import pytest
import torch

from var_rt import cli, ops
from var_rt.cli.args import UsageError, sampling_options
from var_rt.pipeline import VARPipeline
from var_rt.runtime import var as engine
from var_rt.runtime.settings import SamplingSettings

from conftest import official_var_state_dict, official_vae_state_dict, tiny_var_cfg, tiny_vae, tiny_vae_cfg, tiny_var
from official_ref import teacher_forced_logits, teacher_inputs

K = 4  # the tiny models' scales (1, 2, 3, 4)
SAMPLING = dict(cfg=3.0, top_k=20, top_p=0.95)


def strong_classes(*models):
    """Random class embeddings are too alike for guidance to change a draw; scaled up, it does."""
    with torch.no_grad():
        for m in models:
            m.class_emb.weight.mul_(30)


def pipeline(backend="torch", draft_steps=None):
    kw = dict(refiner_depth=tiny_var_cfg(depth=1), draft_steps=draft_steps) if draft_steps else {}
    pipe = VARPipeline.random(tiny_var_cfg(), vae_cfg=tiny_vae_cfg(), backend=backend, **kw)
    strong_classes(*pipe.models.values())
    return pipe


def tokens(pipe, labels=(1, 4, 7), seed=3, **kw):
    pipe.generate_latents(list(labels), seeds=[ops.mix_seed(seed, i) for i in range(len(labels))], **SAMPLING, **kw)
    return [t.clone() for t in pipe.last_tokens]


def guidance_zero_at(monkeypatch, first_skipped: int):
    """The unskipped engine (2B rows everywhere), its sampler given t = 0 from scale `first_skipped` on: the official
    mix (1 + 0) cond - 0 uncond, computed from the CFG pair's logits."""
    real = ops.sample_tokens

    def patched(logits, seeds, step, *a, guidance=None, **kw):
        if isinstance(step, int) and step >= first_skipped:
            guidance = 0.0
        return real(logits, seeds, step, *a, guidance=guidance, **kw)
    monkeypatch.setattr(ops, "sample_tokens", patched)


@pytest.mark.parametrize("M", [0, 1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_greedy_tokens_match_official_with_cond_only_scales(M, shared):
    var, vae = tiny_var(depth=3, shared_aln=shared), tiny_vae()
    strong_classes(var)
    pipe = VARPipeline(vae, var=var, backend="torch")
    labels, cfg = [3, 7, 0], 4.0
    pipe.generate_latents(labels, cfg=cfg, top_k=1, top_p=1.0, cfg_skip_last=M)
    toks = pipe.last_tokens
    x_in, _ = teacher_inputs(official_vae_state_dict(vae), var.cfg.patch_nums, toks)
    B = len(labels)
    labels2 = torch.tensor(labels + [var.cfg.num_classes] * B)
    logits = teacher_forced_logits(official_var_state_dict(var), var.cfg.patch_nums, labels2, x_in.repeat(2, 1, 1),
                                   var.cfg.heads)
    differs = False
    for si, (b, e) in enumerate(var.cfg.scale_bounds()):
        t = cfg * si / (K - 1)
        mixed = ((1 + t) * logits[:B, b:e] - t * logits[B:, b:e]).argmax(-1)
        want = logits[:B, b:e].argmax(-1) if si >= K - M else mixed
        assert torch.equal(want, toks[si]), f"scale {si}"
        differs |= si >= K - M and not torch.equal(mixed, toks[si])
    assert differs or M == 0, "guidance changes no greedy token: the test could not fail"


@pytest.mark.parametrize("backend,draft_steps", [  # CoDe: the refiner's prefill before / at / after the boundary
    ("torch", None), ("torch", 1), ("torch", 2), ("torch", 3), ("fast", None), ("fast", 2)])
def test_skipped_scales_equal_guidance_zero_and_the_rest_is_unchanged(backend, draft_steps, monkeypatch):
    M = 2  # scales 2, 3 skipped
    pipe = pipeline(backend, draft_steps)
    with ops.use_backend(backend):
        base = tokens(pipe)
        assert all(torch.equal(a, b) for a, b in zip(tokens(pipe, cfg_skip_last=0), base))  # M = 0 is today's run
        skipped = tokens(pipe, cfg_skip_last=M)
        guidance_zero_at(monkeypatch, K - M)
        ref = tokens(pipe)
    for s in range(K - M):
        assert torch.equal(skipped[s], base[s]), f"guided scale {s} changed"
    for s in range(K - M, K):
        assert torch.equal(skipped[s], ref[s]), f"skipped scale {s} differs from the t = 0 draw"
    assert any(not torch.equal(skipped[s], base[s]) for s in range(K - M, K)), "skipping changed nothing"


def test_code_skipped_prefill_runs_the_conditional_rows_alone(monkeypatch):
    """N = 2 with M = 2: the refiner's prefill samples a skipped scale, so it runs B rows (and its KV writes stay in
    the conditional half); N = 1: the prefill samples a guided scale and runs 2B."""
    seen = []
    real = engine.ops.var_attention

    def spy(qkv, kv, start, *a, **kw):
        seen.append((qkv.shape[0], start, kw.get("q_scale", a[1] if len(a) > 1 else None) is not None))
        return real(qkv, kv, start, *a, **kw)
    monkeypatch.setattr(ops, "var_attention", spy)
    for N, prefill_rows in ((2, 3), (1, 6)):
        pipe = pipeline("torch", N)
        seen.clear()
        tokens(pipe, cfg_skip_last=2)
        per_layer = {}
        for rows, start, prefill in seen:
            per_layer.setdefault((start, prefill), set()).add(rows)
        assert per_layer[(0, True)] == {prefill_rows}, N
        assert per_layer[(14, False)] == {3}  # scale 3 (tokens 14..29, skipped): B rows
        assert per_layer[(0, False)] == {6}  # the drafter's scale 0: guided, the CFG pair


@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_attention_on_the_conditional_half_of_the_pool(backend):
    """kv[:, :B] (a strided view of the (2, 2B, H, Lmax, D) pool) works as a contiguous pool would; the
    unconditional rows are left untouched."""
    g = torch.Generator().manual_seed(0)
    B, H, D, Lmax, start, l = 2, 2, 16, 20, 5, 4
    pool = torch.randn(2, 2 * B, H, Lmax, D, generator=g)
    qkv = torch.randn(B, l, 3 * H * D, generator=g)
    sm = torch.rand(H, generator=g) + 1
    before = pool.clone()
    with ops.use_backend(backend):
        out = ops.var_attention(qkv, pool[:, :B], start, sm)
    dense = before[:, :B].contiguous()
    want = ops.var_attention_ref(qkv, dense, start, sm)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool[:, :B], dense, atol=1e-6, rtol=1e-6)
    assert torch.equal(pool[:, B:], before[:, B:])


@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_batch_one_and_three_give_the_same_latents(backend):
    """The image is the decode of f_hat (whose batch independence tests/test_batch_invariance.py checks)."""
    pipe = pipeline(backend, draft_steps=2)
    seeds = [ops.mix_seed(9, i) for i in range(3)]
    with ops.use_backend(backend):
        three = pipe.generate_latents([2, 5, 8], seeds=seeds, cfg_skip_last=1, **SAMPLING)
        for i, c in enumerate([2, 5, 8]):
            one = pipe.generate_latents([c], seeds=seeds[i:i + 1], cfg_skip_last=1, **SAMPLING)
            assert torch.equal(one[0], three[i]), i


@pytest.mark.parametrize("bad", [-1, K, 1.5, True, "2", None])
def test_bad_values_are_refused_in_one_line(bad):
    pipe = VARPipeline(tiny_vae(), var=tiny_var())
    with pytest.raises(ValueError, match="cfg_skip_last") as e:
        pipe([1], cfg_skip_last=bad)
    assert "\n" not in str(e.value)


def test_llamagen_refuses_it_and_settings_stay_hashable():
    with pytest.raises(ValueError, match="cfg_skip_last=1: guidance skipping is for VAR") as e:
        SamplingSettings.build(cfg=4.0, cfg_skip_last=1)
    assert "\n" not in str(e.value)
    assert SamplingSettings.build(cfg=4.0, cfg_skip_last=0) == SamplingSettings.build(cfg=4.0)
    a, b = (SamplingSettings.build(cfg=2.0, steps=K, cfg_skip_last=m) for m in (1, 2))
    assert len({a, b, SamplingSettings.build(cfg=2.0, steps=K, cfg_skip_last=1)}) == 2  # part of the graph key
    assert [a.guided(k) for k in range(K)] == [True, True, True, False]


def test_cli_option(tmp_path, tiny_files, capsys):
    out = tmp_path / "g.png"
    args = ["generate", "--var", str(tiny_files["var"]), "--vae", str(tiny_files["vae"]), "--classes", "1",
            "--out", str(out), "--device", "cpu"]
    assert cli.main(args + ["--cfg-skip-last", "2"]) == 0 and out.exists()
    assert cli.main(args + ["--cfg-skip-last", "4"]) != 0
    assert "cfg_skip_last=4" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--cfg-skip-last is for VAR"):
        sampling_options(argparse.Namespace(cfg=None, top_k=None, top_p=None, temperature=None, cfg_skip_last=1),
                         "llamagen")


def test_stream_and_edit_take_it():
    """The entry points that forward their settings to sampling_settings: the last preview and an all-regenerate
    edit are the plain call's images."""
    pipe = pipeline("torch")
    want = pipe([1, 2], seed=0, cfg_skip_last=2, **SAMPLING)
    if hasattr(pipe, "stream"):
        *_, last = pipe.stream([1, 2], seed=0, cfg_skip_last=2, **SAMPLING)
        assert torch.equal(last.images, want)
    if hasattr(pipe, "edit"):
        masks = torch.ones(2, pipe.image_size, pipe.image_size)
        assert torch.equal(pipe.edit(want, masks, [1, 2], seed=0, cfg_skip_last=2, **SAMPLING), want)


def test_eval_demo_option_is_checked_before_loading(capsys):
    from var_rt.demo.run import parse_cfg_skip
    assert parse_cfg_skip("0,1, 3", 6) == (0, 1, 3)
    for bad in ("", "x", "-1", "6"):
        with pytest.raises(ValueError, match="0..5"):
            parse_cfg_skip(bad, 6)
    assert cli.main(["eval-demo", "--methods", "var", "--cfg-skip-last", "0,6"]) != 0
    assert "--cfg-skip-last" in capsys.readouterr().err
    assert cli.main(["eval-demo", "--methods", "llamagen", "--cfg-skip-last", "1"]) != 0
