"""The LlamaGen layer kernels against their torch references (var_rt.ops, the spec): fused residual + RMSNorm,
RoPE + KV write, ZipAR attention (split and unsplit, strided q / out, GQA), SwiGLU; the fast layer as a whole
(logits, launches per layer) and ahead-of-time compilation for sm_90 / sm_80.

Without a GPU the kernels run in the interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported)."""
import copy
import os
import re

import torch  # noqa: E402  (torch does not import triton: asking for a GPU here is safe)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # no GPU: interpreter

import pytest  # noqa: E402

from var_rt import ops  # noqa: E402
from var_rt.models.llamagen import LlamaGenConfig, rope_2d_table  # noqa: E402
from var_rt.runtime import zipar  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _kern(name):
    return pytest.importorskip(f"var_rt.kernels.{name}")


def _randn(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


# ---- RMSNorm (+ residual) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 3, 100), (2, 5, 1280), (7, 24)])
@pytest.mark.parametrize("residual", [False, True])
def test_residual_rms_norm_matches_reference(dtype, shape, residual):
    k = _kern("rmsnorm")
    g = torch.Generator().manual_seed(1)
    C = shape[-1]
    x = _randn(*shape, dtype=dtype, g=g) * 3
    y = _randn(*shape, dtype=dtype, g=g) if residual else None
    w = (1 + 0.5 * _randn(C, g=g)).to(dtype)
    want_x, want_h = ops.residual_rms_norm_ref(x, y, w, 1e-5)
    got_x, got_h = k.residual_rms_norm(x, y, w, 1e-5)
    assert got_h.dtype == want_h.dtype and got_h.shape == want_h.shape
    # the residual sum is rounded once, as torch's add (the interpreter rounds fp32 -> bf16 by truncation)
    exact = dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") != "1"
    torch.testing.assert_close(got_x.float(), want_x.float(), **(dict(atol=0, rtol=0) if exact else TOL[dtype]))
    torch.testing.assert_close(got_h.float(), want_h.float(), **TOL[dtype])
    if not residual:
        assert got_x is x
        torch.testing.assert_close(k.rms_norm(x, w, 1e-5), want_h, **TOL[dtype])


def test_rms_norm_strided_rows_and_fp32_weight_on_bf16_rows():
    """Rows read through strides (a slice of a wider buffer); the output dtype follows torch's promotion."""
    k = _kern("rmsnorm")
    g = torch.Generator().manual_seed(2)
    buf = _randn(3, 4, 150, g=g)
    x = buf[:, :, 10:110]                    # (3, 4, 100), row stride 150
    y = _randn(4, 3, 100, g=g).transpose(0, 1)
    w = _randn(100, g=g)
    for a, b in ((x, y), (x.bfloat16(), y.bfloat16())):
        want = ops.residual_rms_norm_ref(a, b, w, 1e-6)
        got = k.residual_rms_norm(a, b, w, 1e-6)
        assert got[1].dtype == want[1].dtype == torch.float32
        for u, v in zip(got, want):
            torch.testing.assert_close(u.float(), v.float(), **TOL[a.dtype])


# ---- SwiGLU ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 35), (3, 3, 100), (2, 1, 1500), (5, 33)])
def test_swiglu_matches_reference(dtype, shape):
    k = _kern("swiglu")
    g = torch.Generator().manual_seed(3)
    F = shape[-1]
    gu = _randn(*shape[:-1], 2 * F, dtype=dtype, g=g) * 4               # the one w1|w3 GEMM output
    a, b = gu.chunk(2, dim=-1)
    got = k.swiglu(a, b)
    want = ops.swiglu_ref(a, b)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


# ---- RoPE + KV write -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Q,H,Hkv,D", [(1, 1, 4, 4, 8), (3, 3, 4, 2, 20), (2, 3, 6, 3, 64), (1, 2, 2, 1, 100)])
def test_rope_kv_write_matches_reference(dtype, N, Q, H, Hkv, D):
    k = _kern("rope_kv")
    g = torch.Generator().manual_seed(4)
    grid, P = 5, 2
    L = P + grid * grid
    rope = rope_2d_table(grid, D, 10000.0, P).to(DEV)
    slots = torch.tensor([1, 9, 17][:Q], dtype=torch.int64, device=DEV)      # a prefix slot and image slots
    qkv = _randn(N, Q, (H + 2 * Hkv) * D, dtype=dtype, g=g)
    kk = qkv[..., H * D:(H + Hkv) * D].view(N, Q, Hkv, D)
    vv = qkv[..., (H + Hkv) * D:].view(N, Q, Hkv, D)
    kv0 = _randn(2, N, Hkv, L, D, dtype=dtype, g=g)                          # old contents stay where not written
    want, got = kv0.clone(), kv0.clone()
    ops.rope_kv_write_ref(kk, vv, want[0], want[1], slots, rope)
    k.rope_kv_write(kk, vv, got[0], got[1], slots.int(), rope)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    torch.testing.assert_close(got[0].float(), want[0].float(), **TOL[dtype])
    other = torch.ones(L, dtype=torch.bool, device=DEV)
    other[slots] = False
    assert torch.equal(got[:, :, :, other], kv0[:, :, :, other])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Q,Hkv,D", [(1, 1, 4, 8), (3, 5, 2, 20), (4, 3, 3, 64)])
def test_rope_kv_write_per_row_slots_matches_reference(dtype, N, Q, Hkv, D):
    """(N, Q) slots (batched SJD): row n writes at its own slots; a non-contiguous slot tensor (a column slice)."""
    k = _kern("rope_kv")
    g = torch.Generator().manual_seed(14)
    grid, P = 5, 1
    L = P + grid * grid
    rope = rope_2d_table(grid, D, 10000.0, P).to(DEV)
    base = torch.stack([torch.randperm(L, generator=g)[:Q + 2] for _ in range(N)]).to(DEV)   # distinct per row
    slots = base[:, 1:Q + 1]
    kk, vv = _randn(N, Q, Hkv, D, dtype=dtype, g=g), _randn(N, Q, Hkv, D, dtype=dtype, g=g)
    kv0 = _randn(2, N, Hkv, L, D, dtype=dtype, g=g)
    want, got = kv0.clone(), kv0.clone()
    ops.rope_kv_write_ref(kk, vv, want[0], want[1], slots, rope)
    k.rope_kv_write(kk, vv, got[0], got[1], slots, rope)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    torch.testing.assert_close(got[0].float(), want[0].float(), **TOL[dtype])
    for n in range(N):   # the reference itself: row n rotated by its own slots, other slots untouched
        torch.testing.assert_close(want[0, n:n + 1, :, slots[n]].float(), ops.apply_rope(
            kk[n:n + 1], rope[slots[n]]).transpose(1, 2).float(), **TOL[dtype])
        other = torch.ones(L, dtype=torch.bool, device=DEV)
        other[slots[n]] = False
        assert torch.equal(got[:, n, :, other], kv0[:, n, :, other])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,Hkv,D,Q", [(1, 4, 4, 16, 1), (3, 4, 2, 20, 5), (4, 6, 3, 64, 3)])
@pytest.mark.parametrize("splits", [1, 3])
def test_zipar_attention_per_row_slots_matches_reference(dtype, N, H, Hkv, D, Q, splits):
    """(N, Q) query slots, causal per row (ops.rows_visibility: batched SJD) against causal_attention_rows_ref,
    which is checked per row against the shared-slot reference with the official (causal) mask."""
    k = _kern("zipar_attention")
    g = torch.Generator().manual_seed(15)
    grid, P = 12, 1
    L = P + grid * grid
    rope = rope_2d_table(grid, D, 10000.0, P).to(DEV)
    kc, vc = _randn(N, Hkv, L, D, dtype=dtype, g=g), _randn(N, Hkv, L, D, dtype=dtype, g=g)
    a = torch.randint(0, L - Q + 1, (N, 1), generator=g)
    slots = (a + torch.arange(Q)).clamp(max=L - 1).to(DEV)                      # a window per row
    vis = ops.rows_visibility(slots, L, P, grid)
    q = _randn(N, Q, H, D, dtype=dtype, g=g).transpose(1, 2)
    got = k.zipar_attention(q, kc, vc, vis.q_slot, vis.counts, P, grid, rope=rope, n_keys=L, num_splits=splits,
                            official=True)
    want = ops.zipar_attention_ref(q, kc, vc, vis, rope=rope)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    for n in range(N):
        one = zipar.Visibility(slots[n].int(), torch.zeros(grid, dtype=torch.int32, device=DEV), P, grid, L, True)
        torch.testing.assert_close(want[n:n + 1].float(), ops.zipar_attention_ref(
            q[n:n + 1], kc[n:n + 1], vc[n:n + 1], one, rope=rope).float(), **TOL[dtype])
    assert torch.equal(ops.zipar_attention(q, kc, vc, vis, rope=rope, backend="torch"), want)


# ---- ZipAR attention -------------------------------------------------------------------------------------------
def _vis(p, tpr, P):
    slots = torch.tensor([q.slot for q in p.queries], dtype=torch.int32, device=DEV)
    return zipar.Visibility(slots, torch.tensor(p.counts, dtype=torch.int32, device=DEV), P, tpr,
                            int(slots.max()) + 1)


def _passes(grid, w, P, want_q):
    """Passes of a ZipAR schedule with `want_q` queries, late ones first (many keys)."""
    ps = [p for p in zipar.zipar_schedule(grid, grid, w, P) if len(p.queries) == want_q]
    assert ps, want_q
    return ps[::-1][:2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,Hkv,D,Q", [(1, 4, 4, 16, 1), (3, 4, 2, 20, 3), (2, 6, 2, 64, 3), (1, 2, 1, 100, 1)])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_zipar_attention_matches_reference(dtype, N, H, Hkv, D, Q, splits):
    """q a strided slice of the wqkv output, out a (N, H, Q, D) view of a (N, Q, H*D) buffer; keys over several
    tiles so that a forced split really splits."""
    k = _kern("zipar_attention")
    g = torch.Generator().manual_seed(5)
    grid, P = 12, 2
    L = P + grid * grid
    rope = rope_2d_table(grid, D, 10000.0, P).to(DEV)
    kc = _randn(N, Hkv, L, D, dtype=dtype, g=g)
    vc = _randn(N, Hkv, L, D, dtype=dtype, g=g)
    for p in _passes(grid, 3, P, Q):
        vis = _vis(p, grid, P)
        qkv = _randn(N, Q, (H + 2 * Hkv) * D, dtype=dtype, g=g)
        q = qkv[..., :H * D].view(N, Q, H, D).transpose(1, 2)
        buf = torch.full((N, Q, H * D), float("nan"), dtype=dtype, device=DEV)
        out = buf.view(N, Q, H, D).transpose(1, 2)
        got = k.zipar_attention(q, kc, vc, vis.q_slot, vis.counts, P, grid, rope=rope, out=out, n_keys=vis.n_keys,
                                num_splits=splits)
        assert got is out
        want = ops.zipar_attention_ref(q, kc, vc, vis, rope=rope)
        torch.testing.assert_close(buf.float(), want.transpose(1, 2).reshape(N, Q, H * D).float(), **TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2])
def test_zipar_attention_many_rows_per_kv_head(splits):
    """GQA group 8 x 9 queries = 72 rows per KV head: more than one BLOCK_M block of rows."""
    k = _kern("zipar_attention")
    g = torch.Generator().manual_seed(6)
    grid, P, N, H, Hkv, D = 8, 1, 2, 8, 1, 16
    L = P + grid * grid
    p = zipar.zipar_schedule(grid, grid, 1, P)[20]
    slots = torch.arange(P + 3, P + 3 + 9 * 6, 6, dtype=torch.int32, device=DEV)     # 9 queries, any slots
    vis = zipar.Visibility(slots, torch.tensor(p.counts, dtype=torch.int32, device=DEV), P, grid,
                           int(slots.max()) + 1)
    rope = rope_2d_table(grid, D, 10000.0, P).to(DEV)
    kc, vc = _randn(N, Hkv, L, D, g=g), _randn(N, Hkv, L, D, g=g)
    q = _randn(N, H, 9, D, g=g)
    got = k.zipar_attention(q, kc, vc, vis.q_slot, vis.counts, P, grid, rope=rope, n_keys=vis.n_keys,
                            num_splits=splits)
    torch.testing.assert_close(got, ops.zipar_attention_ref(q, kc, vc, vis, rope=rope), **TOL[torch.float32])


def test_split_plan():
    from var_rt.kernels.zipar_attention import plan_splits
    assert plan_splits(40, 577, 64, 132) == (4, 192)      # LlamaGen-XL batch 1: 40 programs -> 160
    assert plan_splits(40, 256, 64, 132) == (2, 128)       # four tiles: two chunks of two
    assert plan_splits(40, 150, 64, 132) == (1, 192)       # three tiles: not worth a combine launch
    assert plan_splits(40, 60, 64, 132) == (1, 64)
    assert plan_splits(2560, 577, 64, 132) == (1, 640)     # batch 64: already fills the GPU
    assert plan_splits(4, 577, 64, 132, num_splits=3) == (3, 256)
    assert plan_splits(4, 577, 64, 132, num_splits=99) == (10, 64)


@pytest.mark.parametrize("splits", [1, 2])
def test_zipar_attention_split_sees_exactly_the_visible_set(splits):
    """The visibility rule through the split path: K = 0 gives every visible key the same weight and V = one-hot
    of the slot, so the output row is the indicator of the visible set (over several key chunks)."""
    k = _kern("zipar_attention")
    h, P = 6, 1
    L = P + h * h
    D = L + (L % 2)
    v = torch.zeros(1, 1, L, D, device=DEV)
    v[0, 0, torch.arange(L), torch.arange(L)] = 1.0
    kc = torch.zeros(1, 1, L, D, device=DEV)
    for p in zipar.zipar_schedule(h, h, 2, P)[-8:]:
        vis = _vis(p, h, P)
        q = torch.randn(1, 1, len(p.queries), D, device=DEV)
        got = k.zipar_attention(q, kc, v, vis.q_slot, vis.counts, P, h, n_keys=vis.n_keys, num_splits=splits)[0, 0]
        mask = zipar.visibility_mask(vis, L)
        torch.testing.assert_close(got[:, :L], mask.float() / mask.sum(1, keepdim=True), atol=1e-6, rtol=1e-5)


# ---- the fast layer as a whole ---------------------------------------------------------------------------------
def _tiny(dtype=torch.float32, **kw):
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    base = dict(dim=48, n_layer=2, n_head=4, n_kv_head=2, vocab_size=40, num_classes=5, grid=6)
    base.update(kw)
    return LlamaGenPipeline.random(LlamaGenConfig(**base), std=0.3, dtype=dtype, device=DEV, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_step_matches_reference_step(dtype):
    """Every pass of a ZipAR plan (GQA, CFG-sized batch): fp32 logits and caches equal the reference's; in bf16 both
    paths are held to an fp32 run of the same weights, and the fast one may not be much further off."""
    _kern("zipar_attention")
    pipe = _tiny(dtype)
    gpt = pipe.gpt
    assert gpt.layers[0].feed_forward.fused_weight() is not None          # fused by the pipeline
    g32 = copy.deepcopy(gpt).float()
    ids = torch.randint(0, 40, (3, 36), generator=torch.Generator().manual_seed(0)).to(DEV)
    kvs = {b: [torch.zeros(gpt.kv_shape(3), dtype=d, device=DEV) for _ in gpt.layers]
           for b, d in (("torch", dtype), ("fast", dtype), ("fp32", torch.float32))}
    err = {"torch": 0.0, "fast": 0.0}
    for p in pipe.plan(2):
        h = gpt.embed_classes(torch.tensor([1, 4, 5], device=DEV)) if p.prefill else gpt.embed_tokens(ids[:, p.inputs])
        want = gpt.step(h, p.slots, kvs["torch"], p.vis, "torch")
        got = gpt.step(h, p.slots, kvs["fast"], p.vis, "fast")
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:
            exact = g32.step(h.float(), p.slots, kvs["fp32"], p.vis, "torch")
            err = {"torch": max(err["torch"], float((want - exact).abs().max())),
                   "fast": max(err["fast"], float((got - exact).abs().max()))}
    if dtype == torch.float32:
        for a, b in zip(kvs["torch"], kvs["fast"]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    else:   # measured (interpreter, which rounds to bf16 by truncation): 0.33 reference, 0.29 fast
        assert err["fast"] <= 1.5 * err["torch"] + 0.05, err


def test_fused_ffn_weights_keep_official_names_and_memory():
    pipe = _tiny()
    gpt = pipe.gpt
    ff = gpt.layers[1].feed_forward
    w13 = ff.fused_weight()
    F = gpt.cfg.ffn_hidden
    assert w13.shape == (2 * F, gpt.cfg.dim)
    assert ff.w1.weight.data_ptr() == w13.data_ptr() and torch.equal(ff.w3.weight, w13[F:])
    sd = gpt.state_dict()
    assert "layers.1.feed_forward.w1.weight" in sd and not any("w13" in key or "_fused" in key for key in sd)
    x = torch.randn(2, 3, gpt.cfg.dim, device=DEV)
    want = ff(x)                                                            # the official reference (separate GEMMs)
    torch.testing.assert_close(ff(x, "fast"), want, atol=1e-5, rtol=1e-5)
    gpt.to(torch.float64)                                                   # parameters replaced: fusion dropped
    assert ff.fused_weight() is None
    torch.testing.assert_close(ff(x.double(), "torch"), want.double(), atol=1e-5, rtol=1e-5)
    gpt.fuse_weights_()
    assert ff.fused_weight() is not None and ff.fused_weight().dtype == torch.float64


class _Launches:
    """Counts kernel launches: torch ops that run a kernel (views, empties and metadata excluded) plus Triton
    launches (compiled or interpreted); torch ops inside a Triton launch (the interpreter's) are not counted."""
    FREE = {"view", "_unsafe_view", "t", "transpose", "split", "split_with_sizes", "slice", "select", "expand",
            "unsqueeze", "squeeze", "permute", "as_strided", "alias", "detach", "empty", "empty_strided",
            "empty_like", "lift_fresh", "reshape", "unbind", "chunk", "narrow", "_reshape_alias"}

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        self.torch, self.triton, self.inside = [], [], 0
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not outer.inside and name not in outer.FREE:
                    outer.torch.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode
        from triton.runtime import interpreter, jit
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            monkeypatch.setattr(cls, "run", self._wrap(cls.run))

    def _wrap(self, run):
        def counted(fn_self, *a, **kw):
            self.triton.append(getattr(fn_self, "__name__", None) or fn_self.fn.__name__)
            self.inside += 1
            try:
                return run(fn_self, *a, **kw)
            finally:
                self.inside -= 1
        return counted

    def count(self, fn):
        self.torch.clear()
        self.triton.clear()
        with self.mode():
            fn()
        return len(self.torch) + len(self.triton)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_launches_per_layer(monkeypatch, dtype):
    """9 launches per layer per pass; 10 when the attention splits its keys (a late pass, few programs)."""
    _kern("zipar_attention")
    from var_rt.ops import gemm
    monkeypatch.setattr(gemm, "ROW_MULTIPLE", 1)  # the CPU-only batch-invariance row padding is not a GPU launch
    counter = _Launches(monkeypatch)
    per_layer = {}
    for n_layer in (1, 3):
        pipe = _tiny(dtype, n_layer=n_layer, n_head=2, n_kv_head=None, dim=32, grid=16)
        gpt, kv = pipe.gpt, pipe.kv_layers(2)
        plan = pipe.plan(2)
        for name, p in (("early", plan[10]), ("late", plan[-3])):
            h = gpt.embed_tokens(torch.zeros(2, len(p.slots), dtype=torch.int64, device=DEV))
            gpt.step(h, p.slots, kv, p.vis, "fast")                       # warm (compiles)
            per_layer.setdefault(name, []).append(counter.count(lambda: gpt.step(h, p.slots, kv, p.vis, "fast")))
    early, late = ((b - a) / 2 for a, b in (per_layer["early"], per_layer["late"]))
    assert early == 9, (per_layer, counter.torch, counter.triton)
    assert late == 10, (per_layer, counter.torch, counter.triton)            # + the split-combine launch


# ---- ahead-of-time compilation (no GPU needed) -----------------------------------------------------------------
_AOT = r"""
import importlib, os, re, subprocess, sys, tempfile
sys.path[:0] = [sys.argv[1]]   # the tests folder: test_kernel_compile's helper
import torch, triton
try:
    from test_kernel_compile import _compile
    from triton.backends.nvidia import compiler  # noqa: F401
except Exception as e:
    print(f"cannot compile ahead of time here: {e}"); sys.exit(3)
mods = {m: importlib.import_module(f"var_rt.kernels.{m}") for m in ("zipar_attention", "rmsnorm", "rope_kv", "swiglu")}
bindir = os.path.join(os.path.dirname(compiler.__file__), "bin")
ptxases = [os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))]
t = lambda dt: torch.empty(16, dtype=dt)
f32, i32 = torch.float32, torch.int32


def usage(ck, cc):
    # registers / spills as ptxas reports them for the kernel's PTX
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    for ptxas in ptxases:   # the one that knows the PTX version triton emitted
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{cc}{'a' if cc == 90 else ''}", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
    os.unlink(f.name)
    m = re.search(r"Used (\d+) registers", r.stderr)
    sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return f"regs {m.group(1) if m else '?'}, spill st/ld {sp.group(1) + '/' + sp.group(2) if sp else '?'}"


def run(name, jf, args, consts, cc, warps, stages=3):
    ck = _compile(triton, torch, jf, args, consts, cc, warps, stages)
    print(f"sm_{cc} {name}: {usage(ck, cc)}, shared {ck.metadata.shared} B", flush=True)


za = mods["zipar_attention"]
for cc in (90, 80):
    for dt in (torch.bfloat16, f32):
        # LlamaGen-XL 384 batch 1 (N = 2 CFG rows, 20 heads, D 64, 577 slots); 3B (D 100, GQA-like group 2)
        for H, GROUP, D, split in ((20, 1, 64, True), (20, 1, 64, False), (32, 2, 100, False)):
            Hkv = H // GROUP
            bm, bn, bd, w, st = za._tiles(dt, 4 * GROUP, D)
            W = (H + 2 * Hkv) * D
            args = dict(Q=t(dt), K=t(dt), V=t(dt), O=t(dt), PO=t(f32), PML=t(f32), QSLOT=t(i32), COUNTS=t(i32),
                        ROPE=t(f32), sqn=4 * W, sqh=D, sqq=W, sqd=1, skn=Hkv * 577 * D, skh=577 * D, skl=D, skd=1,
                        svn=Hkv * 577 * D, svh=577 * D, svl=D, svd=1, son=4 * H * D, soh=D, soq=H * D, sod=1,
                        spn=4 if split else 0, N=2, H=H, Qn=4, GROUP=GROUP, D=D, prefix=1, tpr=24, n_rows=24, chunk=192, n_splits=4,
                        qk_scale=0.18)
            run(f"zipar_attn {dt} H{H} G{GROUP} D{D} split={split} (BLOCK_M {bm}, BLOCK_N {bn})",
                za._zipar_attn_kernel, args,
                dict(HAS_ROPE=True, SPLIT=split, OFFICIAL=split, F32_DOT=dt == f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), cc, w, st)
        args = dict(PO=t(f32), PML=t(f32), O=t(dt), R=160, H=20, Qn=4, D=64, n_splits=4, son=4 * 1280, soh=64,
                    soq=1280, sod=1)
        run(f"zipar_combine {dt}", za._zipar_combine_kernel, args, dict(BLOCK_S=4, BLOCK_D=64), cc, 1)
        for C, br, bc, w in ((1280, 2, 2048, 4), (3200, 1, 4096, 8)):
            args = dict(X=t(dt), Y=t(dt), W=t(dt), XO=t(dt), HO=t(dt), R=8, L=4, C=C, sxn=4 * C, sxl=C, sxc=1,
                        syn=4 * C, syl=C, syc=1, son=4 * C, sol=C, soc=1, shn=4 * C, shl=C, shc=1, eps=1e-5)
            run(f"rms_norm {dt} C{C}", mods["rmsnorm"]._rms_kernel, args, dict(HAS_Y=True, BLOCK_R=br, BLOCK_C=bc),
                cc, w)
        args = dict(K=t(dt), V=t(dt), KC=t(dt), VC=t(dt), SLOTS=t(torch.int64), ROPE=t(f32), Q=4, Hkv=20, D=64, ssn=4,
                    skn=4 * 3840, skq=3840, skh=64, skd=1, svn=4 * 3840, svq=3840, svh=64, svd=1,
                    kcn=20 * 577 * 64, kch=577 * 64, kcl=64, kcd=1, vcn=20 * 577 * 64, vch=577 * 64, vcl=64, vcd=1)
        run(f"rope_kv {dt}", mods["rope_kv"]._rope_kv_kernel, args, dict(BLOCK_H=32, BLOCK_D=64), cc, 4)
        args = dict(A=t(dt), B=t(dt), O=t(dt), R=8, L=4, F=3584, n_fblk=4, san=4 * 7168, sal=7168, saf=1,
                    sbn=4 * 7168, sbl=7168, sbf=1, son=4 * 3584, sol=3584, sof=1)
        run(f"swiglu {dt}", mods["swiglu"]._swiglu_kernel, args, dict(BLOCK_R=4, BLOCK_F=1024), cc, 4)
print("ok")
"""


def test_llamagen_kernels_compile_for_sm90_and_sm80():
    """The interpreter cannot see GPU lowering errors: compile every LlamaGen kernel to a cubin ahead of time (no
    GPU needed) with the helper of test_kernel_compile.py, in a subprocess without TRITON_INTERPRET; ptxas -v
    reports registers and spills (printed: run with -s to see them)."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT, os.path.dirname(os.path.abspath(__file__))], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    print(r.stdout)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), r.stdout[-3000:] + r.stderr[-4000:]
    spills = re.findall(r"spill st/ld (\S+),", r.stdout)
    assert spills and all(s in ("0/0", "?") for s in spills), r.stdout
