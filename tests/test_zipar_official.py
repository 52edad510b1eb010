"""zipar_mask="official": the official ZipAR code's visibility (a plain lower triangle over slots, zero-initialised
KV cache), checked against an independent restatement of the official decode loop; "exact" stays the default."""
import os

import torch  # noqa: E402
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest
import torch.nn.functional as F

from var_rt import ops
from var_rt.llamagen_pipeline import LlamaGenPipeline, draw_tokens
from var_rt.models.llamagen import LlamaGenConfig, rope_2d_table
from var_rt.runtime import zipar

pytestmark = pytest.mark.usefixtures("one_thread")


def official_loop(gpt, label, seed, w, top_k, top_p):
    """The official generate_zipar.py decode restated (cfg 1): a per-layer K/V cache of zeros, every pass writes its
    queries' K/V at their positions, then each query attends to ALL cache slots <= its own (dense lower triangle),
    whatever they hold. Same schedule (zipar_schedule, itself checked against the official trace)."""
    c = gpt.cfg
    n, L = c.grid * c.grid, 1 + c.grid * c.grid
    H, D = c.n_head, c.head_dim
    tab = rope_2d_table(c.grid, D)
    cache = [(torch.zeros(1, H, L, D), torch.zeros(1, H, L, D)) for _ in gpt.layers]
    tokens = torch.zeros(n, dtype=torch.int64)
    seeds = torch.tensor([ops.mix_seed(seed, 0)])
    for p in zipar.zipar_schedule(c.grid, c.grid, w):
        slots = torch.tensor([q.slot for q in p.queries])
        h = torch.stack([gpt.cls_embedding.embedding_table.weight[label] if q.token < 0
                         else gpt.tok_embeddings.weight[tokens[q.token]] for q in p.queries])[None]   # (1, Q, C)
        causal = torch.arange(L).view(1, -1) <= slots.view(-1, 1)                                    # (Q, L)
        for blk, (kc, vc) in zip(gpt.layers, cache):
            x = blk.attention_norm(h)
            q, k, v = (t.view(1, -1, H, D) for t in blk.attention.wqkv(x).split(c.dim, -1))
            q, k = ops.apply_rope(q, tab[slots]), ops.apply_rope(k, tab[slots])
            kc[:, :, slots], vc[:, :, slots] = k.transpose(1, 2), v.transpose(1, 2)
            s = (q.transpose(1, 2) @ kc.transpose(-1, -2)) / D ** 0.5
            o = s.masked_fill(~causal, float("-inf")).softmax(-1) @ vc                               # (1, H, Q, D)
            h = h + blk.attention.wo(o.transpose(1, 2).reshape(1, -1, c.dim))
            x = blk.ffn_norm(h)
            h = h + blk.feed_forward.w2(F.silu(blk.feed_forward.w1(x)) * blk.feed_forward.w3(x))
        logits = gpt.output(gpt.norm(h)).float()
        sq = [i for i, q in enumerate(p.queries) if q.target >= 0]
        steps = [p.queries[i].target for i in sq]
        tokens[steps] = draw_tokens(logits[:, sq], seeds, steps, top_k, top_p, 1.0)[0]
    return tokens


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("grid,w", [(5, 2), (6, 3), (4, 1)])
def test_official_mask_equals_restated_official_loop(backend, grid, w):
    if backend == "fast":
        pytest.importorskip("var_rt.kernels.zipar_attention")
    cfg = LlamaGenConfig(dim=32, n_layer=2, n_head=2, vocab_size=48, num_classes=6, grid=grid)
    pipe = LlamaGenPipeline.random(cfg, std=0.3, backend=backend)
    kw = dict(cfg=1.0, top_k=12, top_p=0.95, seed=3, zipar_window=w)   # top-p < 1: the torch draw
    exact = pipe.generate_tokens([2], **kw).clone()          # fills the (reused) KV pool with this generation
    for label in (2, 5):
        got = pipe.generate_tokens([label], zipar_mask="official", **kw)[0]
        want = official_loop(pipe.gpt, label, 3, w, 12, 0.95)
        assert torch.equal(got, want), (label, got, want)
    assert not torch.equal(pipe.generate_tokens([2], zipar_mask="official", **kw), exact)   # the modes differ
    assert torch.equal(pipe.generate_tokens([2], **kw), exact)                                # exact: unchanged


def test_sequential_is_the_same_in_both_modes():
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=48, num_classes=6, grid=4)
    pipe = LlamaGenPipeline.random(cfg, std=0.3, backend="torch")
    a = pipe.generate_tokens([1, 4], cfg=3.0, top_k=10, seed=2).clone()
    assert torch.equal(pipe.generate_tokens([1, 4], cfg=3.0, top_k=10, seed=2, zipar_mask="official"), a)
    assert torch.equal(pipe.generate_tokens([1, 4], cfg=3.0, top_k=10, seed=2, zipar_window=4,
                                            zipar_mask="official"), a)


def test_official_visibility_mask_is_the_lower_triangle():
    for p in zipar.zipar_schedule(6, 6, 2):
        slots = torch.tensor([q.slot for q in p.queries], dtype=torch.int32)
        vis = zipar.Visibility(slots, torch.tensor(p.counts, dtype=torch.int32), 1, 6, int(slots.max()) + 1, True)
        m = zipar.visibility_mask(vis, 37)
        assert torch.equal(m, torch.arange(37).view(1, -1) <= slots.long().view(-1, 1))


@pytest.mark.parametrize("bad", ["Exact", "", None, 1])
def test_bad_mask_is_rejected(bad):
    pipe = LlamaGenPipeline.random(LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=2, grid=2),
                                   backend="torch")
    with pytest.raises(ValueError, match="zipar_mask"):
        pipe.generate_tokens([0], zipar_mask=bad)
