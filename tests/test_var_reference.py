"""The reference VAR sampler against an independent restatement of the official computation."""
import pytest
import torch

import var_rt
from var_rt import ops
from var_rt.pipeline import VARPipeline

from conftest import official_vae_state_dict, official_var_state_dict, tiny_vae, tiny_var
from official_ref import teacher_forced_logits, teacher_inputs


@pytest.mark.parametrize("patch_nums,shared", [((1, 2, 3, 4), False), ((1, 2, 4), True), ((1, 3, 4), False)])
def test_greedy_tokens_match_official_teacher_forced_forward(patch_nums, shared):
    var, vae = tiny_var(depth=3, patch_nums=patch_nums, shared_aln=shared), tiny_vae()
    pipe = VARPipeline(vae, var=var)
    labels = [3, 7, 0]
    cfg = 2.5
    images = pipe(labels, cfg=cfg, top_k=1, top_p=1.0, seed=0)
    toks = pipe.last_tokens
    vsd, asd = official_var_state_dict(var), official_vae_state_dict(vae)
    x_in, f_hat = teacher_inputs(asd, patch_nums, toks)
    B, K = len(labels), len(patch_nums)
    labels2 = torch.tensor(labels + [var.cfg.num_classes] * B)
    logits = teacher_forced_logits(vsd, patch_nums, labels2, x_in.repeat(2, 1, 1), var.cfg.heads)
    for si, (b, e) in enumerate(var.cfg.scale_bounds()):
        t = cfg * si / (K - 1)
        mixed = (1 + t) * logits[:B, b:e] - t * logits[B:, b:e]
        assert torch.equal(mixed.argmax(-1), toks[si]), f"scale {si}"
    ref_img = vae.decoder(vae.post_quant_conv(f_hat)).clamp(-1, 1).add(1).mul(0.5)
    torch.testing.assert_close(images, ref_img, atol=1e-4, rtol=1e-4)


def test_same_seed_same_images_and_seed_matters():
    pipe = VARPipeline(tiny_vae(), var=tiny_var())
    a = pipe([1, 2, 3], seed=5)
    ta = [t.clone() for t in pipe.last_tokens]
    b = pipe([1, 2, 3], seed=5)
    assert torch.equal(a, b)
    pipe([1, 2, 3], seed=6)
    assert any(not torch.equal(x, y) for x, y in zip(ta, pipe.last_tokens))


def test_request_tokens_do_not_depend_on_batch_composition():
    pipe = VARPipeline(tiny_vae(), var=tiny_var())
    seeds = var_rt.pipeline.image_seeds(11, range(3))
    pipe([4, 5, 6], seeds=seeds, top_k=0, top_p=1.0)
    full = [t[1].clone() for t in pipe.last_tokens]
    pipe([5], seeds=seeds[1:2], top_k=0, top_p=1.0)
    assert all(torch.equal(a, b[0]) for a, b in zip(full, pipe.last_tokens))


def test_images_in_unit_range_and_shape():
    pipe = VARPipeline(tiny_vae(), var=tiny_var())
    im = pipe([0, 9], cfg=4, top_k=10, top_p=0.9, temperature=[1.2, 1.0, 1.0, 0.8], seed=0)
    assert im.shape == (2, 3, pipe.image_size, pipe.image_size) and im.dtype == torch.float32
    assert im.min() >= 0 and im.max() <= 1


@pytest.mark.parametrize("kw,msg", [
    (dict(class_labels=[10]), "outside"), (dict(class_labels=[-1]), "outside"), (dict(class_labels=[]), "empty"),
    (dict(cfg=-1), "cfg"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(temperature=[1.0, 1.0]), "one per scale"), (dict(preset="nope"), "preset"),
])
def test_bad_sampling_input_is_named(kw, msg):
    pipe = VARPipeline(tiny_vae(), var=tiny_var())
    args = dict(class_labels=[1])
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        pipe(**args)


def test_official_filter_semantics():
    """filter_logits_ref == the official sample_with_top_k_top_p_ masking, restated here."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 97, generator=g) * 3
    for top_k, top_p in [(0, 0.0), (10, 0.0), (0, 0.8), (20, 0.95), (97, 0.5), (1, 0.9)]:
        ref = logits.clone()
        if top_k > 0:
            ref.masked_fill_(ref < ref.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True), -torch.inf)
        if top_p > 0:
            sl, si = ref.sort(dim=-1, descending=False)
            rm = sl.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
            rm[..., -1:] = False
            ref.masked_fill_(rm.scatter(si.ndim - 1, si, rm), -torch.inf)
        assert torch.equal(ops.filter_logits_ref(logits, top_k, top_p), ref), (top_k, top_p)


def test_sampler_distribution_matches_softmax():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0, 0.5]]])
    n = 4000
    seeds = torch.arange(n)
    toks = ops.sample_tokens_ref(logits.expand(n, 1, 5), seeds, step=0, top_k=4, top_p=1.0, temperature=1.3)
    freq = torch.bincount(toks.flatten(), minlength=5).float() / n
    want = (ops.filter_logits_ref(logits[0, 0], 4, 1.0) / 1.3).softmax(-1)
    assert freq[3] == 0  # filtered out by top_k
    assert (freq - want).abs().max() < 0.03
