"""CoDe: drafter on the coarse scales, refiner from scale N with one block-causal prefill."""
import pytest
import torch

from var_rt.pipeline import VARPipeline
from var_rt.runtime.kv_pool import KVPool

from conftest import official_var_state_dict, tiny_vae, tiny_var


@pytest.mark.parametrize("N", [1, 2, 3])
def test_refiner_equal_to_drafter_reproduces_single_model(N):
    var, vae = tiny_var(depth=2), tiny_vae()
    single = VARPipeline(vae, var=var)
    code = VARPipeline(vae, drafter=var, refiner=var, draft_steps=N)
    kw = dict(cfg=3.0, top_k=20, top_p=0.9, temperature=[1.1, 1.1, 1.0, 1.0], seed=7)
    a = single([1, 4, 8], **kw)
    b = code([1, 4, 8], **kw)
    for s, (x, y) in enumerate(zip(single.last_tokens, code.last_tokens)):
        assert torch.equal(x, y), f"scale {s}"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [1, 2, 3])
def test_prefill_logits_equal_incremental_logits(N):
    """The refiner's block-causal prefill over scales 0..N gives the scale-N logits of scale-by-scale decoding."""
    model = tiny_var(depth=3, seed=5)
    cfg = model.cfg
    B = 2
    labels2 = torch.tensor([1, 6, cfg.num_classes, cfg.num_classes])
    g = torch.Generator().manual_seed(0)
    rows = [None] + [torch.randn(B, p * p, cfg.cvae, generator=g) for p in cfg.patch_nums[1:]]
    state = model.prepare(labels2)
    bounds = cfg.scale_bounds()
    kv_inc = [torch.zeros(model.kv_shape(2 * B)) for _ in range(cfg.depth)]
    for s in range(N + 1):
        h = model.forward_tokens(model.scale_input(s, state, rows[s]), state, kv_inc, bounds[s][0])
    inc = model.logits(h)
    kv_pre = [torch.zeros(model.kv_shape(2 * B)) for _ in range(cfg.depth)]
    x = torch.cat([model.scale_input(s, state, rows[s]) for s in range(N + 1)], 1)
    ids = torch.cat([torch.full((p * p,), s, dtype=torch.int32) for s, p in enumerate(cfg.patch_nums[:N + 1])])
    h = model.forward_tokens(x, state, kv_pre, 0, ids, ids)
    pre = model.logits(h[:, bounds[N][0]:bounds[N][1]])
    assert (pre - inc).abs().max() <= 1e-4
    end = bounds[N][1]
    for a, b in zip(kv_inc, kv_pre):  # and the prefill leaves the same KV cache behind
        assert (a[:, :, :, :end] - b[:, :, :, :end]).abs().max() <= 1e-5


def test_peak_kv_memory_is_the_larger_model_not_the_sum():
    vae = tiny_vae()
    drafter, refiner = tiny_var(depth=4, width=128, heads=2), tiny_var(depth=2, seed=1)
    alone = VARPipeline(vae, drafter=drafter, draft_steps=4)
    alone([1, 2], seed=0)
    code = VARPipeline(vae, drafter=drafter, refiner=refiner, draft_steps=2)
    code([1, 2], seed=0)
    st = code.last_stats
    assert st["kv_pool_bytes"] == max(st["kv_bytes_drafter"], st["kv_bytes_refiner"])
    assert st["kv_pool_bytes"] < st["kv_bytes_drafter"] + st["kv_bytes_refiner"]
    assert code.last_stats["kv_pool_bytes"] <= alone.last_stats["kv_pool_bytes"]
    # the pool's views of both models start at the same bytes
    pool = code.kv_pool(2)
    assert pool.views["drafter"][0].data_ptr() == pool.views["refiner"][0].data_ptr() == pool.arena.data_ptr()


def test_drafter_alone_when_n_equals_k():
    var, vae = tiny_var(), tiny_vae()
    a = VARPipeline(vae, var=var)([3], seed=1)
    b = VARPipeline(vae, drafter=var, draft_steps=4)([3], seed=1)
    assert torch.equal(a, b)


def test_mismatched_pairs_and_bad_n_are_named():
    vae = tiny_vae()
    d = tiny_var()
    with pytest.raises(ValueError, match="disagree on vocab"):
        VARPipeline(vae, drafter=d, refiner=tiny_var(vocab=40), draft_steps=2)
    with pytest.raises(ValueError, match="disagree on patch_nums"):
        VARPipeline(vae, drafter=d, refiner=tiny_var(patch_nums=(1, 2, 4, 4)), draft_steps=2)
    with pytest.raises(ValueError, match="disagree on num_classes"):
        VARPipeline(vae, drafter=d, refiner=tiny_var(num_classes=11), draft_steps=2)
    with pytest.raises(ValueError, match="disagree on cvae"):
        VARPipeline(vae, drafter=d, refiner=tiny_var(cvae=4), draft_steps=2)
    for n in (0, 5, -1):
        with pytest.raises(ValueError, match="draft_steps"):
            VARPipeline(vae, drafter=d, refiner=d, draft_steps=n)
    with pytest.raises(ValueError, match="needs a refiner"):
        VARPipeline(vae, drafter=d, draft_steps=2)


def test_code_eval_preset_and_files(tmp_path):
    vae, d, r = tiny_vae(), tiny_var(depth=3), tiny_var(depth=2, seed=2)
    for name, m in (("drafter_2.pth", d), ("refiner_2.pth", r)):
        torch.save(official_var_state_dict(m), tmp_path / name)
    from conftest import official_vae_state_dict
    torch.save(official_vae_state_dict(vae), tmp_path / "vae.pth")
    pipe = VARPipeline.from_checkpoints(drafter=tmp_path / "drafter_2.pth", refiner=tmp_path / "refiner_2.pth",
                                        vae=tmp_path / "vae.pth", draft_steps=2, dtype="fp32")
    with pytest.raises(ValueError, match="one per scale"):  # code-eval has 10 temperatures; this pyramid has 4
        pipe([0, 1], preset="code-eval")
    im = pipe([0, 1], cfg=1.5, top_k=600, top_p=0.96, temperature=[1.1, 1.1, 1.0, 1.0], seed=0)
    assert im.shape[0] == 2
