"""benchmarks/cost_model.py: counts on the meta device checked against independent analytic counts (small
configs built through the same code path as the real ones), the layer attribution, the fakes and the report."""
import contextlib
import io
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cost_model as cm  # noqa: E402

from var_rt import ops  # noqa: E402
from var_rt.models import llamagen as gpt_model  # noqa: E402
from var_rt.models import var as var_model  # noqa: E402
from var_rt.models import vq16  # noqa: E402
from var_rt.models import vqvae as vqvae_model  # noqa: E402
from var_rt.runtime import zipar  # noqa: E402

PN = (1, 2, 3, 4)


def var_cfg(depth, width=64, heads=2):
    return var_model.VARConfig(depth=depth, width=width, heads=heads, vocab=48, cvae=8, num_classes=10, patch_nums=PN)


VAE = vqvae_model.VQVAEConfig(vocab=48, cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1)


def count_var(depth, refiner=None, draft_steps=None, batch=3, **sampling):
    pipe = cm.build_var(var_cfg(depth), VAE, var_cfg(refiner, width=32) if refiner else None, draft_steps)
    return pipe, cm.report("test", batch, cm.count(pipe, batch, **sampling))


def var_analytic(B, phases, skip=0):
    """phases: [(cfg, scales fed one by one, prefill scales or ())]. GEMM FLOPs 2*M*K*N over qkv, proj, fc1, fc2,
    head (2B CFG rows; B rows at the last `skip` scales, guidance skipped: a group's rows follow the scale it
    samples), word_embed (B rows), the per-phase AdaLN linears (2B rows, B when the phase draws no guided scale:
    skipped scales after guided ones reuse the pair's first B rows); attention 4*N*H*Lq*Lk*D."""
    gemm = attn = 0
    first_skipped = len(PN) - skip
    for c, scales, prefill in phases:
        C, V, hid = c.width, c.vocab, round(c.width * c.mlp_ratio)
        per_row = 2 * (C * 3 * C + C * C + C * hid + hid * C)          # one token through one block
        bounds = c.scale_bounds()
        fed = [(tuple(prefill), prefill[-1])] if prefill else []
        fed += [((s,), s) for s in scales[1 if prefill else 0:]]
        N = 2 * B if fed[0][1] < first_skipped else B
        gemm += c.depth * 2 * N * C * 6 * C + 2 * N * C * 2 * C      # ada_lin of every block + head_nm
        for group, sampled in fed:
            N = B if sampled >= first_skipped else 2 * B
            l = sum(PN[s] ** 2 for s in group)
            gemm += c.depth * N * l * per_row + 2 * N * PN[sampled] ** 2 * C * V
            gemm += sum(2 * B * PN[s] ** 2 * c.cvae * C for s in group if s > 0)
            vis = sum(PN[s] ** 2 * bounds[s][1] for s in group) if prefill and group == tuple(prefill) else \
                l * bounds[group[-1]][1]
            attn += c.depth * 4 * N * c.heads * c.head_dim * vis
    return gemm, attn


@pytest.mark.parametrize("code,skip", [(False, 0), (True, 0), (False, 2), (True, 2), (True, 1)])
def test_var_flops_match_analytic(code, skip):
    B = 3
    kw = {"cfg_skip_last": skip} if skip else {}
    if code:  # CoDe: drafter depth 2 on scales 0..1, refiner depth 1 prefills 0..2 block-causally
        pipe, r = count_var(2, refiner=1, draft_steps=2, batch=B, **kw)
        d, f = pipe.models["drafter"].cfg, pipe.models["refiner"].cfg
        phases = [(d, (0, 1), ()), (f, (2, 3), (0, 1, 2))]
    else:
        pipe, r = count_var(2, batch=B, **kw)
        phases = [(pipe.cfg, (0, 1, 2, 3), ())]
    gemm, attn = var_analytic(B, phases, skip)
    assert r["flops"]["gemm"] == gemm
    assert r["flops"]["by_phase"]["tokens"]["attention"] == attn
    assert r["flops"]["by_phase"]["decode"]["gemm"] == 0 and r["flops"]["by_phase"]["decode"]["conv"] > 0
    layers_x_steps = sum(c.depth * len(scales) for c, scales, _ in phases)
    assert r["layer_steps"] == r["layers_x_steps"] == layers_x_steps
    assert r["launches_per_layer_step"] * layers_x_steps == pytest.approx(r["launches_in_layers"])
    assert 0 < r["launches_in_layers"] < r["launches"]["tokens"] == r["graph_nodes"]
    assert r["launches"]["total"] == sum(r["launches"][p] for p in ("tokens", "decode", "other"))
    assert r["attention_ops_without_flops"] == []


