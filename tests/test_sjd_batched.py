"""Batched SJD (runtime.sjd.generate_batch / sjd_pass): tokens equal the per-image Python loop (generate_one) bit for
bit, whatever the batch (1 vs 3, with and without CFG), greedy equals sequential decoding, every pass has the same
shapes and never syncs with the host, the keyed random source does not depend on the tensor it is computed in, and
(CUDA only) one captured pass replayed equals the eager passes. The distribution test is tests/test_sjd.py's
chi-square (the pipeline runs this batched path)."""
import os

import torch  # noqa: E402
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from var_rt import ops
from var_rt.runtime import sjd

from conftest import tiny_llamagen_pipe

pytestmark = pytest.mark.usefixtures("one_thread")


def pipe_for(grid=4, **kw):
    return tiny_llamagen_pipe(grid=grid, **kw)


def settings_for(pipe, **kw):
    return pipe.sampling_settings(**{**dict(cfg=1.0, top_k=0), **kw})


def run_batch(pipe, labels, seeds, settings, L, **kw):
    dev = pipe.device
    labels, seeds = torch.tensor(labels, device=dev), torch.tensor(seeds, dtype=torch.int64, device=dev)
    pool = pipe.kv_pool(labels.numel() * (2 if settings.cfg > 1.0 else 1))
    return sjd.generate_batch(pipe.gpt, labels, seeds, pool.views["llamagen"], settings, L, pipe.backend, **kw)


