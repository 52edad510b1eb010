"""Token sampling: top-k, top-p, temperature, categorical draw; no host sync, no sort.

One program = BLOCK_R rows of logits (B, l, V), each row whole in registers (BLOCK_V = next power of two >= V),
read in the logits' own dtype and strides. With guidance the input is the CFG batch (2B, l, V) and each row is
mixed in fp32 as it is read, (1 + t) * cond - t * uncond (t one float or one per position), so no mixed or fp32
copy of the logits is ever written; the kernel is compiled without FMA contraction so that the mix rounds as
torch's three elementwise ops do.
Thresholds are found by bisection on the float's order-preserving int32 key (exact in <= 33 steps):
  top-k: the largest key T with count(key >= T) >= k, i.e. the k-th largest logit; keep logits >= it (ties kept,
         as the reference's `logits < kth -> -inf`).
  top-p: the smallest key T with mass(key <= T) > 1 - top_p; keep key >= T. This is the reference's "drop the
         ascending-sorted tokens whose cumulative probability is <= 1 - top_p" (the largest always stays); it
         differs only among tied logits at the cut (kept or dropped together here) and by float summation order.
Draw: argmax(p / E) with p = softmax(filtered / temperature) (unnormalised: same argmax) and E ~ Exp(1) from
Philox keyed by seeds[b], counter (vocab index, row i in l, step): a row's draw does not depend on the batch.
With a per-position step tensor the counter is (vocab index, 0, steps[i]): position i draws exactly what a
one-position call with step = steps[i] draws (LlamaGen: one launch per pass, streams keyed by raster index).
Spec: var_rt.ops.sample_tokens_ref (its torch.Generator stream is not reproduced; the distribution is).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INT_DTYPES, check, check_device, check_tensor, interpreting, next_pow2

_OP = "sample_tokens"


@triton.jit
def _key(x):
    """Order-preserving int32 image of fp32 x (-0.0 folded onto +0.0): a < b  <=>  key(a) < key(b)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _row_logits(LOGITS, b_off, u_off, cols, ok, s_lv, g_a, g_t, GUIDE: tl.constexpr):
    """fp32 logits of the rows at b_off (conditional) [and u_off (unconditional)] for the columns `cols`:
    (1 + t) * cond - t * uncond with g_a = 1 + t, g_t = t, when GUIDE; masked lanes are -inf."""
    x = tl.load(LOGITS + b_off[:, None] + cols[None, :] * s_lv, mask=ok, other=0.0).to(tl.float32)
    if GUIDE:
        u = tl.load(LOGITS + u_off[:, None] + cols[None, :] * s_lv, mask=ok, other=0.0).to(tl.float32)
        x = g_a[:, None] * x - g_t[:, None] * u  # two roundings then a subtraction: torch's order exactly
    return tl.where(ok, x, float("-inf"))


