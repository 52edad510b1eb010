"""Speculative Jacobi Decoding (SJD; Teng et al., ICLR 2025) for LlamaGen c2i, raster order or with ZipAR.

State per image: the accepted prefix (tokens 0..a-1) and a window of L draft tokens a..a+L-1, each with the
distribution it was drawn from (p_draft). One pass = one forward of the window: L queries (the last ones padding at the
end of the grid) at slots P+a-1 .. P+a+L-2, inputs token a-1 (the class token when a = 0) and drafts a..a+L-2, causal
visibility (a query sees every slot <= its own: all accepted tokens, then the window's earlier drafts, written in
this same pass; slots of rejected drafts are rewritten by a later pass before any accepted token reads them). Query
i gives p_new for position a+i (the official draw's distribution: CFG, cfg_interval, temperature, top-k, top-p).
Drafts are tested left to right: accept x with probability min(1, p_new(x) / p_draft(x)); at the first rejection
the position is resampled from the normalised residual max(0, p_new - p_draft) and testing stops. Accepted drafts
and the resampled token are committed; the rest of the window is redrafted from this pass's p_new at those
positions, and positions new to the window from the last query's p_new. The first window is uniform random tokens.
This is speculative sampling per position, so the output has the distribution of sequential decoding; with
top_k = 1 it is sequential greedy decoding token for token.

Randomness: every draw (acceptance uniform, residual resample, redraft, first drafts) uses a counter-based keyed
source computed on the device (keyed_uniform: an integer hash of (image seed, pass, raster index, purpose[, vocab
index]) -> float64 uniform; a draw is argmax(q / Exp(1)) over the vocabulary), so an image depends only on its seed
and no draw creates a generator or syncs with the host.

Batched (generate_batch, what LlamaGenPipeline runs for plain SJD): all B images at once, every pass the same shapes:
N = B (2B with CFG) KV rows x L queries. Image b's window holds positions a_b .. a_b+L-1 (a_b its accepted prefix, a
device tensor), its queries at slots a_b .. a_b+L-1 of its own rows (clamped to the last slot past the end:
padding), per-row RoPE, KV write and causal visibility (LlamaGenGPT.step with (N, Q) slots: the torch reference for
the write and the attention, the backend's GEMMs / norms / SwiGLU). Acceptance, resample and redraft are tensor ops
(sjd_pass); the Python loop syncs once every `check_every` passes to see whether all images are done (at most h*w
passes). On CUDA with the fast backend one pass is captured as a CUDA graph and replayed. generate_one is the same
algorithm as a per-image Python loop (the reference of the tests): same shapes, same keys, the same tokens.
SJD + ZipAR and relaxed acceptance run per image, eagerly (generate_one_zipar, generate_one with neighbours).

SJD + ZipAR (generate_one_zipar, window w, "exact" mask): the target is plain ZipAR's distribution, so with top_k = 1
the tokens are plain ZipAR's (same w). Token (r, c) is drawn by plain ZipAR at pass S_r + c (runtime.zipar) and sees
the rows above as they stand then: counts_at(S_r + c) tokens of each row (its own row: its c predecessors), plus the
placeholder input at (r, 0) when plain ZipAR uses one. Each query here gets exactly those per-query counts (a
(Q, h) Visibility: the torch reference attention; the Triton kernel takes one (h,) row). A row r keeps a window of
up to L drafts after its a accepted tokens; position (r, c) is *testable* when every row above has accepted the
tokens its context needs (the ZipAR rule on accepted tokens: row r-1 has min(c + w, tpr) of them, and so on up),
so a row starts once the row above has w accepted tokens. One forward runs every row's window; each row tests its
testable prefix left to right as above (accept, resample, redraft). Once the row above has started, a row's window
also runs its untestable positions (look-ahead: their p_new only redrafts, their K/V lands on slots that no
testable query reads before they are rewritten), and a row that has not started gets its drafts from the committed
p_new of the row above. K/V: the slot of accepted token (r, j) is exact once the testable query drawing (r, j + 1)
has run (final token and context; no window writes it after (r, j + 1) is committed). Until then a later row does not
read it: it needs (r, j) only where (r, j + 1) is testable too (both are drawn in the same plain-ZipAR pass), and
then row r's window starts at (r, j + 1) and rewrites the slot first, in the same pass. The slot of a
row's last token held the next row's placeholder input: a K/V-only query writes the real token once the next row has
started (until then it reads as not yet accepted). "official" mask: not supported (it reads undecoded slots,
which SJD fills with drafts).

relaxed (off by default, 0): GSD-style relaxed acceptance, an approximation that changes the distribution: a
draft x is also accepted when p_new puts enough mass on its k nearest codebook neighbours (`neighbours`: (V, k)
token ids from the VQ codebook embeddings): the test uses p_new(cluster(x)) in place of p_new(x).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from var_rt import ops
from var_rt.runtime.llamagen import cfg_on, filter_logits
from var_rt.runtime import zipar
from var_rt.runtime.zipar import Visibility

_STREAM = 0x5D1   # mixed into every key: SJD's streams differ from the sequential draw's
_ACCEPT, _RESAMPLE, _DRAFT, _INIT, _BELOW = 1, 2, 3, 4, 5   # each (pass, position, purpose) keys one draw
_M32 = 0xFFFFFFFF


def check_window(L) -> int:
    if isinstance(L, bool) or not isinstance(L, int) or L < 0:
        raise ValueError(f"sjd_window {L!r}: expected an int >= 0 (0 = off; the number of draft tokens per pass)")
    return L


def check_settings(L: int, relaxed, zipar_window, zipar_mask: str, tpr: int) -> None:
    """The rules of an SJD call (sjd_window L >= 1 or sjd_relaxed given), before any work: a valid ZipAR window
    and the "exact" mask with ZipAR (the official mask reads undecoded slots, which SJD fills with drafts), L >= 1,
    relaxed an int >= 0. ValueError naming the first broken rule."""
    if zipar_window is not None:
        zipar.check_window(zipar_window, tpr)
        if zipar.check_mask(zipar_mask) != "exact":
            raise ValueError(f"zipar_mask {zipar_mask!r} with sjd_window: SJD + ZipAR supports the 'exact' mask "
                             f"only (the official mask reads undecoded slots, which SJD fills with drafts)")
    if L < 1:
        raise ValueError(f"sjd_relaxed={relaxed!r} needs sjd_window >= 1")
    if isinstance(relaxed, bool) or not isinstance(relaxed, int) or relaxed < 0:
        raise ValueError(f"sjd_relaxed {relaxed!r}: expected an int >= 0 (0 = exact acceptance)")


# ---- the keyed random source: integer hashing on the device, no generator, no host sync -----------------------
def _mix32(x):
    """A 32-bit finaliser (lowbias32 shape) on int64 tensors holding values in [0, 2^32). The multipliers are odd and
    below 2^31, so every product fits int64: the same bits on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x446CA68B) & _M32
    return x ^ (x >> 16)


