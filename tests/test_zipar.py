"""ZipAR schedule, visibility and attention: pass counts, the official trace, visible sets, Triton kernel.

The Triton kernel runs in the interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported)."""
import os

import torch  # noqa: E402  (torch does not import triton: asking for a GPU here is safe)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest
import torch

from var_rt import ops
from var_rt.models.llamagen import LlamaGenConfig, rope_2d_table
from var_rt.runtime import zipar

# Forward passes for a 24x24 grid, counted by hand: the official generate_zipar.py decodes all of row 0 first
# (24 passes: prefill + 23 single-token steps); row r >= 1 draws its first token w passes after row r-1 drew
# its first, i.e. at pass 24 + (r - 1) w; the last row (r = 23) starts at pass 24 + 22 w and needs 24 passes,
# so the count is 48 + 22 w. w = 24 is sequential: 576 passes, one per token. (Checked against the official
# code's own count, model_forward_times + tokens_per_row: 224 for w = 8, 312 for w = 12.)
PASSES_24 = {1: 70, 2: 92, 4: 136, 8: 224, 12: 312, 24: 576}

# The official ZipAR decode (generate_zipar.py run with a mock model) on a 6x6 and a 5x5 grid with w = 2:
# per pass, per query (input token raster index or -1 = class token, input position raster index or -1,
# token it draws or -1 = logits dropped). Raster index = 6 r + c (resp. 5 r + c).
OFFICIAL_6x6_W2 = [
    [(-1, -1, 0)], [(0, 0, 1)], [(1, 1, 2)], [(2, 2, 3)], [(3, 3, 4)], [(4, 4, 5)], [(5, 5, 6)], [(6, 6, 7)],
    [(7, 7, 8), (5, 11, 12)], [(8, 8, 9), (12, 12, 13)], [(9, 9, 10), (13, 13, 14), (9, 17, 18)],
    [(10, 10, 11), (14, 14, 15), (18, 18, 19)], [(11, 11, -1), (15, 15, 16), (19, 19, 20), (15, 23, 24)],
    [(16, 16, 17), (20, 20, 21), (24, 24, 25)], [(17, 17, -1), (21, 21, 22), (25, 25, 26), (21, 29, 30)],
    [(22, 22, 23), (26, 26, 27), (30, 30, 31)], [(23, 23, -1), (27, 27, 28), (31, 31, 32)],
    [(28, 28, 29), (32, 32, 33)], [(29, 29, -1), (33, 33, 34)], [(34, 34, 35)],
]
OFFICIAL_5x5_W2 = [
    [(-1, -1, 0)], [(0, 0, 1)], [(1, 1, 2)], [(2, 2, 3)], [(3, 3, 4)], [(4, 4, 5)], [(5, 5, 6)],
    [(6, 6, 7), (4, 9, 10)], [(7, 7, 8), (10, 10, 11)], [(8, 8, 9), (11, 11, 12), (8, 14, 15)],
    [(9, 9, -1), (12, 12, 13), (15, 15, 16)], [(13, 13, 14), (16, 16, 17), (13, 19, 20)],
    [(14, 14, -1), (17, 17, 18), (20, 20, 21)], [(18, 18, 19), (21, 21, 22)], [(19, 19, -1), (22, 22, 23)],
    [(23, 23, 24)],
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _as_official(passes, P=1):
    return [[(q.token, q.slot - P, q.target) for q in p.queries] for p in passes]


@pytest.mark.parametrize("w", sorted(PASSES_24))
def test_pass_count_24x24_schedule(w):
    assert len(zipar.zipar_schedule(24, 24, w)) == PASSES_24[w]
    assert zipar.num_passes(24, 24, w) == PASSES_24[w]


def test_pass_count_24x24_pipeline():
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    pipe = LlamaGenPipeline.random(LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=4, grid=24),
                                   std=0.3)
    for w in sorted(PASSES_24):
        pipe.generate_tokens([1], cfg=1.0, top_k=8, seed=0, zipar_window=w)
        assert pipe.last_forward_passes == PASSES_24[w], w
    pipe.generate_tokens([1], cfg=1.0, top_k=8, seed=0)
    assert pipe.last_forward_passes == 576


def test_schedule_is_the_official_trace():
    assert _as_official(zipar.zipar_schedule(6, 6, 2)) == OFFICIAL_6x6_W2
    assert _as_official(zipar.zipar_schedule(5, 5, 2)) == OFFICIAL_5x5_W2


@pytest.mark.parametrize("h", [1, 2, 5, 6])
def test_full_window_is_sequential(h):
    assert zipar.zipar_schedule(h, h, h) == zipar.sequential_schedule(h, h)


def _draw_pass(passes, n):
    at = [-1] * n
    for i, p in enumerate(passes):
        for q in p.queries:
            if q.target >= 0:
                assert at[q.target] == -1, "drawn twice"
                at[q.target] = i
    assert min(at) >= 0, "token never drawn"
    return at


@pytest.mark.parametrize("h,w", [(6, 1), (6, 2), (6, 3), (6, 6), (7, 3), (24, 8)])
def test_every_token_drawn_once_and_fed_the_pass_after(h, w):
    passes = zipar.zipar_schedule(h, h, w)
    at = _draw_pass(passes, h * h)
    fed = {}
    for i, p in enumerate(passes):
        assert len({q.slot for q in p.queries}) == len(p.queries), "two queries write one slot"
        for q in p.queries:
            if q.token >= 0 and not q.placeholder:
                assert q.slot - 1 == q.token
                assert q.token not in fed
                fed[q.token] = i
            if q.placeholder:
                assert at[q.token] < i, "placeholder token not drawn yet"
    assert sorted(fed) == list(range(h * h - 1))           # every token but the last has its true K/V written
    assert all(fed[t] == at[t] + 1 for t in fed)            # ... in the pass right after it is drawn
    if w == h:
        assert all(len(p.queries) == 1 for p in passes)