def test_launches_grow_linearly_with_depth():
    runs = [count_var(d, batch=2)[1] for d in (1, 2, 3)]
    total = [r["launches"]["total"] for r in runs]
    in_layers = [r["launches_in_layers"] for r in runs]
    assert total[1] - total[0] == total[2] - total[1] > 0
    assert in_layers[0] * 2 == in_layers[1] and in_layers[0] * 3 == in_layers[2]
    assert len({r["launches_per_layer_step"] for r in runs}) == 1
    assert len({r["launches"]["decode"] for r in runs}) == 1  # the decoder does not depend on the transformer


def llamagen(grid=3, window=None, batch=2):
    cfg = gpt_model.LlamaGenConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, grid=grid)
    vq = vq16.VQ16Config(codebook_size=64, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    pipe = cm.build_llamagen(cfg, vq)
    return cfg, cm.report("test", batch, cm.count(pipe, batch, zipar_window=window))


@pytest.mark.parametrize("window", [None, 2])
def test_llamagen_flops_match_analytic(window):
    B, grid = 2, 4
    c, r = llamagen(grid, window, B)
    N, C, D, F = 2 * B, c.dim, c.head_dim, c.ffn_hidden
    passes = (zipar.sequential_schedule(grid, grid, 1) if window is None
              else zipar.zipar_schedule(grid, grid, window, 1))
    per_row = c.n_layer * 2 * (C * (c.n_head + 2 * c.kv_heads) * D + C * C + 2 * C * F + F * C) + 2 * C * c.vocab_size
    gemm = sum(N * len(p.queries) * per_row for p in passes)
    attn = sum(c.n_layer * 4 * N * c.n_head * D * sum(q.slot + 1 for q in p.queries) for p in passes)
    # the head runs on every query, or only on the drawn ones (ZipAR's KV-only queries need no logits)
    kv_only = sum(1 for p in passes for q in p.queries if q.target < 0)
    assert r["flops"]["gemm"] in (gemm, gemm - N * kv_only * 2 * C * c.vocab_size)
    assert r["flops"]["by_phase"]["tokens"]["attention"] == attn
    assert r["steps"] == len(passes) and r["layer_steps"] == c.n_layer * len(passes) == r["layers_x_steps"]
    assert r["launches_per_layer_step"] * r["layer_steps"] == pytest.approx(r["launches_in_layers"])


def test_counting_rules():
    c = cm.Counter()
    with torch.device("meta"):
        x = torch.empty(4, 8, 16, dtype=torch.bfloat16)
        w = torch.empty(32, 16, dtype=torch.bfloat16)
    with cm.Recorder(c):
        x.view(32, 16).t()
        x.permute(2, 0, 1).transpose(0, 1).unsqueeze(0).expand(3, -1, -1, -1)
        x[1:, 2].detach()
        list(x.unbind(0))
        torch.empty_like(x)
    assert c.acc[("other", False)]["launches"] == 0
    with cm.Recorder(c):
        torch.nn.functional.linear(x, w)  # (32 rows) x (16 -> 32)
        y = x + 1
        y.add_(x)
    a = c.acc[("other", False)]
    assert a["launches"] == 3 and a["gemm_flops"] == 2 * 32 * 16 * 32
    assert a["bytes"] == 2 * x.numel() * 2 + 2 * x.numel() * 2  # x + 1: x, y; y += x: y once, x


def triton_gate():
    """var_rt's Triton gate: ops.triton_fn (one ops module) or ops.dispatch.triton_fn (ops package)."""
    return getattr(ops, "triton_fn", None) or ops.dispatch.triton_fn


def test_fakes_are_generic():
    c = cm.Counter()
    from var_rt import _ext
    originals = (triton_gate(), _ext.rvq_step_fn, torch.nn.functional.scaled_dot_product_attention)
    meta = torch.device("meta")
    with torch.device("meta"):
        x = torch.empty(2, 5, 16)
        w = torch.empty(24, 16)
        logits = torch.empty(6, 4, 48, dtype=torch.bfloat16)
        seeds = torch.empty(3, dtype=torch.int64)
    with cm.patched(c), cm.Recorder(c):
        out = triton_gate()("brand_new_op", meta)(x, w)  # unknown, no reference: counted anyway
        assert out.shape == x.shape
        y = triton_gate()("fused_linear_thing", meta)(x, w)
        sample = triton_gate()("sample_tokens", meta)  # shape rule: (B, l), B halved by CFG
        tok = sample(logits, seeds, 0, 10, 0.9, 1.0, guidance=1.5)
        assert tok.shape == (3, 4) and tok.dtype == torch.int64 and tok.device.type == "meta"
        assert sample(logits, seeds, 0, 10, 0.9, 1.0).shape == (6, 4)
        assert _ext.rvq_step_fn(meta) is not None
    assert isinstance(y, torch.Tensor)
    a = c.acc[("other", False)]
    assert a["launches"] == 4
    assert a["gemm_flops"] == 2 * 10 * 16 * 24
    assert c.by_op["other"]["fast.brand_new_op"][1] == (2 * x.numel() + w.numel()) * 4
    assert (triton_gate(), _ext.rvq_step_fn, torch.nn.functional.scaled_dot_product_attention) == originals


def test_cli_json_and_table():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cm.main(["--config", "tiny-llamagen", "--batch", "2", "--json"]) == 0
    r = json.loads(buf.getvalue())
    for key in ("config", "batch", "commit", "date", "launches", "launches_per_layer_step", "graph_nodes", "flops",
                "bytes", "peak_bytes", "model", "modelled"):
        assert key in r
    assert r["config"] == "tiny-llamagen" and r["batch"] == 2
    assert {"total", "tokens", "decode"} <= set(r["launches"]) and {"gemm", "attention", "conv"} <= set(r["flops"])
    assert "non_gemm" in r["bytes"] and r["graph_nodes"] == r["launches"]["tokens"]
    assert "MODELLED" in r["model"]["formula"] and r["model"]["ceilings"]["hbm_TBps"] == {"H100": 3.35, "H200": 4.8}
    for m in r["modelled"].values():
        assert m["ms"] > 0 and m["img_per_s"] == pytest.approx(2e3 / m["ms"])
    assert r["modelled"]["H200"]["ms"] <= r["modelled"]["H100"]["ms"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cm.main(["--config", "tiny-var", "--batch", "1"])
    text = buf.getvalue()
    assert "MODELLED" in text and "not measurements" in text.lower() and "model:" in text


def test_attention_flops_without_step_context():
    """Outside an engine step the FLOPs come from the kernel's arguments: both VAR attention signatures."""
    c = cm.Counter()
    N, H, l, D, start = 4, 2, 5, 16, 10
    with torch.device("meta"):
        q, k = torch.empty(N, H, l, D), torch.empty(N, H, start + l, D)           # (q, k, v, scale_mul, ...)
        qkv, kv = torch.empty(N, l, 3 * H * D), torch.empty(2, N, H, 30, D)       # (qkv, kv pool, start, ...)
    want = 4 * N * H * D * l * (start + l)
    assert cm._attention_flops(c, "var_attention", (q, k, k, None), {}) == want
    assert cm._attention_flops(c, "var_attention", (qkv, kv, start, None), {}) == want
    assert cm._attention_flops(c, "some_attention", (qkv,), {}) is None            # unknown: reported, not guessed


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
def test_sjd_counts_grow_per_pass_and_match_analytic(cfg_scale):
    """Batched SJD (`count(sjd=(L, P))`): every pass is the same work (static shapes), so the token phase is P
    times one pass; its GEMM FLOPs are the linear layers on N rows x L queries, its attention FLOPs every query
    against every cache slot (the cost model's dense rule for per-row slots: visibility is data, not schedule)."""
    B, L, grid = 2, 3, 4
    cfg = gpt_model.LlamaGenConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, grid=grid)
    vq = vq16.VQ16Config(codebook_size=64, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    runs = {}
    for P in (1, 3):
        pipe = cm.build_llamagen(cfg, vq)
        runs[P] = cm.report("test", B, cm.count(pipe, B, sjd=(L, P), cfg=cfg_scale))
    N = 2 * B if cfg_scale > 1 else B
    slots = pipe.kv_pool(N).views["llamagen"][0].shape[3]
    C, D, F = cfg.dim, cfg.head_dim, cfg.ffn_hidden
    per_row = cfg.n_layer * 2 * (C * (cfg.n_head + 2 * cfg.kv_heads) * D + C * C + 2 * C * F + F * C) + \
        2 * C * cfg.vocab_size
    attention = cfg.n_layer * 4 * N * cfg.n_head * L * slots * D
    for P, r in runs.items():
        assert r["flops"]["by_phase"]["tokens"]["gemm"] == P * N * L * per_row
        assert r["flops"]["by_phase"]["tokens"]["attention"] == P * attention
        assert r["steps"] == P and r["layer_steps"] == cfg.n_layer * P and r["sjd"] == {
            "window": L, "passes": P, "passes_note": r["sjd"]["passes_note"]}
    assert runs[3]["launches"]["tokens"] == 3 * runs[1]["launches"]["tokens"] > 0
    assert runs[3]["launches"]["decode"] == runs[1]["launches"]["decode"] > 0
