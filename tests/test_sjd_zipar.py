"""SJD + ZipAR (runtime.sjd.generate_one_zipar): greedy equals plain ZipAR token for token (same window, "exact"
mask), the output distribution is plain ZipAR's (two-sample chi-square against the plain ZipAR sampler), batch
invariance, fewer passes than ZipAR on a predictable model, per-query visibility counts, input checks."""
import os

import torch  # noqa: E402
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest

from var_rt import ops
from var_rt.runtime import sjd, zipar

from conftest import check_batch_invariance, make_predictable_, tiny_llamagen_pipe as pipe_for  # grid 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw", [dict(cfg=4.0), dict(cfg=1.0), dict(cfg=3.0, cfg_interval=4)])
def test_greedy_sjd_zipar_equals_zipar(kw):
    pipe = pipe_for()
    labels = [1, 7, 3]
    for w in (1, 2, 4, 6):
        ref = pipe.generate_tokens(labels, seed=11, top_k=1, zipar_window=w, **kw).clone()
        passes = pipe.last_forward_passes
        for L in (1, 3, 8):
            got = pipe.generate_tokens(labels, seed=11, top_k=1, zipar_window=w, sjd_window=L, **kw)
            assert torch.equal(got, ref), (w, L)
            assert pipe.last_forward_passes <= passes and len(pipe.last_stats["sjd_acceptance"]) == 3
            if L == 1:   # one draft per row: exactly ZipAR's schedule
                assert pipe.last_stats["sjd_passes"] == [passes] * 3


def test_greedy_sjd_zipar_fast_backend():
    pytest.importorskip("var_rt.kernels.zipar_attention")
    pipe = pipe_for(backend="fast", grid=4)
    ref = pipe.generate_tokens([3], seed=1, top_k=1, cfg=2.0, zipar_window=2).clone()
    assert torch.equal(pipe.generate_tokens([3], seed=1, top_k=1, cfg=2.0, zipar_window=2, sjd_window=4), ref)


def _joint(tokens, a, b, V):
    c = torch.zeros(V, V, dtype=torch.float64)
    for x, y in tokens[:, [a, b]].tolist():
        c[x, y] += 1
    return c


def _chi2(c1, c2):
    """Two-sample chi-square of equal-size count tables."""
    s = c1 + c2
    return float(((c1 - c2) ** 2 / s.clamp(min=1))[s > 0].sum())


def test_sjd_zipar_distribution_equals_zipar_chi_square():
    """Vocab 4, 3x3 grid, w = 1: the joint of tokens (1, 2) and (2, 0) over 1000 seeded images. Plain ZipAR draws
    (2, 0) without seeing (1, 2) (placeholder input), sequential decoding sees it: the two differ. SJD + ZipAR
    (L = 3) against an independent plain-ZipAR sample: two-sample chi-square (<= 15 d.o.f.) below the 0.1% critical
    value (37.70). Fixed seeds: deterministic. Power: sequential decoding's and an always-accepting SJD's samples
    fail the same test."""
    pipe = pipe_for(dim=32, n_layer=1, n_head=2, vocab_size=4, num_classes=2, grid=3, std=1.0, seed=0)
    M, kw = 1000, dict(cfg=1.0, top_k=0)
    ref = _joint(pipe.generate_tokens([1] * M, seed=0, zipar_window=1, **kw), 5, 6, 4)
    got = pipe.generate_tokens([1] * M, seed=2, zipar_window=1, sjd_window=3, **kw)
    acc = sum(pipe.last_stats["sjd_acceptance"]) / M
    assert 0.2 < acc < 0.95                                 # drafts are both accepted and rejected
    assert _chi2(ref, _joint(got, 5, 6, 4)) < 37.70
    seq = pipe.generate_tokens([1] * M, seed=1, **kw)
    assert _chi2(ref, _joint(seq, 5, 6, 4)) > 37.70          # the test tells ZipAR's distribution from sequential's
    orig = sjd.keyed_uniform
    try:   # u = 0: every draft passes the acceptance test
        sjd.keyed_uniform = lambda seed, i, t, purpose, vocab=0: (orig(seed, i, t, purpose, vocab) *
                                                                  (purpose != sjd._ACCEPT))
        bad = pipe.generate_tokens([1] * M, seed=2, zipar_window=1, sjd_window=3, **kw)
    finally:
        sjd.keyed_uniform = orig
    assert _chi2(ref, _joint(bad, 5, 6, 4)) > 37.70


def test_sjd_zipar_batch_invariance_and_determinism():
    check_batch_invariance(pipe_for(), [1, 2, 3], 4, cfg=3.0, top_k=20, top_p=0.9, sjd_window=4, zipar_window=2)
    # look-ahead queries read slots not written yet: an image must not see what an earlier image left in the pool
    flat = pipe_for(vocab_size=4, std=0.1, seed=1)
    kw = dict(cfg=1.0, top_k=0, zipar_window=1, sjd_window=3)
    first = flat.generate_tokens([3, 5], seed=3, **kw)[0].clone()   # image 0 on a fresh pool
    assert torch.equal(flat.generate_tokens([3], seeds=[ops.mix_seed(3, 0)], **kw)[0], first)  # after image 1