@pytest.mark.parametrize("kw", [dict(cfg=1.0, top_k=0), dict(cfg=3.0, cfg_interval=4, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("L", [1, 3, 20])
def test_batched_equals_per_image_loop(kw, L):
    """Image b of a batch of 3 == the same image alone in a batch of 1 == generate_one's Python loop (independent
    acceptance / resample / redraft code on the same keyed noise): tokens, passes, accepted and tested drafts."""
    pipe = pipe_for()
    s = settings_for(pipe, **kw)
    labels, seeds = [1, 7, 3], [ops.mix_seed(5, i) for i in range(3)]
    tok, passes, acc, tested = run_batch(pipe, labels, seeds, s, L)
    assert 0 < int(acc.sum()) < int(tested.sum())         # drafts are both accepted and rejected
    kv1 = pipe.kv_pool(2 if s.cfg > 1.0 else 1).views["llamagen"]
    for b in range(3):
        one = run_batch(pipe, labels[b:b + 1], seeds[b:b + 1], s, L)
        assert torch.equal(one[0][0], tok[b]) and [int(x[0]) for x in one[1:]] == [int(passes[b]), int(acc[b]),
                                                                                   int(tested[b])]
        t, i, a, n = sjd.generate_one(pipe.gpt, labels[b], seeds[b], kv1, s, L, pipe.backend)
        assert torch.equal(t, tok[b]), b
        assert (i, a, n) == (int(passes[b]), int(acc[b]), int(tested[b]))


def test_fast_backend_batched_equals_per_image_loop():
    """The same on the fast backend: the per-row-slot RoPE/KV-write and attention kernels (interpreted without a
    GPU) in both the batched pass and generate_one."""
    pytest.importorskip("var_rt.kernels.zipar_attention")
    pipe = pipe_for(backend="fast", grid=3)
    s = settings_for(pipe, cfg=2.0, top_k=0)
    labels, seeds = [1, 7], [ops.mix_seed(3, i) for i in range(2)]
    tok, passes, acc, tested = run_batch(pipe, labels, seeds, s, 3)
    kv1 = pipe.kv_pool(2).views["llamagen"]
    for b in range(2):
        t, i, a, n = sjd.generate_one(pipe.gpt, labels[b], seeds[b], kv1, s, 3, pipe.backend)
        assert torch.equal(t, tok[b]) and (i, a, n) == (int(passes[b]), int(acc[b]), int(tested[b])), b


def test_pipeline_batch_invariance_and_stats():
    pipe = pipe_for(grid=6)
    kw = dict(cfg=3.0, top_k=20, seed=4, sjd_window=4)
    a = pipe.generate_tokens([1, 2, 3], **kw).clone()
    stats = dict(pipe.last_stats)
    assert pipe.last_forward_passes == max(stats["sjd_passes"]) and len(stats["sjd_acceptance"]) == 3
    for i, lab in enumerate([1, 2, 3]):
        one = pipe.generate_tokens([lab], seeds=[ops.mix_seed(4, i)], **{k: v for k, v in kw.items() if k != "seed"})
        assert torch.equal(one[0], a[i])
        assert pipe.last_stats["sjd_passes"][0] == stats["sjd_passes"][i]
        assert pipe.last_stats["sjd_acceptance"][0] == stats["sjd_acceptance"][i]


@pytest.mark.parametrize("check_every", [1, 3, 100])
def test_greedy_batched_equals_sequential(check_every):
    pipe = pipe_for()
    seq = pipe.generate_tokens([1, 7, 3], seed=11, top_k=1, cfg=4.0).clone()
    s = settings_for(pipe, cfg=4.0, top_k=1)
    tok, passes, _, _ = run_batch(pipe, [1, 7, 3], [0, 1, 2], s, 5, check_every=check_every)
    assert torch.equal(tok, seq)
    assert int(passes.max()) <= 16


def _record_step(monkeypatch, gpt):
    shapes, orig = [], gpt.step

    def spy(h, slots, kv, vis, backend=None):
        shapes.append((tuple(h.shape), h.dtype, tuple(slots.shape), slots.dtype, vis))
        return orig(h, slots, kv, vis, backend)
    monkeypatch.setattr(gpt, "step", spy)
    return shapes


def test_static_shapes_every_pass(monkeypatch):
    """Every pass calls the model once, with the same shapes, whatever the images' progress (padding at the end,
    finished images); the loop runs whole groups of check_every passes, at most h*w."""
    pipe = pipe_for()
    shapes = _record_step(monkeypatch, pipe.gpt)
    s = settings_for(pipe, cfg=2.0)
    _, passes, _, _ = run_batch(pipe, [1, 2, 3], [7, 8, 9], s, 6, check_every=3)
    assert len(shapes) == -(-int(passes.max()) // 3) * 3 and len(set(shapes)) == 1
    assert shapes[0][:3] == ((6, 6, 64), torch.float32, (6, 6))
    shapes.clear()
    run_batch(pipe, [1], [7], s, 40, check_every=100)             # window longer than the image: capped at h*w
    assert len(shapes) == 16 and len(set(shapes)) == 1


class _Syncs(TorchDispatchMode):
    """Counts the ops that read a device value on the host (item / bool / int / float, data-dependent shapes)."""
    SYNC = ("_local_scalar_dense", "nonzero", "masked_select", "equal", "unique")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNC):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_inside_a_pass(monkeypatch):
    pipe = pipe_for()
    for kw in (dict(cfg=1.0, top_k=0), dict(cfg=3.0, cfg_interval=2, top_k=10, top_p=0.8)):
        s = settings_for(pipe, **kw)
        labels = torch.tensor([1, 2, 3])
        st = sjd.init_state(pipe.gpt, labels, torch.tensor([4, 5, 6]), 4, s.cfg > 1.0)
        kv = pipe.kv_pool(6 if s.cfg > 1.0 else 3).views["llamagen"]
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist inside a pass"))
        with _Syncs() as mode:
            for _ in range(3):
                sjd.sjd_pass(pipe.gpt, st, kv, s, pipe.backend)
        monkeypatch.undo()
        assert mode.seen == [], mode.seen
        assert int(st.it) == 3 and int(st.a.min()) >= 3
    with _Syncs() as mode:   # the detector works
        bool(torch.tensor([1]).sum() > 0)
    assert mode.seen


def test_keyed_uniform_is_shape_independent_and_uniform():
    seeds = torch.tensor([3, 2 ** 62 + 5, 0])
    t = torch.arange(5).view(1, 5) + torch.tensor([[0], [7], [100]])
    u = sjd.keyed_uniform(seeds.view(3, 1), torch.tensor(4), t, sjd._DRAFT, 33)      # (3, 5, 33)
    for b in range(3):
        for j in range(5):
            one = sjd.keyed_uniform(int(seeds[b]), 4, int(t[b, j]), sjd._DRAFT, 33)
            assert torch.equal(u[b, j], one)
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    big = sjd.keyed_uniform(torch.tensor(9), torch.arange(64).view(-1, 1), 0, sjd._ACCEPT, 1000).flatten()
    hist = torch.histc(big.float(), bins=10, min=0, max=1)
    assert (hist - 6400).abs().max() < 400                      # ~5 sigma
    assert not torch.equal(sjd.keyed_uniform(9, 0, 0, sjd._ACCEPT, 50), sjd.keyed_uniform(9, 0, 0, sjd._DRAFT, 50))
    assert not torch.equal(sjd.keyed_uniform(9, 0, 0, sjd._ACCEPT, 50), sjd.keyed_uniform(10, 0, 0, sjd._ACCEPT, 50))


def test_warm_up_restores_the_state(monkeypatch):
    """The graph path's warm-up pass (run before capture) leaves the state as it found it: with a stand-in capture
    that only warms up and then replays eagerly, the tokens are those of the eager loop (the CPU part of the CUDA
    graph path)."""
    pipe = pipe_for()
    s = settings_for(pipe, cfg=2.0)
    eager = run_batch(pipe, [1, 2, 3], [7, 8, 9], s, 4)

    class Fake:
        def __init__(self, run):
            self.replay = run
    monkeypatch.setattr(sjd, "_capture_pass", lambda run, st: (sjd._warm_up(run, st), Fake(run))[1])
    for x, y in zip(eager, run_batch(pipe, [1, 2, 3], [7, 8, 9], s, 4, graph=True)):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cuda_graph_replay_equals_eager(cfg):
    """One captured pass replayed in the loop == the same passes run eagerly (fast backend, same device)."""
    pipe = pipe_for(backend="fast", device="cuda", grid=6)
    s = settings_for(pipe, cfg=cfg, top_k=20)
    labels, seeds = [1, 2, 3, 4], [10, 11, 12, 13]
    eager = run_batch(pipe, labels, seeds, s, 5, graph=False)
    graph = run_batch(pipe, labels, seeds, s, 5, graph=True)
    for x, y in zip(eager, graph):
        assert torch.equal(x, y)
    assert int(graph[1].max()) < 36 or cfg > 1.0
    seq = pipe.generate_tokens(labels, seeds=seeds, top_k=1, cfg=cfg).clone()     # the pipeline path, greedy
    assert torch.equal(pipe.generate_tokens(labels, seeds=seeds, top_k=1, cfg=cfg, sjd_window=5), seq)