def keyed_uniform(seed, i, t, purpose: int, vocab: int = 0):
    """Uniforms in (0, 1), float64, a pure function of the key (image seed, pass i, raster index t, purpose[, vocab
    index]): seed (int64 >= 0), i, t int64 tensors (or ints) broadcastable together -> their broadcast shape, with a
    last dim of `vocab` (one uniform per vocabulary index) when vocab > 0. Integer hashing then one exact conversion:
    a key gives the same value whatever the batch or tensor shape it is computed in (batched == per image)."""
    seed, i, t = (torch.as_tensor(x, dtype=torch.int64) for x in (seed, i, t))
    h = _mix32((seed & _M32) ^ _mix32(((seed >> 32) & _M32) ^ _STREAM))
    h = _mix32(h ^ (((i << 3) | purpose) & _M32))
    h = _mix32(h ^ (t & _M32))
    if vocab:
        v = _mix32(torch.arange(vocab, device=h.device, dtype=torch.int64) + 0x9E3779B9)
        h = _mix32(h.unsqueeze(-1) ^ v)
    return (h.double() + 0.5) * (1.0 / 2 ** 32)


def _noise(seed: int, i: int, t: int, purpose: int, n: int, device) -> torch.Tensor:
    """Exp(1) noise (n,) float64 of one draw (SJD + ZipAR's per-image loop)."""
    return -keyed_uniform(torch.tensor(seed, device=device), i, t, purpose, n).log()


