"""Speculative Jacobi Decoding (runtime.sjd): greedy SJD == sequential greedy, the output distribution is that of
sequential sampling (chi-square against exact enumerated probabilities), batch invariance, fewer passes."""
import os

import torch  # noqa: E402
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest

from var_rt import ops
from var_rt.runtime import sjd

from conftest import check_batch_invariance, make_predictable_, tiny_llamagen_pipe as pipe_for  # grid 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw", [dict(cfg=4.0), dict(cfg=1.0), dict(cfg=3.0, cfg_interval=4)])
def test_greedy_sjd_equals_sequential_greedy(kw):
    pipe = pipe_for()
    for labels in ([1, 7, 3], [5]):
        seq = pipe.generate_tokens(labels, seed=11, top_k=1, **kw).clone()
        for L in (1, 3, 8, 40):
            assert torch.equal(pipe.generate_tokens(labels, seed=11, top_k=1, sjd_window=L, **kw), seq), L
            assert len(pipe.last_stats["sjd_acceptance"]) == len(labels)


def test_greedy_sjd_fast_attention():
    pytest.importorskip("var_rt.kernels.zipar_attention")
    pipe = pipe_for(backend="fast", grid=4)
    seq = pipe.generate_tokens([2, 3], seed=1, top_k=1, cfg=2.0).clone()
    assert torch.equal(pipe.generate_tokens([2, 3], seed=1, top_k=1, cfg=2.0, sjd_window=4), seq)


def _exact_joint(gpt, label):
    """p(t0, t1) of sequential sampling (cfg 1, no filter), enumerated with the cached sequential step."""
    from var_rt.runtime.llamagen import plan_for
    plan = plan_for(gpt.cfg, None, "cpu")
    V = gpt.cfg.vocab_size
    joint = torch.zeros(V, V, dtype=torch.float64)
    for t0 in range(V):
        kv = [torch.zeros(gpt.kv_shape(1)) for _ in gpt.layers]
        p0 = gpt.step(gpt.embed_classes(torch.tensor([label])), plan[0].slots, kv, plan[0].vis)[0, -1].softmax(-1)
        p1 = gpt.step(gpt.embed_tokens(torch.tensor([[t0]])), plan[1].slots, kv, plan[1].vis)[0, -1].softmax(-1)
        joint[t0] = p0[t0].double() * p1.double()
    return joint


def test_sjd_distribution_equals_sequential_chi_square():
    """Vocab 4, 2x2 grid: the joint of the first two tokens over 1500 seeded images, SJD L = 3 vs the exact
    probabilities; chi-square with 15 degrees of freedom below the 0.1% critical value (37.70). Fixed seeds: the
    test is deterministic. A broken acceptance rule (always accept) fails it."""
    pipe = pipe_for(dim=32, n_layer=1, n_head=2, vocab_size=4, num_classes=2, grid=2, std=0.1, seed=0)
    M = 1500
    joint = _exact_joint(pipe.gpt, 1)
    assert joint.min() > 0.01                              # every cell populated: the test has power

    def chi2(tokens):
        counts = torch.zeros(4, 4, dtype=torch.float64)
        for a, b in tokens[:, :2].tolist():
            counts[a, b] += 1
        return float(((counts - M * joint) ** 2 / (M * joint)).sum())
    got = pipe.generate_tokens([1] * M, cfg=1.0, top_k=0, seed=0, sjd_window=3)
    acc = pipe.last_stats["sjd_acceptance"]
    assert 0.2 < sum(acc) / M < 0.95                       # drafts are both accepted and rejected
    assert chi2(got) < 37.70
    seq = pipe.generate_tokens([1] * M, cfg=1.0, top_k=0, seed=0)
    assert chi2(seq) < 37.70                               # the reference sampler passes the same test
    # the test has power: accepting every draft (no speculative-sampling test) is caught
    orig = sjd.keyed_uniform
    try:   # u = 0: every draft passes the acceptance test
        sjd.keyed_uniform = lambda seed, i, t, purpose, vocab=0: (orig(seed, i, t, purpose, vocab) *
                                                                  (purpose != sjd._ACCEPT))
        bad = pipe.generate_tokens([1] * M, cfg=1.0, top_k=0, seed=0, sjd_window=3)
    finally:
        sjd.keyed_uniform = orig
    assert chi2(bad) > 37.70


def test_sjd_batch_invariance_and_determinism():
    check_batch_invariance(pipe_for(), [1, 2, 3], 4, cfg=3.0, top_k=20, top_p=0.9, sjd_window=4)