def _expected_visible(passes, n, P=1):
    """Independent statement of the rule: per pass and query, the prefix, the tokens drawn before this pass that
    come before the query's position in raster order, and the query's own slot."""
    at = _draw_pass(passes, n)
    out = []
    for i, p in enumerate(passes):
        rows = []
        for q in p.queries:
            pos = q.slot - P                                   # raster index of the query's position
            vis = set(range(min(q.slot + 1, P)))
            vis |= {P + t for t in range(n) if at[t] < i and t <= pos}
            vis.add(q.slot)
            rows.append(vis)
        out.append(rows)
    return out


def _vis(p, h, tpr, P=1):
    slots = torch.tensor([q.slot for q in p.queries], dtype=torch.int32)
    return zipar.Visibility(slots, torch.tensor(p.counts, dtype=torch.int32), P, tpr, int(slots.max()) + 1)


@pytest.mark.parametrize("h,w", [(24, 1), (24, 8), (24, 24), (6, 2), (5, 3)])
def test_visibility_mask_is_drawn_predecessors_plus_prefix(h, w):
    passes = zipar.zipar_schedule(h, h, w)
    expected = _expected_visible(passes, h * h)
    for i, p in enumerate(passes):
        m = zipar.visibility_mask(_vis(p, h, h), 1 + h * h)
        for qi, q in enumerate(p.queries):
            assert set(torch.nonzero(m[qi]).flatten().tolist()) == expected[i][qi], (i, q)


def _visible_sets_from_attention(fn, p, h, P=1):
    """With K = 0 every visible key gets the same weight; with V[j] = one-hot(j) the output is the indicator of
    the visible set divided by its size."""
    L = P + h * h
    D = L + (L % 2)
    v = torch.zeros(1, 1, L, D)
    v[0, 0, torch.arange(L), torch.arange(L)] = 1.0
    k = torch.zeros(1, 1, L, D)
    vis = _vis(p, h, h, P)
    q = torch.randn(1, 1, len(p.queries), D)
    o = fn(q, k, v, vis)[0, 0]
    return [set(torch.nonzero(row > 1e-6).flatten().tolist()) for row in o]


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("h,w", [(5, 1), (5, 2), (6, 3), (5, 5)])
def test_attention_sees_exactly_the_visible_set(backend, h, w):
    if backend == "torch":
        fn = ops.zipar_attention_ref
    else:
        kern = pytest.importorskip("var_rt.kernels.zipar_attention")
        fn = lambda q, k, v, vis: kern.zipar_attention(q, k, v, vis.q_slot, vis.counts, vis.prefix, vis.tpr)  # noqa
    passes = zipar.zipar_schedule(h, h, w)
    expected = _expected_visible(passes, h * h)
    for i, p in enumerate(passes):
        assert _visible_sets_from_attention(fn, p, h) == expected[i], i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (4, 2, 8), (2, 1, 20)])
def test_kernel_matches_reference_with_fused_rope(dtype, H, Hkv, D):
    kern = pytest.importorskip("var_rt.kernels.zipar_attention")
    g = torch.Generator().manual_seed(0)
    h, N, P = 6, 2, 1
    L = P + h * h
    rope = rope_2d_table(h, D, 10000.0, P)
    k = torch.randn(N, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(N, Hkv, L, D, generator=g).to(dtype)
    for p in zipar.zipar_schedule(h, h, 2)[::3]:
        vis = _vis(p, h, h, P)
        q = torch.randn(N, H, len(p.queries), D, generator=g).to(dtype)
        ref = ops.zipar_attention_ref(q, k, v, vis, rope=rope)
        out = kern.zipar_attention(q, k, v, vis.q_slot, vis.counts, P, h, rope=rope)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_zipar_tokens_same_with_reference_and_triton_attention():
    pytest.importorskip("var_rt.kernels.zipar_attention")
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    cfg = LlamaGenConfig(dim=32, n_layer=2, n_head=2, vocab_size=48, num_classes=6, grid=6)
    ref = LlamaGenPipeline.random(cfg, std=0.3, backend="torch")
    fast = LlamaGenPipeline(ref.gpt, ref.vq, backend="fast")
    kw = dict(cfg=3.0, top_k=20, top_p=0.9, seed=5, zipar_window=2)
    a = ref.generate_tokens([3], **kw)
    b = fast.generate_tokens([3], **kw)
    assert torch.equal(a, b)
    assert ref.last_forward_passes == fast.last_forward_passes == 2 * 6 + 4 * 2


def test_fast_path_full_window_equals_sequential():
    """Triton attention and, with top-p off, the Triton sampler (noise keyed by seed and raster index)."""
    pytest.importorskip("var_rt.kernels.zipar_attention")
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=48, num_classes=6, grid=4)
    fast = LlamaGenPipeline.random(cfg, std=0.3, backend="fast")
    kw = dict(cfg=3.0, top_k=20, top_p=1.0, seed=1)
    seq = fast.generate_tokens([2], **kw).clone()
    assert torch.equal(fast.generate_tokens([2], zipar_window=4, **kw), seq)
    assert fast.last_forward_passes == 16


@pytest.mark.parametrize("bad", [0, 7, -1, 2.0, True])
def test_window_outside_row_is_rejected(bad):
    with pytest.raises(ValueError, match="zipar_window"):
        zipar.zipar_schedule(6, 6, bad)


# Ahead-of-time compile checks (sm_90 / sm_80) of the ZipAR attention and the other LlamaGen kernels:
# tests/test_kernels_llamagen.py::test_llamagen_kernels_compile_for_sm90_and_sm80.