def _sample(q, seed, i, t, purpose):
    """One token from the (unnormalised) distribution q (V,): argmax(q / Exp(1)) (an exact draw)."""
    return int((q.double() / _noise(seed, i, t, purpose, q.numel(), q.device)).argmax())


def draw(q, seed, i, t, purpose: int):
    """Tensor form of _sample: q (..., V) unnormalised probabilities; seed, i, t int64 tensors broadcastable to
    q's leading dims -> (...) int64, argmax(q / Exp(1)) with the noise of key (seed, i, t, purpose)."""
    return (q.double() / -keyed_uniform(seed, i, t, purpose, q.shape[-1]).log()).argmax(-1)


# ---- the target distribution ----------------------------------------------------------------------------------
def window_probs(logits, t, settings, use_cfg: bool):
    """logits (N, Q, V) fp32 of B images (N = 2B with CFG: conditional rows first) -> (B, Q, V) probabilities of
    the official draw; t (B, Q) int64 raster index of each query's target (cfg_interval)."""
    top_k, top_p, temperature = settings.at(0)
    if use_cfg:
        B = logits.shape[0] // 2
        cond, uncond = logits[:B], logits[B:]
        mixed = uncond + (cond - uncond) * settings.cfg
        on = ~((settings.cfg_interval > -1) & (t - 1 > settings.cfg_interval))   # runtime.llamagen.cfg_on
        logits = torch.where(on.unsqueeze(-1), mixed, cond)
    return filter_logits(logits / temperature, top_k, top_p).softmax(-1)


def target_probs(logits, steps, settings, use_cfg: bool):
    """logits (N, Q, V) fp32 of one image (N = 2 with CFG: cond, uncond) -> (Q, V) probabilities of the official
    draw at raster indices `steps` (runtime.llamagen.draw_tokens' distribution)."""
    t = torch.tensor(list(steps), dtype=torch.int64, device=logits.device).view(1, -1)
    return window_probs(logits, t, settings, use_cfg)[0]


def _window_slots(a, L: int, P: int, seq_len: int):
    """a (B,) int64 accepted counts -> (B, L) raster indices a..a+L-1 of the window and their KV slots (input of
    position t at slot P + t - 1), clamped to the last slot past the end of the sequence (padding queries: that slot
    is never read by a real one)."""
    t = a.unsqueeze(-1) + torch.arange(L, device=a.device)
    return t, (P + t - 1).clamp(max=seq_len - 1)


def _zero(kv: list) -> None:
    """The per-row attention scores every slot (masked ones weigh 0): they must hold finite values, not whatever
    another call left in a reused pool (0 * inf = nan)."""
    for layer in kv:
        layer.zero_()


# ---- per image, a Python loop (the reference the batched path is tested against) ----------------------------
def generate_one(gpt, label: int, seed: int, kv: list, settings, L: int, backend, neighbours=None):
    """SJD for one image, eagerly: a Python loop over passes and drafts (host syncs). kv: per-layer views
    (2, N, Hkv, L, D), N = 2 with CFG else 1. Every pass runs L queries (padded past the end) with per-row slots,
    the shapes and random keys of generate_batch, so the two give the same tokens. Returns (tokens (h*w,) int64,
    passes, accepted drafts, tested drafts)."""
    c = gpt.cfg
    n, P, V, dev = c.grid * c.grid, c.cls_token_num, c.vocab_size, kv[0].device
    if P != 1:
        raise ValueError("SJD supports one class token (c2i)")
    use_cfg = settings.cfg > 1.0
    N = 2 if use_cfg else 1
    cls_ids = torch.tensor([label, c.num_classes][:N], device=dev)
    tokens = torch.zeros(n, dtype=torch.int64, device=dev)
    drafts = torch.zeros(n + L, dtype=torch.int64, device=dev)   # padded: the window's inputs past the end
    q_draft = torch.full((n, V), 1.0 / V, device=dev)          # p_draft of each draft; uniform for random ones
    for t in range(min(L, n)):
        drafts[t] = _sample(q_draft[t], seed, 0, t, _INIT)
    _zero(kv)
    a = i = accepted = tested = 0
    while a < n:
        m = min(L, n - a)
        x = torch.cat([tokens[a - 1:a] if a else drafts[:1], drafts[a:a + L - 1]])
        h = gpt.embed_tokens(x.expand(N, -1))                                       # (N, L, C)
        if a == 0:
            h = torch.cat([gpt.embed_classes(cls_ids), h[:, 1:]], dim=1)
        t, slots = _window_slots(torch.tensor([a], device=dev), L, P, c.seq_len)
        probs = window_probs(gpt.step(h, slots.expand(N, -1), kv, None, backend), t, settings, use_cfg)[0]
        done, ok = _test_window(probs[:m], range(a, a + m), tokens, drafts, q_draft, seed, i, neighbours)
        accepted += ok
        tested += done
        _redraft(probs, a, m, done, min(a + done + L, n), drafts, q_draft, seed, i)
        a += done
        i += 1
    return tokens, i, accepted, tested