def test_sjd_takes_fewer_passes_on_a_predictable_model():
    """Attention and FFN outputs zeroed, every embedding has a large feature 0 and the head reads only that
    feature, towards token 5: the model predicts 5 everywhere, so after the first pass (random drafts) the drafts are
    right and each pass commits L tokens."""
    pipe = make_predictable_(pipe_for(grid=6))
    seq = pipe.generate_tokens([1, 2], cfg=1.0, top_k=0, seed=0).clone()
    assert pipe.last_forward_passes == 36 and (seq == 5).all()
    for L in (4, 8):
        out = pipe.generate_tokens([1, 2], cfg=1.0, top_k=0, seed=0, sjd_window=L)
        assert pipe.last_forward_passes <= 1 + -(-35 // L), (L, pipe.last_stats)
        assert min(pipe.last_stats["sjd_acceptance"]) > 0.8
        assert torch.equal(out, seq)


@pytest.mark.parametrize("kw,match", [(dict(sjd_window=-1), "sjd_window"), (dict(sjd_window=2.0), "sjd_window"),
                                      (dict(sjd_window=2, zipar_window=2, zipar_mask="official"), "exact"),
                                      (dict(sjd_relaxed=2), "sjd_window"), (dict(sjd_window=2, sjd_relaxed=-1),
                                                                           "sjd_relaxed")])
def test_bad_sjd_inputs(kw, match):
    pipe = pipe_for(grid=2)
    with pytest.raises(ValueError, match=match):
        pipe.generate_tokens([0], **kw)


def test_relaxed_acceptance():
    pipe = pipe_for(grid=4)
    kw = dict(cfg=2.0, top_k=0, seed=2, sjd_window=4)
    strict = pipe.generate_tokens([1, 2, 3, 4], **kw).clone()
    assert torch.equal(pipe.generate_tokens([1, 2, 3, 4], sjd_relaxed=1, **kw), strict)   # cluster = the token
    out = pipe.generate_tokens([1, 2, 3, 4], sjd_relaxed=8, **kw)
    assert out.shape == (4, 16) and all(0 <= a <= 1 for a in pipe.last_stats["sjd_acceptance"])
    nb = sjd.codebook_neighbours(torch.eye(4) + torch.tensor([[0.0], [0.1], [5.0], [5.1]]), 2)
    assert nb[:, 0].tolist() == [0, 1, 2, 3]


def test_cli_options(tmp_path, capsys):
    from var_rt import cli
    from var_rt.checkpoint import save_state_dict
    from var_rt.demo.run import parse_llamagen_methods
    from test_llamagen import official_freqs_cis, official_vq_file_dict, tiny_pipe
    pipe = tiny_pipe(seed=1, grid=4)
    sd = dict(pipe.gpt.state_dict())
    sd["freqs_cis"] = official_freqs_cis(pipe.cfg.grid, pipe.cfg.head_dim)
    save_state_dict(sd, tmp_path / "c2i_T.pt")
    save_state_dict(official_vq_file_dict(pipe.vq), tmp_path / "vq_ds16_c2i.pt", wrap="model")
    base = ["generate", "--llamagen", tmp_path / "c2i_T.pt", "--vq", tmp_path / "vq_ds16_c2i.pt", "--classes", 1, 2,
            "--top-k", 1, "--device", "cpu", "--verbose"]
    run = lambda *more: cli.main([str(x) for x in base + list(more)])   # noqa: E731
    assert run("--sjd-window", 4, "--out", tmp_path / "a.png") == 0
    assert run("--out", tmp_path / "b.png") == 0
    assert run("--zipar-window", 2, "--zipar-mask", "official", "--out", tmp_path / "c.png") == 0
    assert run("--sjd-window", 2, "--zipar-window", 2, "--out", tmp_path / "d.png") == 0
    assert run("--sjd-window", 2, "--zipar-window", 2, "--zipar-mask", "official", "--out", tmp_path / "f.png") == 2
    assert run("--sjd-relaxed", 2, "--out", tmp_path / "e.png") == 2
    assert [n for n, _ in parse_llamagen_methods("seq,zipar-2-official,sjd-8,sjd-4-relaxed-3,zipar-2-sjd-4")] == [
        "LlamaGen seq", "ZipAR w=2 official", "SJD L=8", "SJD L=4 relaxed 3", "ZipAR w=2 + SJD L=4"]
    with pytest.raises(ValueError):
        parse_llamagen_methods("sjd-0")
