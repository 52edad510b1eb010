"""Cost model counted on the CPU: the REAL pipelines (VARPipeline / LlamaGenPipeline, real model code, real engine)
run on the `meta` device at the real sizes with the fast backend selected, and every launch the fast path would
issue is counted with its FLOPs and bytes. Times are MODELLED from stated ceilings, not measured.

  python benchmarks/cost_model.py --config d30 --batch 64 [--json] [--cfg-skip-last M] [--stream-every E]
  python benchmarks/cost_model.py --all [--out-dir benchmarks/results/cost]      # every config, batch 1 and 64 (8)

What is counted (a TorchDispatchMode sees every aten op; fakes stand in for the kernels):
  * view / metadata ops and bare allocations are not launches; GEMMs (mm, addmm, bmm, _addmm_activation, ...) are
    one launch with 2*M*K*N FLOPs; convolutions one launch with their FLOPs ("conv"); any other aten op one launch
    plus the bytes of its tensors (inputs + outputs; a tensor written in place counted once; a table lookup
    (embedding, index) reads the rows it gathers, a write by index (index_copy_, index_put_) the rows it writes).
    Ops on CPU tensors only are host work (not counted); a CPU -> device copy is counted apart (`h2d_copies`).
  * Triton and _C kernels: the Triton gate (`var_rt.ops.dispatch.triton_fn(op, device, loader)`; before the ops
    package, `var_rt.ops.triton_fn(op, device)`) and `var_rt._ext.rvq_step_fn(device)` (also where a var_rt module
    imported them by name) return recording fakes, generic over the op name: one launch per call (rvq_step: 3),
    bytes = tensor arguments + outputs, where a KV cache argument counts only the keys attention reads (n_keys) or
    the positions a write touches. Outputs (contiguous, as a kernel allocates them) come from the
    op's torch reference run once per call signature with recording suspended, or from a shape rule
    (sample_tokens); an op without either gets its first tensor's shape. Attention FLOPs 4*N*H*Lq*Lk*D with Lk the
    keys visible (block-causal prefill: per scale; ZipAR: slot + 1), taken from the engine's step (VAR
    forward_tokens / LlamaGen step), so a kernel signature change does not lose them; GEMM FLOPs of a fused op
    whose name says linear / gemm / matmul / mlp / ffn / proj from its 2-D weight.
  * F.scaled_dot_product_attention (VAE / VQ decoders) is counted as ONE fused attention launch (on meta torch
    would pick its unfused math path).
  * Phases: `tokens` (VARPipeline._sample / generate_tokens: the CUDA graph; graph nodes = its launches), `decode`
    (VQVAE fhat_to_img / VQ decode_tokens, eager), `other`. Transformer layers (each module of `blocks` / `layers`)
    are marked by forward hooks: launches_per_layer_step = launches inside them / layer calls (layers x steps).
  * One-time setup (KV arena, ZipAR plan, RoPE table) is built before counting, as a warm run would have it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
import weakref
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# ---- ceilings of the time model (stated, not measured) --------------------------------------------------------
CEILINGS = {
    "gemm_tflops": {"bf16": 780.0, "fp32": 60.0},       # fp32: CUDA cores (torch leaves TF32 off for matmul)
    "attention_tflops": {"bf16": 350.0, "fp32": 30.0},  # ~45% of dense GEMM: D = 64 tiles, softmax, masking
    "conv_tflops": {"bf16": 470.0, "fp32": 250.0},      # cuDNN ~60%; fp32 convs run TF32 (cudnn.allow_tf32 on)
    "hbm_TBps": {"H100": 3.35, "H200": 4.8},
    "graph_node_us": 2.0,      # a launch inside the CUDA graph (token generation)
    "eager_launch_us": 5.0,    # a launch outside graphs (decoder, CPU -> GPU copies)
}
MODEL = ("t = sum over launches i of max(roofline_i, n_i * overhead_i); roofline_i = max(gemm_flops_i / gemm_peak, "
         "attention_flops_i / attention_peak, conv_flops_i / conv_peak, bytes_i / hbm_bw) with peaks by dtype "
         "(bf16/fp16 or fp32) from `ceilings`; overhead_i = graph_node_us for launches of the token generation "
         "(CUDA graph), eager_launch_us otherwise; bytes_i = all tensors a launch reads + writes (GEMM weights too). "
         "img/s = batch / t. MODELLED figures, not measurements: a measured GPU row always wins.")
DEVICES = ("H100", "H200")
VIEW_NAMES = {"_unsafe_view", "_reshape_alias", "lift_fresh", "detach", "alias", "view_as_real", "view_as_complex",
              "_unsafe_split", "_unsafe_split_with_sizes", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_has_compatible_shallow_copy_type", "set_",
              # in place, metadata only (always run: they change the tensor's shape or strides)
              "transpose_", "t_", "squeeze_", "unsqueeze_", "as_strided_", "swapdims_", "swapaxes_", "detach_"}
ALLOC_NAMES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "_resize_output_"}
GEMM_NAMES = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "linear", "matmul", "mv", "addmv",
              "dot", "vdot", "_scaled_mm", "_int_mm"}
CONV_NAMES = {"convolution", "_convolution", "cudnn_convolution", "cudnn_convolution_transpose", "conv2d",
              "conv_transpose2d", "_convolution_mode", "mkldnn_convolution", "convolution_overrideable"}
SCATTER_NAMES = {"index_copy_", "index_put_", "_index_put_impl_", "scatter_", "index_add_"}  # write part of self
GATHER_NAMES = {"embedding", "index_select", "index", "gather", "take"}  # read only the rows they gather
COPY_NAMES = {"_to_copy", "copy_", "copy", "_copy_from", "_copy_from_and_resize", "to"}
LAUNCHES_PER_CALL = {"rvq_step": 3}  # _C: gather + bicubic, Phi conv blend + add, area downsample
PHASES = ("tokens", "decode", "other")


def _dt(dtype) -> str:
    return "fp32" if dtype in (torch.float32, torch.float64) else "bf16"


def _flat(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _flat(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _flat(y, out)
    return out


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for t: numel over the non-broadcast (stride != 0) dims, times the item size."""
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if st != 0:
            n *= s
    return n * t.element_size()