# ---- batched: static shapes, device-side state, no host sync inside a pass -----------------------------------
class BatchState(NamedTuple):
    """Device state of a batched SJD run, updated in place by sjd_pass (CUDA graphs replay on these buffers)."""
    seeds: torch.Tensor      # (B,) int64
    cls_ids: torch.Tensor    # (N,) int64 class token of each KV row (null class in the unconditional rows)
    tokens: torch.Tensor     # (B, h*w + L) int64 committed tokens; the last L columns absorb padding positions
    a: torch.Tensor          # (B,) int64 accepted prefix length n_b
    it: torch.Tensor         # () int64 pass index (a random-key field)
    drafts: torch.Tensor     # (B, L) int64 drafts at positions a .. a+L-1
    q_draft: torch.Tensor    # (B, L, V) fp32 the distribution each draft was drawn from
    passes: torch.Tensor     # (B,) int64 passes while the image was unfinished
    accepted: torch.Tensor   # (B,) int64 accepted drafts
    tested: torch.Tensor     # (B,) int64 tested drafts


def init_state(gpt, labels, seeds, L: int, use_cfg: bool) -> BatchState:
    """labels, seeds (B,) int64 on the device -> the state before pass 0: uniform random drafts."""
    c = gpt.cfg
    B, n, V, dev = labels.numel(), c.grid * c.grid, c.vocab_size, labels.device
    seeds = seeds.to(torch.int64)
    cls_ids = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if use_cfg else labels.clone()
    q_draft = torch.full((B, L, V), 1.0 / V, device=dev)
    t = torch.arange(L, device=dev)
    drafts = draw(q_draft, seeds.view(B, 1), 0, t, _INIT)
    z = torch.zeros(B, dtype=torch.int64, device=dev)
    return BatchState(seeds, cls_ids, torch.zeros(B, n + L, dtype=torch.int64, device=dev), z.clone(),
                      torch.zeros((), dtype=torch.int64, device=dev), drafts, q_draft, z.clone(), z.clone(), z)