@triton.jit(do_not_specialize=["step", "top_k"])  # no recompiles as the step number changes
def _sample_kernel(
    LOGITS, SEEDS, OUT, STEPS, GUIDES,
    R, l, B, V, s_lb, s_ll, s_lv, s_seed, s_ob, s_ol, s_step, s_g,
    step, top_k, one_minus_p, inv_temp, g_a, g_t,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    GUIDE: tl.constexpr, STEP_T: tl.constexpr,
):
    """GUIDE: 0 none, 1 one t for all (g_a = 1 + t, g_t = t), 2 per-position t read from GUIDES (l,).
    STEP_T: the Philox counter is (v, 0, STEPS[i]) instead of (v, i, step)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,) flattened (b, row in l), b < B
    r_ok = rows < R
    b = rows // l
    i = rows % l
    b_off = b.to(tl.int64) * s_lb + i.to(tl.int64) * s_ll
    u_off = (b + B).to(tl.int64) * s_lb + i.to(tl.int64) * s_ll  # unconditional row b + B (read when GUIDE)
    ga = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
    gt = tl.zeros([BLOCK_R], dtype=tl.float32)
    if GUIDE == 1:
        ga = ga * g_a
        gt = gt + g_t
    if GUIDE == 2:
        gt = tl.load(GUIDES + i * s_g, mask=r_ok, other=0.0).to(tl.float32)
        ga = 1.0 + gt
    cols = tl.arange(0, BLOCK_V)
    ok = r_ok[:, None] & (cols < V)[None, :]
    x = _row_logits(LOGITS, b_off, u_off, cols, ok, s_lv, ga, gt, GUIDE)
    x = tl.where(r_ok[:, None] | (cols >= V)[None, :], x, 0.0)  # rows past the end: zeros, never stored

    if TOP_K:
        key = _key(x)
        lo = tl.min(key, axis=1).to(tl.int64)  # count(key >= lo) >= V >= k: true
        hi = tl.max(key, axis=1).to(tl.int64) + 1  # count(key >= hi) = 0 < k: false
        while tl.max(hi - lo) > 1:
            mid = lo + (hi - lo) // 2  # lo < mid < hi: fits int32
            cnt = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
            good = cnt >= top_k
            lo = tl.where(good, mid, lo)
            hi = tl.where(good, hi, mid)
        x = tl.where(key >= lo.to(tl.int32)[:, None], x, float("-inf"))
    m = tl.max(x, axis=1)
    t_keep = tl.full([BLOCK_R], -2147483648, dtype=tl.int32)  # keep key >= t_keep (all when no filter)
    if TOP_K:
        t_keep = lo.to(tl.int32)
    if TOP_P:
        key = _key(x)
        e = tl.exp(x - m[:, None])  # filtered / padded lanes: exp(-inf) = 0
        need = one_minus_p * tl.sum(e, axis=1)
        lo = tl.min(key, axis=1).to(tl.int64) - 1  # mass(key <= lo) = 0: not > need
        hi = tl.max(key, axis=1).to(tl.int64)  # mass(key <= hi) = all > need (top_p > 0)
        while tl.max(hi - lo) > 1:
            mid = lo + (hi - lo) // 2
            mass = tl.sum(tl.where(key <= mid.to(tl.int32)[:, None], e, 0.0), axis=1)
            good = mass > need
            hi = tl.where(good, mid, hi)
            lo = tl.where(good, lo, mid)
        t_keep = tl.maximum(t_keep, hi.to(tl.int32))

    # draw, CHUNK tokens at a time (re-read from L1/L2 and re-mixed by the same code, so the same bits):
    # Philox's state for a whole 16k row would spill
    seed = tl.load(SEEDS + b * s_seed, mask=r_ok, other=0).to(tl.int64)
    zero = tl.zeros([BLOCK_R, CHUNK], dtype=tl.int32)
    seed2 = seed[:, None] + zero.to(tl.int64)
    if STEP_T:  # per-position streams: counter (v, 0, steps[i]), as a one-position call with step = steps[i]
        row2 = zero
        step2 = tl.load(STEPS + i * s_step, mask=r_ok, other=0).to(tl.int32)[:, None] + zero
    else:
        row2 = i[:, None] + zero
        step2 = zero + step
    best = tl.full([BLOCK_R], -2.0, dtype=tl.float32)
    best_i = tl.zeros([BLOCK_R], dtype=tl.int32)
    for c0 in range(0, BLOCK_V, CHUNK):
        cc = c0 + tl.arange(0, CHUNK)
        okc = r_ok[:, None] & (cc < V)[None, :]
        xc = _row_logits(LOGITS, b_off, u_off, cc, okc, s_lv, ga, gt, GUIDE)
        xc = tl.where(r_ok[:, None] | (cc >= V)[None, :], xc, 0.0)
        keep = okc & (_key(xc) >= t_keep[:, None])
        p = tl.exp((xc - m[:, None]) * inv_temp)  # softmax numerator; the kept maximum has p = 1
        r0, _, _, _ = tl.philox(seed2, cc[None, :] + zero, row2, step2, zero)
        u = tl.uint_to_uniform_float(r0)  # [0, 1)
        score = tl.where(keep, p / -tl.log(u), -1.0)  # p / Exp(1); u = 0 -> score 0; dropped: never drawn
        c_best = tl.max(score, axis=1)
        c_arg = tl.argmax(score, axis=1) + c0
        better = c_best > best  # strict: the first index wins ties, as torch.argmax
        best_i = tl.where(better, c_arg, best_i)
        best = tl.where(better, c_best, best)
    tl.store(OUT + b.to(tl.int64) * s_ob + i * s_ol, best_i.to(tl.int64), mask=r_ok)


def sample_tokens(logits, seeds, step, top_k=0, top_p=0.0, temperature=1.0, guidance=None, out=None):
    """logits (B, l, V), or (2B, l, V) with `guidance` (conditional rows 0..B-1, unconditional B..2B-1), in
    fp32 / bf16 / fp16 with any strides, read in their own dtype (math in fp32). guidance: None, a float t, or
    an (l,) float tensor of per-position t: the kernel mixes (1 + t) * cond - t * uncond first. seeds (B,) int
    per-request seeds. step: an int (position i draws from Philox counter (v, i, step)) or an (l,) int tensor of
    per-position streams (position i: counter (v, 0, steps[i]), the same draw as a one-position call with
    step = steps[i]). Order as CoDe: top-k, top-p, then / temperature, softmax, draw. Returns (B, l) int64
    (written into `out` when given). No host sync: safe inside CUDA graphs."""
    check_tensor(_OP, "logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    dev = logits.device
    check_device(_OP, dev)
    N, l, V = logits.shape
    guide = 0 if guidance is None else 2 if isinstance(guidance, torch.Tensor) else 1
    if guide:
        check(N % 2 == 0, _OP, f"with guidance logits hold 2B rows (conditional first), got {N}")
    B = N // 2 if guide else N
    check_tensor(_OP, "seeds", seeds, dtypes=INT_DTYPES, device=dev)
    check(seeds.numel() == B, _OP, f"seeds has {seeds.numel()} elements, expected one per request (B={B})")
    check(V >= 1, _OP, "empty vocabulary")
    check(V <= 65536, _OP, f"V={V}: rows are held whole in registers, at most 65536 tokens")
    steps = None
    if isinstance(step, torch.Tensor):
        check_tensor(_OP, "step", step, dtypes=INT_DTYPES, device=dev)
        check(step.numel() == l, _OP, f"step tensor has {step.numel()} elements, expected one per position (l={l})")
        steps, step = step.reshape(-1), 0  # values are not checked: that would sync with the device
    step = int(step)
    check(0 <= step < 2 ** 31, _OP, f"step must be in [0, 2^31), got {step}")
    g_a, g_t, guides = 1.0, 0.0, None
    if guide == 1:
        g_t = float(guidance)
        g_a = 1.0 + g_t  # rounded to fp32 once, as torch rounds a Python scalar
    elif guide == 2:
        check_tensor(_OP, "guidance", guidance, dtypes=(torch.float32,), device=dev)
        check(guidance.numel() == l, _OP,
              f"guidance has {guidance.numel()} elements, expected one per position (l={l})")
        guides = guidance.reshape(-1)
    top_k, top_p, temperature = int(top_k), float(top_p), float(temperature)
    check(top_k >= 0, _OP, f"top_k must be >= 0 (0 = off), got {top_k}")
    check(temperature > 0.0, _OP, f"temperature must be > 0, got {temperature}")
    if out is None:
        out = torch.empty((B, l), device=dev, dtype=torch.int64)
    else:
        check_tensor(_OP, "out", out, dtypes=(torch.int64,), device=dev)
        check(tuple(out.shape) == (B, l), _OP, f"out has shape {tuple(out.shape)}, expected ({B}, {l})")
    R = B * l
    if R == 0:
        return out
    seeds_flat = seeds.reshape(-1)
    block_v = next_pow2(V)
    target = 16384 if interpreting() else 2048  # elements per program: whole rows, at least one
    # rows per program from V only, never from R = B * l: the compiled kernel (tile, warps, so each row's reduction
    # order) is the same whatever the batch, and a row's draw depends on its own logits alone
    block_r = max(1, target // block_v)
    tile = block_r * block_v
    warps = 1 if tile <= 128 else 2 if tile <= 512 else 4 if tile <= 4096 else 8 if tile <= 8192 else 16
    # the draw handles CHUNK tokens per row at a time, ~8 per thread (one pass in the interpreter)
    chunk = block_v if interpreting() else min(block_v, max(1, warps * 32 * 8 // block_r))
    use_k = 0 < top_k < V
    use_p = 0.0 < top_p < 1.0
    _sample_kernel[(triton.cdiv(R, block_r),)](
        logits, seeds_flat, out, steps if steps is not None else seeds_flat, guides if guides is not None else logits,
        R, l, B, V, logits.stride(0), logits.stride(1), logits.stride(2), seeds_flat.stride(0),
        out.stride(0), out.stride(1), steps.stride(0) if steps is not None else 0,
        guides.stride(0) if guides is not None else 0,
        step, top_k if use_k else 1, 1.0 - top_p if use_p else 0.0, 1.0 / temperature, g_a, g_t,
        BLOCK_R=block_r, BLOCK_V=block_v, CHUNK=chunk,
        TOP_K=use_k, TOP_P=use_p, GUIDE=guide, STEP_T=steps is not None, num_warps=warps,
        enable_fp_fusion=False,  # the CFG mix and the re-read chunks round exactly as torch's unfused ops
    )
    return out
