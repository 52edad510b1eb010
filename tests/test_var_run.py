"""The VAR engine run in pieces (streaming previews) and with teacher-forced tokens (editing): run_var's
`scales`/`state` and `forced` arguments."""
import pytest
import torch

from var_rt import ops
from var_rt.pipeline import VARPipeline
from var_rt.runtime.var import new_state, run_var

from conftest import tiny_var_cfg, tiny_vae_cfg


def engine_args(pipe, labels, seed=3):
    labels = torch.as_tensor(labels)
    params = pipe.sampling_settings(cfg=2.0, top_k=20)
    seeds = torch.tensor([ops.mix_seed(seed, i) for i in range(labels.numel())])
    return (pipe.models, pipe.vae, pipe.schedule, labels, seeds, params, pipe.kv_pool(labels.numel()))


@pytest.mark.parametrize("draft_steps", [None, 2])
@pytest.mark.parametrize("backend", ["torch", "fast"])
def test_pieces_equal_one_call(draft_steps, backend):
    kw = dict(refiner_depth=tiny_var_cfg(depth=1), draft_steps=draft_steps) if draft_steps else {}
    pipe = VARPipeline.random(tiny_var_cfg(), vae_cfg=tiny_vae_cfg(), backend=backend, **kw)
    args = engine_args(pipe, [1, 4, 7])
    K = len(pipe.cfg.patch_nums)
    with ops.use_backend(backend):
        f_one, tok_one = run_var(*args)
        state = new_state(pipe.models, pipe.vae, 3, "cpu")
        for piece in ([0], [1, 2], list(range(3, K))):  # crosses CoDe's drafter -> refiner prefill at N = 2
            run_var(*args, scales=piece, state=state)
    assert torch.equal(state["f_hat"], f_one)
    assert all(torch.equal(a, b) for a, b in zip(state["tokens"], tok_one))


def test_bad_pieces_are_refused():
    pipe = VARPipeline.random(tiny_var_cfg(), vae_cfg=tiny_vae_cfg())
    args = engine_args(pipe, [0])
    with pytest.raises(ValueError, match="contiguous"):
        run_var(*args, scales=[0, 2])
    with pytest.raises(ValueError, match="state"):
        run_var(*args, scales=[1])


def test_forced_tokens_replace_the_draw_where_kept():
    pipe = VARPipeline.random(tiny_var_cfg(), vae_cfg=tiny_vae_cfg())
    args = engine_args(pipe, [2, 5])
    _, free = run_var(*args)
    g = torch.Generator().manual_seed(0)
    target = [torch.randint(0, pipe.cfg.vocab, t.shape, generator=g) for t in free]
    keep = [torch.rand(t.shape, generator=g) < 0.5 for t in free]
    _, got = run_var(*args, forced=list(zip(target, keep)))
    for s, (t, k, x) in enumerate(zip(target, keep, got)):
        assert torch.equal(x[k], t[k]), s
    # keeping nothing is the free generation, token for token
    _, none_kept = run_var(*args, forced=[(t, torch.zeros_like(k)) for t, k in zip(target, keep)])
    assert all(torch.equal(a, b) for a, b in zip(none_kept, free))