def sjd_pass(gpt, s: BatchState, kv: list, settings, backend) -> None:
    """One SJD pass over the whole batch, in place on s; static shapes, tensor ops only (no host sync).
    Every image runs L queries at slots a_b .. a_b+L-1 of its own KV rows (its accepted prefix is slots < a_b;
    rejected drafts' slots are rewritten before a real query reads them); finished images run padding queries on
    the last slot and change nothing. Acceptance, residual resample and redraft as in generate_one."""
    c = gpt.cfg
    n, P = c.grid * c.grid, c.cls_token_num
    B, L = s.drafts.shape
    V = s.q_draft.shape[-1]
    use_cfg = s.cls_ids.numel() == 2 * B
    rep = 2 if use_cfg else 1
    j = torch.arange(L, device=s.a.device)
    t, slots = _window_slots(s.a, L, P, c.seq_len)                               # (B, L)
    m = (n - s.a).clamp(min=0, max=L)                                            # real positions of each window
    prev = s.tokens.gather(1, (s.a - 1).clamp(min=0).unsqueeze(1))               # token a-1 (query 0's input)
    x = torch.cat([prev, s.drafts[:, :-1]], dim=1)                               # (B, L) inputs
    h = gpt.embed_tokens(x.repeat(rep, 1))                                       # (N, L, C)
    first = ((s.a == 0).repeat(rep).unsqueeze(1) & (j == 0)).unsqueeze(-1)       # the class token at a = 0
    h = torch.where(first, gpt.embed_classes(s.cls_ids), h)
    probs = window_probs(gpt.step(h, slots.repeat(rep, 1), kv, None, backend), t, settings, use_cfg)  # (B, L, V)
    # speculative test, left to right: the leading run of accepted drafts
    seed = s.seeds.unsqueeze(1)
    pn = probs.gather(-1, s.drafts.unsqueeze(-1)).squeeze(-1).double()
    pd = s.q_draft.gather(-1, s.drafts.unsqueeze(-1)).squeeze(-1).double()
    ok = (keyed_uniform(seed, s.it, t, _ACCEPT) * pd <= pn) & (j < m.unsqueeze(1))
    lead = ok.long().cumprod(1).sum(1)                                           # (B,) accepted drafts
    done = lead + (lead < m).long()                                              # + the resampled token
    # residual resample at the first rejection (computed for every row, used where lead < m)
    r = lead.clamp(max=L - 1).view(B, 1, 1).expand(B, 1, V)
    pn_r, pd_r = probs.gather(1, r).squeeze(1), s.q_draft.gather(1, r).squeeze(1)   # (B, V)
    res = (pn_r - pd_r).clamp(min=0)
    res = torch.where(res.sum(-1, keepdim=True) > 0, res, pn_r)
    fixed = draw(res, s.seeds, s.it, s.a + lead, _RESAMPLE)                      # (B,)
    new = torch.where(j == lead.unsqueeze(1), fixed.unsqueeze(1), s.drafts)
    s.tokens.scatter_(1, t, torch.where(j < done.unsqueeze(1), new, s.tokens.gather(1, t)))
    # redraft the next window a' .. a'+L-1 from this pass's p_new (the last real query's past the window)
    src = torch.minimum(done.unsqueeze(1) + j, (m - 1).clamp(min=0).unsqueeze(1))
    q_new = probs.gather(1, src.unsqueeze(-1).expand(B, L, V))
    a_new = s.a + done
    s.drafts.copy_(draw(q_new, seed, s.it, a_new.unsqueeze(1) + j, _DRAFT))
    s.q_draft.copy_(q_new)
    s.passes.add_((m > 0).long())
    s.accepted.add_(lead)
    s.tested.add_(done)
    s.a.copy_(a_new)
    s.it.add_(1)