# ---- the counter ----------------------------------------------------------------------------------------------
class Counter:
    """Accumulates launches, FLOPs and bytes per (phase, inside a transformer layer)."""
    FIELDS = ("launches", "h2d", "gemm_flops", "attn_flops", "conv_flops", "gemm_bytes", "conv_bytes", "bytes")

    def __init__(self, track_memory: bool = True):
        self.acc = {(p, il): dict.fromkeys(self.FIELDS, 0) for p in PHASES for il in (False, True)}
        self.time = {(p, d): [0.0, 0.0] for p in PHASES for d in DEVICES}  # (roofline s, modelled s)
        self.by_op = {p: {} for p in PHASES}
        self.by_op_layer: dict = {}   # launches inside transformer layers, per op
        self.fast_ops: dict = {}
        self.no_flops: set = set()   # attention-like fast ops whose FLOPs could not be derived
        self.phase, self.layer_depth, self.layer_steps, self.suspended = "other", 0, 0, 0
        self.patch_nums = None       # VAR pyramid: block-causal visible keys
        self.zipar_slots: dict = {}  # id(q_slot tensor) -> (sum of slot + 1, n_keys)
        self.attn_ctx: StepCtx | None = None  # the transformer step being run
        self.track_memory, self.static_storages = track_memory, set()
        self.live, self.cur, self.peak = {}, 0, 0

    @contextlib.contextmanager
    def suspend(self):
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1

    @contextlib.contextmanager
    def in_phase(self, phase):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def add(self, name, launches=1, gemm=0, attn=0, conv=0, nbytes=0, dtype="bf16", h2d=False):
        a = self.acc[(self.phase, self.layer_depth > 0)]
        if h2d:
            a["h2d"] += launches
        else:
            a["launches"] += launches
        a["gemm_flops"] += gemm
        a["attn_flops"] += attn
        a["conv_flops"] += conv
        a["gemm_bytes" if gemm else "conv_bytes" if conv else "bytes"] += nbytes
        e = self.by_op[self.phase].setdefault(name, [0, 0, 0.0])  # launches, bytes, modelled H100 s
        if self.layer_depth > 0:
            self.by_op_layer[name] = self.by_op_layer.get(name, 0) + launches
        e[0] += launches
        e[1] += nbytes
        c = CEILINGS
        o = launches * 1e-6 * (c["graph_node_us"] if self.phase == "tokens" and not h2d else c["eager_launch_us"])
        compute = max(gemm / (c["gemm_tflops"][dtype] * 1e12), attn / (c["attention_tflops"][dtype] * 1e12),
                      conv / (c["conv_tflops"][dtype] * 1e12))
        for d in DEVICES:
            roof = max(compute, nbytes / (c["hbm_TBps"][d] * 1e12))
            t = self.time[(self.phase, d)]
            t[0] += roof
            t[1] += max(roof, o)
            if d == DEVICES[0]:
                e[2] += max(roof, o)

    # peak memory: live storages created during the run (weakref-finalised), on top of weights + KV pool
    def track(self, tensors, inputs=()):
        if not self.track_memory:
            return
        skip = {id(t) for t in inputs}
        for t in tensors:
            if id(t) in skip or t.device.type != "meta":
                continue
            st = t.untyped_storage()
            k = id(st)
            if k in self.live or k in self.static_storages:
                continue
            n = st.nbytes()
            self.live[k] = n
            self.cur += n
            self.peak = max(self.peak, self.cur)
            weakref.finalize(st, self._free, k)

    def _free(self, k):
        self.cur -= self.live.pop(k, 0)


_CLASS: dict = {}


def _classify(func) -> tuple:
    c = _CLASS.get(func)
    if c is None:
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        if name in GEMM_NAMES:
            kind = "gemm"
        elif name in CONV_NAMES:
            kind = "conv"
        elif name in ALLOC_NAMES:
            kind = "alloc"
        elif name in VIEW_NAMES or getattr(func, "is_view", False):
            kind = "view"
        else:
            kind = "other"
        c = _CLASS[func] = (kind, name)
    return c