def test_sjd_zipar_takes_fewer_passes_on_a_predictable_model():
    """The model predicts token 5 everywhere (test_sjd's construction): after each row's first pass its drafts are
    right, so SJD + ZipAR needs far fewer passes than ZipAR, with the same tokens."""
    pipe = make_predictable_(pipe_for(grid=6))
    for w in (2, 3):
        ref = pipe.generate_tokens([1, 2], cfg=1.0, top_k=0, seed=0, zipar_window=w).clone()
        assert pipe.last_forward_passes == zipar.num_passes(6, 6, w) and (ref == 5).all()
        out = pipe.generate_tokens([1, 2], cfg=1.0, top_k=0, seed=0, zipar_window=w, sjd_window=6)
        assert torch.equal(out, ref)
        # row 0 takes two passes (its first draft is random), later rows follow a pass or two behind the row
        # above (their drafts come from the row above): 8 passes for w = 2, 9 for w = 3 (ZipAR: 20, 24)
        assert pipe.last_forward_passes <= zipar.num_passes(6, 6, w) // 2, (w, pipe.last_stats)
        assert min(pipe.last_stats["sjd_acceptance"]) > 0.6


def test_per_query_counts_visibility():
    """(Q, h) per-query counts: each row of the mask is the (h,)-counts mask of that query alone; the fast
    dispatch of such a Visibility runs the reference attention."""
    h, tpr, P = 3, 4, 1
    slots = torch.tensor([0, 3, 4, 7, 9, 12], dtype=torch.int32)
    counts = torch.tensor([[0, 0, 0], [2, 0, 0], [4, 0, 0], [4, 2, 0], [4, 4, 1], [4, 3, 3]], dtype=torch.int32)
    got = ops.zipar_visibility_mask(slots, counts, P, tpr, 13)
    for q in range(6):
        assert torch.equal(got[q], ops.zipar_visibility_mask(slots[q:q + 1], counts[q], P, tpr, 13)[0])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 13, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    vis = zipar.Visibility(slots, counts, P, tpr, 13)
    assert torch.equal(ops.zipar_attention(q, k, v, vis, backend="fast"), ops.zipar_attention_ref(q, k, v, vis))


def test_sjd_zipar_relaxed_acceptance():
    pipe = pipe_for(grid=4)
    kw = dict(cfg=2.0, top_k=0, seed=2, sjd_window=4, zipar_window=2)
    strict = pipe.generate_tokens([1, 2], **kw).clone()
    assert torch.equal(pipe.generate_tokens([1, 2], sjd_relaxed=1, **kw), strict)   # cluster = the token
    assert pipe.generate_tokens([1, 2], sjd_relaxed=8, **kw).shape == (2, 16)


@pytest.mark.parametrize("kw,match", [(dict(sjd_window=2, zipar_window=2, zipar_mask="official"), "exact"),
                                      (dict(sjd_window=2, zipar_window=0), "zipar_window"),
                                      (dict(sjd_window=2, zipar_window=3), "zipar_window")])
def test_bad_sjd_zipar_inputs(kw, match):
    pipe = pipe_for(grid=2)
    with pytest.raises(ValueError, match=match):
        pipe.generate_tokens([0], **kw)


@pytest.mark.parametrize("w,L,std", [(2, 8, 0.1), (1, 3, 0.1), (3, 6, 0.5)])
def test_committed_distributions_are_plain_zipar_teacher_forced(monkeypatch, w, L, std):
    """Every token SJD + ZipAR commits was tested against p_new equal to plain ZipAR's distribution for it, given the
    same earlier tokens (plain ZipAR teacher-forced with SJD's tokens): checks every context and every K/V slot read,
    also where greedy decoding cannot (the argmax unchanged). A flat model (std 0.1) accepts whole rows at once."""
    from var_rt.runtime import llamagen as engine
    pipe = pipe_for(vocab_size=4, std=std, seed=1)
    kw = dict(cfg=1.0, top_k=0)
    used, orig = {}, sjd._test_window

    def spy(probs, targets, *args):
        done, ok = orig(probs, targets, *args)
        used.update((t, probs[k].clone()) for k, t in enumerate(list(targets)[:done]))
        return done, ok
    monkeypatch.setattr(sjd, "_test_window", spy)
    ref = {}

    def forced(logits, seeds, p, i, s):   # logits (1, S, V): cfg 1, no filter -> softmax is the draw's distribution
        ref.update((t, logits[0, k].softmax(-1)) for k, t in enumerate(p.steps))
        return tokens[:, p.targets]
    monkeypatch.setattr(engine, "draw", forced)
    for b, lab in enumerate([3, 5]):
        used.clear()
        tokens = pipe.generate_tokens([lab], seed=3 + b, sjd_window=L, zipar_window=w, **kw).clone()
        assert pipe.last_stats["sjd_acceptance"][0] > 0.3
        ref.clear()
        pipe.generate_tokens([lab], seed=0, zipar_window=w, **kw)
        assert sorted(used) == sorted(ref) == list(range(36))
        for t in range(36):
            torch.testing.assert_close(used[t], ref[t], rtol=1e-5, atol=1e-6, msg=f"image {b}, token {t}")