def _warm_up(run, s: BatchState, stream=None) -> None:
    """Run one pass (Triton compiles, cuBLAS picks algorithms) on the real state, on `stream` when given, then
    restore the state; its KV writes land on slots pass 0 rewrites before reading them."""
    saved = [x.clone() for x in s]
    if stream is None:
        run()
    else:
        stream.wait_stream(torch.cuda.current_stream(s.a.device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(s.a.device).wait_stream(stream)
    for x, y in zip(s, saved):
        x.copy_(y)


def _capture_pass(run, s: BatchState):
    """A CUDA graph of one pass on s's buffers (after a warm-up pass on a side stream, state restored)."""
    _warm_up(run, s, torch.cuda.Stream(s.a.device))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def generate_batch(gpt, labels, seeds, kv: list, settings, L: int, backend, check_every: int = 4,
                   graph: bool | None = None, progress=None):
    """Batched SJD: labels, seeds (B,) int64 on the device; kv: per-layer views (2, N, Hkv, L, D), N = 2B with CFG
    (conditional rows first) else B. Image b's tokens equal generate_one(label b, seed b) (the same keyed noise,
    the same per-row shapes). Passes run in a loop with one host sync (all images done?) every `check_every`
    passes, never more than h*w passes (each pass commits >= 1 token of every unfinished image); passes after an
    image finished change nothing. graph: capture one pass as a CUDA graph and replay it (default: on CUDA with a
    non-torch backend). progress: a tqdm bar (total h*w) advanced by the least accepted prefix at each check.
    Returns (tokens (B, h*w) int64, passes (B,), accepted (B,), tested (B,)) as int64 tensors, passes = the
    passes each image needed."""
    c = gpt.cfg
    n = c.grid * c.grid
    if c.cls_token_num != 1:
        raise ValueError("SJD supports one class token (c2i)")
    if L < 1 or check_every < 1:
        raise ValueError(f"sjd_window {L} and check_every {check_every}: expected >= 1")
    s = init_state(gpt, labels, seeds, L, settings.cfg > 1.0)
    _zero(kv)
    run = lambda: sjd_pass(gpt, s, kv, settings, backend)   # noqa: E731
    if graph is None:
        graph = labels.device.type == "cuda" and backend != "torch"
    if graph:
        try:
            run = _capture_pass(run, s).replay
        except Exception as e:   # capture impossible here: stay correct, run eagerly (the state was restored)
            warnings.warn(f"var_rt: SJD CUDA graph off, running eagerly: capture failed ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})", RuntimeWarning, stacklevel=2)
    done_passes, shown = 0, 0
    while done_passes < n:
        for _ in range(min(check_every, n - done_passes)):
            run()
        done_passes += min(check_every, n - done_passes)
        least = int(s.a.min())                        # the one sync of every check_every passes
        if progress is not None:
            progress.update(least - shown)
            shown = least
        if least >= n:
            break
    return s.tokens[:, :n].clone(), s.passes.clone(), s.accepted.clone(), s.tested.clone()


def generate_one_zipar(gpt, label: int, seed: int, kv: list, settings, L: int, w: int, backend, neighbours=None):
    """SJD + ZipAR (window w, "exact" mask) for one image: every row that may run keeps its own window of up to L
    drafts after its accepted prefix, one forward evaluates all of them (module docstring). kv, returns: as
    generate_one."""
    c = gpt.cfg
    h = tpr = c.grid
    n, P, V, dev = h * tpr, c.cls_token_num, c.vocab_size, kv[0].device
    if P != 1:
        raise ValueError("SJD supports one class token (c2i)")
    zipar.check_window(w, tpr)
    S = [zipar.row_start(r, tpr, w) for r in range(h)]
    need = [[zipar.counts_at(S[r] + col, h, tpr, w) for col in range(tpr)] for r in range(h)]  # context of (r, col)
    holder = [r >= 2 and need[r][0][r - 1] < tpr for r in range(h)]   # (r, 0) fed a placeholder, as in ZipAR
    use_cfg = settings.cfg > 1.0
    N = 2 if use_cfg else 1
    cls_ids = torch.tensor([label, c.num_classes][:N], device=dev)
    tokens = torch.zeros(n, dtype=torch.int64, device=dev)
    drafts = torch.zeros(n, dtype=torch.int64, device=dev)
    q_draft = torch.full((n, V), 1.0 / V, device=dev)
    for t in range(n):
        drafts[t] = _sample(q_draft[t], seed, 0, t, _INIT)
    for layer in kv:       # look-ahead queries read slots not written yet: zeros, not an earlier image's K/V
        layer.zero_()
    acc = [0] * h          # accepted tokens of each row
    fed = [False] * h      # slot (r, tpr-1) holds its real K/V (it held (r+1, 0)'s placeholder input)
    i = accepted = tested = 0
    while acc[h - 1] < tpr:   # a row completes only after the row above it
        seen = list(acc)       # tokens of each row whose K/V later queries of this pass may read
        q_slot, q_in, q_cnt, wins = [], [], [], []
        for r in range(h):
            a = acc[r]
            if a == tpr:
                if r + 1 < h and holder[r + 1] and not fed[r]:
                    if acc[r + 1] >= 1:   # KV-only: the real last token over (r+1, 0)'s placeholder input
                        q_slot.append(P + r * tpr + tpr - 1)
                        q_in.append(r * tpr + tpr - 1)
                        q_cnt.append(zipar.counts_at(S[r] + tpr, h, tpr, w))
                        fed[r] = True
                    else:                   # (r+1, 0) feeds its placeholder there this pass: not readable yet
                        seen[r] = tpr - 1
                continue
            m = 0   # testable: every row above holds the context plain ZipAR gives (r, a + m)
            while m < L and a + m < tpr and all(seen[q] >= need[r][a + m][q] for q in range(r)):
                m += 1
            # look-ahead (once the row above has started): the rest of the L positions run too, on whatever the
            # slots above hold, only to redraft; their K/V writes land on slots no valid query reads this pass
            M = m if r and not acc[r - 1] else min(L, tpr - a)
            lo = a + (m == 0 and a == 0)   # (r, 0)'s slot is the placeholder / fed slot of row r-1: only if valid
            if lo >= a + M:
                continue
            wins.append((r, a, m, lo, a + M, len(q_slot)))
            for col in range(lo, a + M):
                t = r * tpr + col
                q_slot.append(P + t - 1)
                q_cnt.append(need[r][col])
                if t == 0:
                    q_in.append(-1)                                        # the class token
                elif col == 0 and holder[r]:
                    q_in.append((r - 2) * tpr + need[r][0][r - 2] - 1)   # ZipAR's placeholder input
                else:
                    q_in.append(t - 1)
        x = torch.tensor(q_in, device=dev).clamp(min=0)          # input raster indices: accepted token or draft
        x = torch.where(x % tpr < torch.tensor(acc, device=dev)[x // tpr], tokens[x], drafts[x])
        emb = gpt.embed_tokens(x.expand(N, -1))                                        # (N, Q, C)
        if q_in[0] < 0:
            emb = torch.cat([gpt.embed_classes(cls_ids), emb[:, 1:]], dim=1)
        slots = torch.tensor(q_slot, device=dev)
        vis = Visibility(slots.to(torch.int32), torch.tensor(q_cnt, dtype=torch.int32, device=dev), P, tpr,
                         int(slots.max()) + 1)
        logits = gpt.step(emb, slots, kv, vis, backend)                                # (N, Q, V)
        active = {w_[0] for w_ in wins}
        for r, a, m, lo, hi, q0 in wins:
            t0, t1 = r * tpr + lo, r * tpr + hi
            probs = target_probs(logits[:, q0:q0 + hi - lo], range(t0, t1), settings, use_cfg)   # (hi - lo, V)
            done = ok = 0
            if m:
                done, ok = _test_window(probs[:m], range(t0, t0 + m), tokens, drafts, q_draft, seed, i, neighbours)
            accepted += ok
            tested += done
            _redraft(probs, t0, hi - lo, done, r * tpr + min(a + done + L, tpr), drafts, q_draft, seed, i)
            if r + 1 < h and acc[r + 1] == 0 and r + 1 not in active:   # the row below, not started: drafts
                for k in range(done):                                     # from the p_new above them
                    q_draft[t0 + tpr + k] = probs[k]
                    drafts[t0 + tpr + k] = _sample(probs[k], seed, i, t0 + tpr + k, _BELOW)
            acc[r] += done
        i += 1
    return tokens, i, accepted, tested


def _test_window(probs, targets, tokens, drafts, q_draft, seed, i, neighbours):
    """The speculative test of one window, left to right: probs (m, V) p_new at raster indices `targets` (m). Commits
    accepted drafts and, at the first rejection, the residual resample into tokens. Returns (committed, accepted)."""
    for k, t in enumerate(targets):
        x = int(drafts[t])
        pn, pd = probs[k], q_draft[t]
        p_acc = pn[neighbours[x]].sum() if neighbours is not None else pn[x]
        u = float(keyed_uniform(torch.tensor(seed, device=pn.device), i, t, _ACCEPT))
        if u * float(pd[x]) <= float(p_acc):   # float64, as sjd_pass
            tokens[t] = x
            continue
        res = (pn - pd).clamp(min=0)
        tokens[t] = _sample(res if float(res.sum()) > 0 else pn, seed, i, t, _RESAMPLE)
        return k + 1, k
    return len(targets), len(targets)


def _redraft(probs, a, m, done, end, drafts, q_draft, seed, i):
    """After testing the window of m queries at raster a.. (done committed): redraft its untested rest from this
    pass's p_new at those positions, and positions a+m .. end-1 (new to the window) from the last query's p_new."""
    for k in range(done, m):
        q_draft[a + k] = probs[k]
        drafts[a + k] = _sample(probs[k], seed, i, a + k, _DRAFT)
    for t in range(a + m, end):
        q_draft[t] = probs[m - 1]
        drafts[t] = _sample(probs[m - 1], seed, i, t, _DRAFT)


def codebook_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, D) codebook embeddings -> (V, k) ids of each entry's k nearest entries (itself first), by L2 distance."""
    d = torch.cdist(codebook.float(), codebook.float())
    d.fill_diagonal_(-1.0)
    return d.topk(min(k, codebook.shape[0]), dim=-1, largest=False).indices