def _key(x, ids):
    """Hashable call signature: tensors by (first-seen index, shape, stride, dtype, device), values as they are."""
    if isinstance(x, torch.Tensor):
        i = ids.setdefault(id(x), len(ids))
        return (i, x.shape, x.stride(), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return tuple(_key(y, ids) for y in x)
    if isinstance(x, dict):
        return tuple((k, _key(v, ids)) for k, v in x.items())
    return x


class Recorder(TorchDispatchMode):
    """Counts every aten op that reaches dispatch (see the module docstring for the rules). On meta an op's result
    depends only on its call signature, so after the first call of a signature the op's cost and output shapes
    are replayed from a cache (fresh outputs rebuilt with torch.empty_strided) instead of running its meta kernel
    again: the same counts, several times faster on LlamaGen's 576 passes."""

    def __init__(self, counter: Counter):
        super().__init__()
        self.c = counter
        self.cache: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        kind, name = _classify(func)
        if c.suspended or kind == "view":
            return func(*args, **kwargs)
        ins = _flat(kwargs, _flat(args, []))
        if kind == "alloc":
            out = func(*args, **kwargs)
            c.track(_flat(out, []))
            return out
        key = None
        # ops with CPU tensors have values, and an out= op may resize its output: always run those
        if "out" not in kwargs and all(t.device.type == "meta" for t in ins):
            ids: dict = {}
            key = (func, _key(args, ids), _key(kwargs, ids))
            try:
                hit = self.cache.get(key)
            except TypeError:  # an unhashable argument
                key = hit = None
            if hit is not None:
                spec, rec = hit
                out = _rebuild(spec, ins)
                if rec is not None:
                    c.add(*rec[0], **rec[1])
                    c.track(_flat(out, []), ins)
                return out
        out = func(*args, **kwargs)
        outs = _flat(out, [])
        rec = self.cost(name, kind, args, ins, outs)
        if key is not None:
            self.cache[key] = (_spec(out, ins, strided=True), rec)
        if rec is not None:
            c.add(*rec[0], **rec[1])
            c.track(outs, ins)
        return out

    @staticmethod
    def cost(name, kind, args, ins, outs):
        """(args, kwargs) of Counter.add for one op, or None for host work."""
        if not any(t.device.type == "meta" for t in ins + outs):
            return None
        uniq = {id(t): t for t in ins + outs if t.device.type == "meta"}
        written = 0
        if name in SCATTER_NAMES and len(ins) > 1:  # e.g. a KV-cache write by slot: the rows, not the cache
            uniq.pop(id(ins[0]), None)
            written = _nbytes(ins[-1]) // ins[-1].element_size() * ins[0].element_size()
        elif name in GATHER_NAMES and outs and len(ins) > 1:  # a table lookup: the rows read, not the table
            uniq.pop(id(ins[0]), None)
            written = _nbytes(outs[0])
        nbytes = written + sum(_nbytes(t) for t in uniq.values())
        if kind == "gemm":
            a = args[1] if name in ("addmm", "baddbmm", "addbmm", "_addmm_activation", "addmv") else args[0]
            return ("aten." + name,), dict(gemm=2 * outs[0].numel() * a.shape[-1], nbytes=nbytes, dtype=_dt(a.dtype))
        if kind == "conv":
            w = args[1]
            transposed = name.endswith("transpose") or (name in ("convolution", "_convolution") and args[6])
            base = args[0] if transposed else outs[0]
            return ("aten." + name,), dict(conv=2 * base.numel() * w[0].numel(), nbytes=nbytes, dtype=_dt(w.dtype))
        h2d = name in COPY_NAMES and any(t.device.type == "cpu" and t.dim() > 0 for t in ins)
        dtype = _dt(outs[0].dtype if outs else ins[0].dtype)
        return ("h2d" if h2d else "aten." + name,), dict(nbytes=nbytes, dtype=dtype, h2d=h2d)


# ---- fakes for the fast path ----------------------------------------------------------------------------------
def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _find_ref(op: str):
    """The torch reference of a fast op: var_rt.ops.<op>_ref, else <op>_ref in any loaded var_rt module."""
    from var_rt import ops
    if callable(getattr(ops, f"{op}_ref", None)):
        return getattr(ops, f"{op}_ref")
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("var_rt") and mod is not None and callable(getattr(mod, f"{op}_ref", None)):
            return getattr(mod, f"{op}_ref")
    return None


def _sample_tokens_shape(args, kwargs):
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out
    logits = _arg(args, kwargs, 0, "logits")
    B = logits.shape[0] // (2 if kwargs.get("guidance") is not None else 1)
    shape = (B,) + tuple(logits.shape[1:-1])
    return torch.empty(shape, dtype=torch.int64, device=logits.device)


def _like_first(args, kwargs):
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out
    q = _flat(args, [])[0]
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


SHAPE_RULES = {"sample_tokens": _sample_tokens_shape, "zipar_attention": _like_first}


def _block_causal_visible(patch_nums, Lq: int):
    """Sum over queries of visible keys when scales 0..n are fed block-causally (Lq their total tokens)."""
    cum, vis = 0, 0
    for p in patch_nums or ():
        cum += p * p
        vis += p * p * cum
        if cum == Lq:
            return vis
    return None


class StepCtx(NamedTuple):
    """The transformer step being run, from the engine's call (not from a kernel's signature)."""
    N: int          # rows (2B with CFG)
    H: int          # query heads
    D: int          # head dim
    Lq: int         # queries of the step
    visible: int    # keys visible, summed over queries
    n_keys: int     # keys any query sees ([0, n_keys) of the cache)
    Lmax: int       # cache length (KV pool positions)


def _cache_fraction(t: torch.Tensor, ctx: StepCtx | None, attention: bool) -> float:
    """Share of a fast op's tensor it touches: a KV cache (..., Lmax, D) is read up to n_keys by attention and
    written at the step's Lq positions by anything else; a per-position table (Lmax, ...) is read at Lq rows."""
    if ctx is None or t.dim() < 2:
        return 1.0
    if t.dim() >= 4 and t.shape[-2] == ctx.Lmax and t.shape[-1] == ctx.D:
        return (ctx.n_keys if attention else ctx.Lq) / ctx.Lmax
    if t.shape[0] == ctx.Lmax and t.dim() == 3:
        return ctx.Lq / ctx.Lmax
    return 1.0


def _zipar_launches(args, kwargs) -> int:
    """The ZipAR kernel adds a combine launch when it splits the keys (flash-decoding); plan it as the launcher does
    on a 132-SM GPU (H100 / H200), from the kernel module's own pure planning functions."""
    from var_rt.kernels import zipar_attention as z
    q, k = args[0], args[1]
    N, H, Qn, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    rows = Qn * (H // Hkv)
    block_m, block_n = z._tiles(q.dtype, rows, D)[:2]
    n_keys = kwargs.get("n_keys") or L
    splits, _ = z.plan_splits(N * Hkv * -(-rows // block_m), max(1, min(int(n_keys), L)), block_n, 132,
                              kwargs.get("num_splits"))
    return 2 if splits > 1 else 1


def _attention_flops(c: Counter, op, args, kwargs):
    """4*N*H*D * (visible keys summed over queries), from the step context, else from (N, H, L, D) q and k;
    None when neither gives it."""
    if c.attn_ctx is not None:
        x = c.attn_ctx
        return 4 * x.N * x.H * x.D * x.visible
    if op == "var_attention" and len(args) > 2 and args[0].dim() == 3 and args[1].dim() == 5:  # qkv, KV pool, start
        (_, N, H, _, D), l, start = args[1].shape, args[0].shape[1], int(args[2])
        vis = l * (start + l)
        if _arg(args, kwargs, 4, "q_scale") is not None:
            vis = _block_causal_visible(c.patch_nums, l) or vis
        return 4 * N * H * D * vis
    ts = [t for t in _flat(args, []) if t.dim() == 4]
    if len(ts) >= 2:
        (N, H, Lq, D), Lk = ts[0].shape, ts[1].shape[2]
        vis = Lq * Lk
        if op == "var_attention" and _arg(args, kwargs, 4, "q_scale") is not None:
            vis = _block_causal_visible(c.patch_nums, Lq) or vis
        return 4 * N * H * D * vis
    return None


def _gemm_like(args):
    """2*M*K*N of a fused linear: a 2-D weight (N, K) and an input whose last dim is K."""
    ts = _flat(args, [])
    for w in ts[1:]:
        if w.dim() == 2:
            for x in ts:
                if x is not w and x.dim() >= 2 and x.shape[-1] == w.shape[1]:
                    return 2 * x.numel() * w.shape[0]
    return 0


def _spec(out, ins, strided=False):
    """How to rebuild `out`: an input (by position) or a fresh tensor of that shape and dtype (contiguous, as a
    kernel allocates it, unless `strided`: then with out's strides), nested."""
    if isinstance(out, torch.Tensor):
        for i, t in enumerate(ins):
            if t is out:
                return ("in", i)
        return ("new", tuple(out.shape), out.dtype, out.stride() if strided else None)
    if isinstance(out, (list, tuple)):
        return ("seq", type(out), [_spec(o, ins, strided) for o in out])
    return ("val", out)


def _rebuild(spec, ins):
    if spec[0] == "in":
        return ins[spec[1]]
    if spec[0] == "new":
        if spec[3] is not None:
            return torch.empty_strided(spec[1], spec[3], dtype=spec[2], device="meta")
        return torch.empty(spec[1], dtype=spec[2], device="meta")
    if spec[0] == "seq":
        items = [_rebuild(s, ins) for s in spec[2]]
        return spec[1](items) if spec[1] in (list, tuple) else spec[1](*items)
    return spec[1]


class FakeKernel:
    """Stands in for a Triton / _C kernel: counts it, returns outputs of the right shape on meta."""

    def __init__(self, counter: Counter, op: str):
        self.c, self.op = counter, op
        self.ref = None if op in SHAPE_RULES else _find_ref(op)
        self.specs: dict = {}  # call signature -> output spec, so that each shape runs the reference once

    def outputs(self, args, kwargs):
        rule = SHAPE_RULES.get(self.op)
        if rule is not None:
            return rule(args, kwargs), "shape rule"
        if self.ref is not None:
            ids: dict = {}
            key = (_key(args, ids), _key(kwargs, ids))
            try:
                spec = self.specs.get(key)
            except TypeError:  # an unhashable argument: run the reference every time
                key = spec = None
            if spec is not None:  # seen with these shapes: rebuild the outputs (meta: the writes carry no values)
                return _rebuild(spec, _flat(kwargs, _flat(args, []))), "reference"
            try:
                out = self.ref(*args, **kwargs)
            except Exception:  # noqa: BLE001  e.g. a reference that needs values (.tolist()) on meta
                pass
            else:  # a kernel allocates its outputs contiguous (the reference may return a strided view)
                ins = _flat(kwargs, _flat(args, []))
                spec = _spec(out, ins)
                if key is not None:
                    self.specs[key] = spec
                return _rebuild(spec, ins), "reference"
        return _like_first(args, kwargs), "fallback: shape of the first tensor"

    def __call__(self, *args, **kwargs):
        c = self.c
        with c.suspend():
            out, how = self.outputs(args, kwargs)
        if c.suspended:
            return out
        ins = _flat(kwargs, _flat(args, []))
        outs = _flat(out, [])
        n = _zipar_launches(args, kwargs) if self.op == "zipar_attention" else LAUNCHES_PER_CALL.get(self.op, 1)
        gemm = attn = conv = 0
        is_attn = bool(re.search(r"attention|attn", self.op))
        if is_attn:
            attn = _attention_flops(c, self.op, args, kwargs)
            if attn is None:
                c.no_flops.add(self.op)
                attn = 0
        elif re.search(r"linear|gemm|matmul|mlp|ffn|proj", self.op):
            gemm = _gemm_like(args)
        elif self.op == "rvq_step":
            f_hat, w = _arg(args, kwargs, 4, "f_hat"), _arg(args, kwargs, 2, "phi_w")
            conv = 2 * f_hat.numel() * w[0].numel()
        uniq = {id(t): t for t in ins + outs if t.device.type == "meta"}
        nbytes = int(sum(_nbytes(t) * _cache_fraction(t, c.attn_ctx, is_attn) for t in uniq.values()))
        fl = [t.dtype for t in ins if t.is_floating_point()]
        c.add(f"fast.{self.op}", launches=n, gemm=gemm, attn=attn, conv=conv, nbytes=nbytes,
              dtype=_dt(fl[0]) if fl else "bf16")
        s = c.fast_ops.setdefault(self.op, {"calls": 0, "launches": 0, "outputs": how,
                                            "flops": "attention" if attn else "gemm" if gemm else "conv" if conv else
                                            "none"})
        s["calls"] += 1
        s["launches"] += n
        c.track(outs, ins)
        return out


def _sdpa_wrapper(c: Counter, orig):
    @functools.wraps(orig)
    def sdpa(q, k, v, *args, **kwargs):
        with c.suspend():
            out = orig(q, k, v, *args, **kwargs)
        if not c.suspended:
            N = math.prod(q.shape[:-2])
            c.add("fast.sdpa", attn=4 * N * q.shape[-2] * k.shape[-2] * q.shape[-1], dtype=_dt(q.dtype),
                  nbytes=sum(_nbytes(t) for t in (q, k, v, out)))
            c.track([out], [q, k, v])
        return out
    return sdpa


@contextlib.contextmanager
def patched(counter: Counter):
    """The Triton gate (`var_rt.ops.triton_fn(op, device)`, or `var_rt.ops.dispatch.triton_fn(op, device, loader)`
    once ops is a package), `var_rt._ext.rvq_step_fn` (also where any var_rt module imported them by name) and
    F.scaled_dot_product_attention replaced by recording fakes; all restored on exit."""
    import importlib
    for name in ("var_rt.pipeline", "var_rt.llamagen_pipeline"):  # load every module that may hold the names
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from var_rt import _ext, ops
    fakes: dict = {}

    def triton_fn(op, device=None, loader=None):
        if op not in fakes:
            fakes[op] = FakeKernel(counter, op)
        return fakes[op]

    def rvq_step_fn(device=None):
        return triton_fn("rvq_step")

    gates = {getattr(ops, "triton_fn", None), getattr(getattr(ops, "dispatch", None), "triton_fn", None)} - {None}
    if not gates:
        raise RuntimeError("cost_model: var_rt has neither ops.triton_fn nor ops.dispatch.triton_fn to patch")
    subs = [(g, triton_fn) for g in gates] + [(_ext.rvq_step_fn, rvq_step_fn), (
        F.scaled_dot_product_attention, _sdpa_wrapper(counter, F.scaled_dot_product_attention))]
    saved = []
    mods = [m for n, m in list(sys.modules.items()) if n.startswith("var_rt") and m is not None] + [F]
    for mod in mods:
        for attr, val in list(vars(mod).items()):
            for old, new in subs:
                if val is old:
                    saved.append((mod, attr, old))
                    setattr(mod, attr, new)
    try:
        yield
    finally:
        for mod, attr, old in reversed(saved):
            setattr(mod, attr, old)


def fast_backend() -> str:
    """The name var_rt gives its fast backend: "fast" (ops package), "triton" before."""
    from var_rt import ops
    return "fast" if "fast" in getattr(ops, "BACKENDS", ()) else "triton"


# ---- building the pipelines on meta ---------------------------------------------------------------------------
def build_var(var_cfg, vae_cfg, refiner_cfg=None, draft_steps=None, dtype=torch.bfloat16):
    from var_rt.models import var as var_model
    from var_rt.models import vqvae as vqvae_model
    from var_rt.pipeline import VARPipeline
    with torch.device("meta"):
        main = var_model.VAR(var_cfg).to(dtype).eval().requires_grad_(False)
        ref = var_model.VAR(refiner_cfg).to(dtype).eval().requires_grad_(False) if refiner_cfg else None
        vae = vqvae_model.VQVAE(vae_cfg).eval().requires_grad_(False)
        vae.decoder.to(dtype)  # quantizer and post_quant_conv stay fp32, as loaded (KEEP_FP32)
    if ref is None and draft_steps is None:
        return VARPipeline(vae, var=main, device="meta", backend=fast_backend())
    return VARPipeline(vae, drafter=main, refiner=ref, draft_steps=draft_steps, device="meta", backend=fast_backend())


def build_llamagen(cfg, vq_cfg, dtype=torch.bfloat16):
    from var_rt.llamagen_pipeline import LlamaGenPipeline
    from var_rt.models import llamagen as gpt_model
    from var_rt.models import vq16
    gpt = gpt_model.build_meta(cfg).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        vq = vq16.VQ16(vq_cfg).eval().requires_grad_(False)  # fp32, as from_checkpoints loads it
    return LlamaGenPipeline(gpt, vq, device="meta", backend=fast_backend())


def _layers(model) -> list:
    for attr in ("blocks", "layers"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.ModuleList):
            return list(m)
    return []


def _wrap(obj, name, make):
    orig = getattr(obj, name)
    setattr(obj, name, make(orig))
    return lambda: obj.__dict__.pop(name, None)


def count(pipe, batch: int, zipar_window=None, track_memory=True, stream_every=None, sjd=None, **sampling) -> dict:
    """Runs pipe(labels) once on meta under the recorder; returns the counts (see `report`). stream_every (VAR):
    list(pipe.stream(labels, every=E)) instead: the segments' launches as tokens, the previews' decodes as decode.
    sjd=(L, P) (LlamaGen): batched SJD with windows of L, run for P passes (a pass count is data-dependent: on meta
    there are no values to accept or reject, so P is an input: `_run_sjd`)."""
    from var_rt.runtime import zipar
    c = Counter(track_memory)
    var = hasattr(pipe, "models")
    models = list(pipe.models.values()) if var else [pipe.gpt]
    labels = [i % pipe.num_classes for i in range(batch)]
    undo, hooks = [], []
    cfg_scale = sampling.get("cfg", 4.0)
    if var:
        c.patch_nums = pipe.cfg.patch_nums
        with contextlib.suppress(Exception):  # one-time setup outside the count (cached per batch, as with graphs)
            pipe.kv_pool(batch)
        steps = [(ph.model, len(ph.scales)) for ph in pipe.schedule]
        layers_x_steps = sum(pipe.models[m].cfg.depth * n for m, n in steps)
        for m in models:
            sig = inspect.signature(m.forward_tokens)

            def make(orig, m=m, sig=sig):
                def forward_tokens(*a, **k):
                    try:
                        b = sig.bind(*a, **k).arguments
                        x, start = b["x"], b.get("start", 0)
                        l = x.shape[1]
                        vis = l * (start + l) if b.get("q_scale") is None else _block_causal_visible(c.patch_nums, l)
                        c.attn_ctx = StepCtx(x.shape[0], m.cfg.heads, m.cfg.head_dim, l, vis, start + l, m.cfg.L)
                    except Exception:  # noqa: BLE001  a changed signature: no context, shape rules only
                        c.attn_ctx = None
                    try:
                        return orig(*a, **k)
                    finally:
                        c.attn_ctx = None
                return forward_tokens
            undo.append(_wrap(m, "forward_tokens", make))
        tokens_fn = "_sample" if hasattr(pipe, "_sample") else "generate_latents"  # _sample: __call__'s path
        undo.append(_wrap(pipe, tokens_fn, lambda f: _phased(c, "tokens", f)))
        if stream_every:  # a stream's token work: one graph per segment (VARPipeline._run_segment)
            undo.append(_wrap(pipe, "_run_segment", lambda f: _phased(c, "tokens", f)))
        undo.append(_wrap(pipe.vae, "fhat_to_img", lambda f: _phased(c, "decode", f)))
        passes = sum(n for _, n in steps)
        sampling = {"cfg": 4.0, "top_k": 900, "top_p": 0.95, "temperature": 1.0, "seed": 0, **sampling}
    else:
        g = pipe.gpt.cfg
        plan = pipe.plan(zipar_window)
        with contextlib.suppress(Exception):  # one-time setup outside the count (cached, as with graphs)
            pipe.kv_layers(2 * batch if cfg_scale > 1 else batch)
            pipe.gpt.rope_table(pipe.device)
        P, h = g.cls_token_num, g.grid
        sched = (zipar.sequential_schedule(h, h, P) if zipar_window is None
                 else zipar.zipar_schedule(h, h, zipar_window, P))
        for p, s in zip(plan, sched):
            slots = [q.slot for q in s.queries]
            qs = getattr(getattr(p, "vis", None), "q_slot", None)
            if qs is not None and qs.shape[0] == len(slots):
                c.zipar_slots[id(qs)] = (sum(x + 1 for x in slots), max(slots) + 1)
        passes, layers_x_steps = len(plan), g.n_layer * len(plan)
        if sjd:
            passes, layers_x_steps = sjd[1], g.n_layer * sjd[1]
        sig = inspect.signature(pipe.gpt.step)

        def make_step(orig):
            def step(*a, **k):
                try:
                    b = sig.bind(*a, **k).arguments
                    h = b["h"]
                    vis, n_keys = c.zipar_slots[id(b["vis"].q_slot)]
                    c.attn_ctx = StepCtx(h.shape[0], g.n_head, g.head_dim, h.shape[1], vis, n_keys, g.seq_len)
                except Exception:  # noqa: BLE001
                    c.attn_ctx = None
                try:
                    return orig(*a, **k)
                finally:
                    c.attn_ctx = None
            return step
        undo.append(_wrap(pipe.gpt, "step", make_step))
        undo.append(_wrap(pipe, "generate_tokens", lambda f: _phased(c, "tokens", f)))
        undo.append(_wrap(pipe.vq, "decode_tokens", lambda f: _phased(c, "decode", f)))
        sampling = {"cfg": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0, "seed": 0, **sampling,
                    "zipar_window": zipar_window}

    def pre(mod, args):
        if c.layer_depth == 0 and not c.suspended:
            c.layer_steps += 1
        c.layer_depth += 1

    def post(mod, args, out):
        c.layer_depth -= 1
    for m in models:
        for layer in _layers(m):
            hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    static = 0
    for m in models + [pipe.vae if var else pipe.vq]:
        for t in list(m.parameters()) + list(m.buffers()):
            c.static_storages.add(id(t.untyped_storage()))
            static += t.numel() * t.element_size()
    pools = getattr(pipe, "_pools", {})
    pool_bytes = sum(getattr(p, "nbytes", 0) for p in pools.values())
    for p in pools.values():
        if hasattr(p, "arena"):
            c.static_storages.add(id(p.arena.untyped_storage()))
    t0 = time.perf_counter()
    try:
        with patched(c), Recorder(c):
            if stream_every:
                list(pipe.stream(labels, every=stream_every, **sampling))
            elif sjd:
                _run_sjd(c, pipe, labels, *sjd, sampling)
            else:
                pipe(labels, **sampling)
    finally:
        for h in hooks:
            h.remove()
        for u in undo:
            u()
    if sjd:  # the SJD pool is made inside the run (2B rows with CFG)
        pool_bytes = sum(getattr(p, "nbytes", 0) for p in getattr(pipe, "_pools", {}).values())
    return {"counter": c, "layers_x_steps": layers_x_steps, "steps": passes, "static_bytes": static,
            "kv_pool_bytes": pool_bytes, "cpu_s": time.perf_counter() - t0, "sampling": sampling,
            "stream_every": stream_every, "sjd": sjd}


def _run_sjd(c: Counter, pipe, labels: list, L: int, passes: int, sampling: dict) -> None:
    """Batched SJD as LlamaGenPipeline._generate_sjd runs it (runtime.sjd.init_state, then sjd_pass: the pass a
    CUDA graph replays), for exactly `passes` passes, then the decode. The pipeline's own loop syncs with the host
    every few passes to test completion; on meta it cannot, so the pass count is given."""
    from var_rt import ops
    from var_rt.runtime import sjd
    kw = {k: sampling[k] for k in ("cfg", "top_k", "top_p", "temperature", "cfg_interval") if k in sampling}
    settings = pipe.sampling_settings(**kw)
    lab = torch.tensor(labels, device=pipe.device)
    seeds = torch.arange(len(labels), device=pipe.device)
    pool = pipe.kv_pool(2 * len(labels) if settings.cfg > 1.0 else len(labels))
    with ops.use_backend(pipe.backend):
        s = sjd.init_state(pipe.gpt, lab, seeds, L, settings.cfg > 1.0)
        with c.in_phase("tokens"):  # the passes: what the CUDA graph of a pass replays
            for _ in range(passes):
                sjd.sjd_pass(pipe.gpt, s, pool.views["llamagen"], settings, pipe.backend)
    n = pipe.cfg.grid ** 2
    pipe.decode(s.tokens[:, :n])


def _phased(c: Counter, phase: str, f):
    @functools.wraps(f)
    def run(*a, **k):
        with c.in_phase(phase):
            return f(*a, **k)
    return run


# ---- configs, report ------------------------------------------------------------------------------------------
CONFIGS = {
    "d30": "VAR-d30, 10 scales, 256 px",
    "code8": "CoDe N=8: VAR-d30 drafter (scales 0..7) + VAR-d16 refiner, 256 px",
    "code6": "CoDe N=6: VAR-d30 drafter (scales 0..5) + VAR-d16 refiner, 256 px",
    "llamagen-xl-384": "LlamaGen GPT-XL, 384 px (24x24 tokens), sequential",
    "zipar8": "LlamaGen GPT-XL, 384 px (24x24 tokens), ZipAR window 8",
    "tiny-var": "smoke test: a depth-2 VAR on a 4-scale pyramid",
    "tiny-llamagen": "smoke test: a 2-layer LlamaGen on a 4x4 grid, ZipAR window 2",
}
ALL = [("d30", (1, 64)), ("code8", (1, 64)), ("code6", (1, 64)), ("llamagen-xl-384", (1, 8)), ("zipar8", (1, 8))]


def build(name: str):
    """(pipeline, zipar window) of a named config, built on meta."""
    from var_rt.models import llamagen as gpt_model
    from var_rt.models import var as var_model
    from var_rt.models import vq16
    from var_rt.models import vqvae as vqvae_model
    if name in ("d30", "code8", "code6"):
        d30 = var_model.VARConfig.official(30)
        if name == "d30":
            return build_var(d30, vqvae_model.VQVAEConfig()), None
        return build_var(d30, vqvae_model.VQVAEConfig(), var_model.VARConfig.official(16), int(name[-1])), None
    if name in ("llamagen-xl-384", "zipar8"):
        return build_llamagen(gpt_model.config_for("XL", 384), vq16.VQ16Config()), (8 if name == "zipar8" else None)
    if name == "tiny-var":
        cfg = var_model.VARConfig(depth=2, width=64, heads=2, vocab=48, cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4))
        return build_var(cfg, vqvae_model.VQVAEConfig(vocab=48, cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1)), None
    if name == "tiny-llamagen":
        cfg = gpt_model.LlamaGenConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=10, grid=4)
        vq = vq16.VQ16Config(codebook_size=64, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
        return build_llamagen(cfg, vq), 2
    raise SystemExit(f"unknown config {name!r}: expected one of {', '.join(CONFIGS)}")


def _git(root, *args) -> str:
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _package_path(root: str, init_file: str) -> str:
    """Which var_rt was counted: 'var_rt' when it is a git checkout's (named relative to it, so a committed JSON
    names no path of the machine that made it; `commit` says which), else the installed package's folder."""
    pkg = os.path.dirname(os.path.abspath(init_file))
    return "var_rt" if os.path.exists(os.path.join(root, ".git")) else pkg


def report(name: str, batch: int, res: dict) -> dict:
    import var_rt
    c: Counter = res["counter"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(var_rt.__file__)))
    ph = {p: {f: c.acc[(p, False)][f] + c.acc[(p, True)][f] for f in Counter.FIELDS} for p in PHASES}
    tot = {f: sum(ph[p][f] for p in PHASES) for f in Counter.FIELDS}
    in_layers = sum(c.acc[(p, True)]["launches"] for p in PHASES)
    modelled = {}
    for d in DEVICES:
        per = {p: c.time[(p, d)][1] for p in PHASES}
        t = sum(per.values())
        modelled[d] = {"ms": 1e3 * t, "img_per_s": batch / t if t else None,
                       **{f"{p}_ms": 1e3 * per[p] for p in PHASES},
                       "roofline_ms": 1e3 * sum(c.time[(p, d)][0] for p in PHASES)}
    return {
        "what": "var_rt cost model: launches, FLOPs and bytes counted on the meta device (fast backend); MODELLED "
                "times, not measurements: a measured GPU row always wins",
        "config": name, "description": CONFIGS.get(name, name), "batch": batch,
        "commit": _git(root, "rev-parse", "--short", "HEAD"),
        "tree_dirty": bool(_git(root, "status", "--porcelain", "--", "var_rt", "kernels", "csrc")),
        "var_rt_path": _package_path(root, var_rt.__file__),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__, "backend": fast_backend(),
        "sampling": {k: v for k, v in res["sampling"].items() if k != "seed"},
        **({"stream_every": res["stream_every"]} if res.get("stream_every") else {}),
        **({"sjd": {"window": res["sjd"][0], "passes": res["sjd"][1],
                    "passes_note": "an input (acceptance is data-dependent), not counted: see --sjd-passes"}}
           if res.get("sjd") else {}),
        "steps": res["steps"], "layers_x_steps": res["layers_x_steps"], "layer_steps": c.layer_steps,
        "launches": {"total": tot["launches"], **{p: ph[p]["launches"] for p in PHASES}},
        "h2d_copies": tot["h2d"],
        "launches_in_layers": in_layers,
        "launches_per_layer_step": in_layers / c.layer_steps if c.layer_steps else None,
        "layer_step_ops": {k: round(v / c.layer_steps, 3)
                           for k, v in sorted(c.by_op_layer.items(), key=lambda kv: -kv[1])} if c.layer_steps else {},
        "graph_nodes": ph["tokens"]["launches"],
        "flops": {"gemm": tot["gemm_flops"], "attention": tot["attn_flops"], "conv": tot["conv_flops"],
                  "by_phase": {p: {"gemm": ph[p]["gemm_flops"], "attention": ph[p]["attn_flops"],
                                   "conv": ph[p]["conv_flops"]} for p in PHASES}},
        "bytes": {"non_gemm": tot["bytes"], "gemm": tot["gemm_bytes"], "conv": tot["conv_bytes"],
                  "non_gemm_by_phase": {p: ph[p]["bytes"] for p in PHASES}},
        "peak_bytes": {"estimate": res["static_bytes"] + res["kv_pool_bytes"] + c.peak, "weights": res["static_bytes"],
                       "kv_pool": res["kv_pool_bytes"], "transient_peak": c.peak} if c.track_memory else None,
        "top_ops": {p: {k: {"launches": v[0], "bytes": v[1], "H100_ms": round(1e3 * v[2], 3)}
                        for k, v in sorted(c.by_op[p].items(), key=lambda kv: -kv[1][2])[:20]} for p in PHASES},
        "fast_ops": c.fast_ops, "attention_ops_without_flops": sorted(c.no_flops),
        "model": {"formula": MODEL, "ceilings": CEILINGS,
                  "graph": "graph nodes = launches of the token generation (captured in a CUDA graph); the decoder "
                           "and CPU -> GPU copies run eagerly"},
        "modelled": modelled, "cpu_seconds": round(res["cpu_s"], 2),
    }


def summary(r: dict) -> dict:
    """The headline figures of one report (summary.json of --all)."""
    return {k: r[k] for k in ("config", "batch", "commit", "tree_dirty", "date", "launches", "h2d_copies",
                              "launches_per_layer_step", "graph_nodes", "flops", "bytes", "peak_bytes")} | {
        "modelled": {d: {k: round(v, 3) for k, v in r["modelled"][d].items()} for d in DEVICES}}


def table(rows) -> str:
    head = (f"{'config':<16}{'B':>4}{'launches':>10}{'tokens':>9}{'decode':>8}{'/lyr-step':>10}{'GEMM TF':>9}"
            f"{'attn TF':>9}{'conv TF':>9}{'nonGEMM GB':>11}{'peak GiB':>9}{'H100 ms':>9}{'img/s':>8}{'H200 ms':>9}"
            f"{'img/s':>8}")
    lines = ["MODELLED figures (cost model on the meta device), NOT measurements: a measured GPU row always wins.",
             head, "-" * len(head)]
    for r in rows:
        m = r["modelled"]
        lpls = r["launches_per_layer_step"]
        name = r["config"] + (f" skip{r['sampling']['cfg_skip_last']}" if r["sampling"].get("cfg_skip_last") else "")
        name += f" stream{r['stream_every']}" if r.get("stream_every") else ""
        name += f" sjd{r['sjd']['window']}x{r['sjd']['passes']}" if r.get("sjd") else ""
        peak = r["peak_bytes"]["estimate"] / 2**30 if r["peak_bytes"] else float("nan")
        lines.append(f"{name:<16}{r['batch']:>4}{r['launches']['total']:>10}{r['launches']['tokens']:>9}"
                     f"{r['launches']['decode']:>8}{lpls if lpls is None else round(lpls, 2)!s:>10}"
                     f"{r['flops']['gemm'] / 1e12:>9.3f}{r['flops']['attention'] / 1e12:>9.3f}"
                     f"{r['flops']['conv'] / 1e12:>9.3f}{r['bytes']['non_gemm'] / 1e9:>11.2f}{peak:>9.2f}"
                     f"{m['H100']['ms']:>9.1f}{m['H100']['img_per_s']:>8.1f}{m['H200']['ms']:>9.1f}"
                     f"{m['H200']['img_per_s']:>8.1f}")
    lines.append("model: " + MODEL)
    return "\n".join(lines)


def run_one(name: str, batch: int, track_memory=True, cfg_skip_last: int = 0, stream_every=None, sjd=None) -> dict:
    """cfg_skip_last (VAR configs): the last M scales without the unconditional rows (guidance skipping).
    stream_every (VAR configs): a streaming-previews generation, a preview every E scales. sjd=(L, P) (sequential
    LlamaGen configs): batched SJD, windows of L, P passes."""
    pipe, window = build(name)
    skip = {"cfg_skip_last": cfg_skip_last} if cfg_skip_last else {}
    return report(name, batch, count(pipe, batch, zipar_window=window, track_memory=track_memory,
                                     stream_every=stream_every, sjd=sjd, **skip))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--all", action="store_true",
                   help="every config at batch 1 and 64 (LlamaGen 1 and 8), JSON to --out-dir")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cost"))
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory tracking")
    p.add_argument("--stream-every", type=int, default=None, metavar="E",
                   help="VAR configs: count list(pipe.stream(labels, every=E)) (streaming previews) instead of pipe()")
    p.add_argument("--cfg-skip-last", type=int, default=0, metavar="M",
                   help="VAR configs: the last M scales run the conditional rows alone (guidance skipping; 0 = off)")
    p.add_argument("--sjd-window", type=int, default=0, metavar="L",
                   help="llamagen-xl-384 / tiny-llamagen: batched Speculative Jacobi Decoding with windows of L")
    p.add_argument("--sjd-passes", type=int, default=None, metavar="P",
                   help="with --sjd-window: the passes per generation (acceptance decides them; on meta there is "
                        "nothing to accept, so give them: measured, or e.g. 0.55 x 576 = 317 from the demo "
                        "LlamaGen's SJD L=8 ratio)")
    a = p.parse_args(argv)
    if a.sjd_window or a.sjd_passes is not None:
        if a.all or a.config not in ("llamagen-xl-384", "tiny-llamagen"):
            p.error("--sjd-window is for one sequential LlamaGen config (llamagen-xl-384, tiny-llamagen)")
        if a.sjd_window < 1 or a.sjd_passes is None or a.sjd_passes < 1:
            p.error("--sjd-window L needs L >= 1 and --sjd-passes P >= 1 (the passes per generation)")
    if not a.all and not a.config:
        p.error("give --config NAME (and --batch B) or --all")
    if a.cfg_skip_last and (a.all or a.config not in ("d30", "code8", "code6", "tiny-var")):
        p.error("--cfg-skip-last is for one VAR config (d30, code8, code6, tiny-var), not --all or LlamaGen")
    if a.stream_every and (a.all or a.config not in ("d30", "code8", "code6", "tiny-var")):
        p.error("--stream-every is for one VAR config (d30, code8, code6, tiny-var), not --all or LlamaGen")
    if a.all:
        os.makedirs(a.out_dir, exist_ok=True)
        rows = []
        for name, batches in ALL:
            for b in batches:
                r = run_one(name, b, not a.no_memory)
                rows.append(r)
                with open(os.path.join(a.out_dir, f"{name}_b{b}.json"), "w") as f:
                    json.dump(r, f, indent=1)
                print(f"{name} batch {b}: {r['launches']['total']} launches, {r['cpu_seconds']} s on the CPU",
                      file=sys.stderr)
        text = table(rows)
        with open(os.path.join(a.out_dir, "summary.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
            json.dump([summary(r) for r in rows], f, indent=1)
        print(text)
        return 0
    r = run_one(a.config, a.batch, not a.no_memory, a.cfg_skip_last, a.stream_every,
                (a.sjd_window, a.sjd_passes) if a.sjd_window else None)
    print(json.dumps(r, indent=1) if a.json else table([r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
