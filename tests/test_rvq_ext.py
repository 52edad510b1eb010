"""var_rt._C (csrc/) against the spec ops.rvq_step_ref: CPU loops always, the CUDA kernels where a GPU is."""
import os
import shutil
import warnings

import pytest
import torch

from var_rt import _ext, ops
from var_rt.models.vqvae import phi_index

_C = _ext.load()
needs_C = pytest.mark.skipif(_C is None, reason=f"var_rt._C not importable: {_ext.load_error()}")
TOL = 1e-5

PATCH_NUMS = {
    "var256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "var512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    "odd": (1, 3, 7, 11),
}


def _weights(Cv, V, n_phi=4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    codebook = 0.5 * torch.randn(V, Cv, generator=g)  # f_hat ends near |5|, where fp32 steps are ~5e-7
    phis = [(torch.randn(Cv, Cv, 3, 3, generator=g) / (3 * Cv ** 0.5), 0.1 * torch.randn(Cv, generator=g))
            for _ in range(n_phi)]
    return codebook.to(device), [(w.to(device), b.to(device)) for w, b in phis]


def _run_sequence(step, pns, B, Cv, V, resi, device="cpu", seed=0):
    """Runs every scale of `pns` with `step` and with the reference; yields (si, max |diff| f_hat, next)."""
    codebook, phis = _weights(Cv, V, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    H = pns[-1]
    f_ref = torch.zeros(B, Cv, H, H)
    f_ext = f_ref.clone().to(device)
    for si, pn in enumerate(pns):
        idx = torch.randint(0, V, (B, pn * pn), generator=g)
        pn_next = pns[si + 1] if si + 1 < len(pns) else None
        w, b = phis[phi_index(si, len(pns), len(phis))]
        nxt_ref = ops.rvq_step_ref(idx, codebook, w, b, f_ref, pn, pn_next, resi)
        nxt_ref = None if nxt_ref is None else nxt_ref.clone()  # pn_next == H: the ref returns a view of f_hat
        nxt = step(idx.to(device), codebook.to(device), w.to(device), b.to(device), f_ext, pn, pn_next, resi)
        d_f = (f_ext.cpu() - f_ref).abs().max().item()
        if pn_next is None:
            assert nxt is None
            d_n = 0.0
        else:
            assert nxt.shape == (B, pn_next * pn_next, Cv) and nxt.dtype == torch.float32 and nxt.is_contiguous()
            d_n = (nxt.cpu() - nxt_ref).abs().max().item()
        yield si, d_f, d_n


# ---------------------------------------------------------------------------------------------------------------
@needs_C
@pytest.mark.parametrize("name", sorted(PATCH_NUMS))
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("Cv", [8, 32])
def test_cpu_matches_reference(name, B, Cv):
    pns = PATCH_NUMS[name]
    resi = 0.5 if name != "odd" else 0.3
    fn = _ext.rvq_step_fn("cpu")
    assert fn is not None
    for si, d_f, d_n in _run_sequence(fn, pns, B, Cv, V=37, resi=resi):
        assert d_f <= TOL, f"{name} scale {si}: f_hat differs by {d_f}"
        assert d_n <= TOL, f"{name} scale {si}: next input differs by {d_n}"


def _elementwise(idx, codebook, phi_w, phi_b, f_hat, pn, pn_next, resi):
    """The CUDA kernels' element code, run on the host by _C (checks the kernels' math where no GPU is)."""
    B, Cv, H, _ = f_hat.shape
    scratch = torch.empty_like(f_hat)
    out = None if pn_next is None else torch.empty(B, pn_next * pn_next, Cv)
    _C.rvq_step_cpu_elementwise(idx.data_ptr(), codebook.data_ptr(), codebook.shape[0], phi_w.data_ptr(),
                                phi_b.data_ptr(), f_hat.data_ptr(), scratch.data_ptr(),
                                0 if out is None else out.data_ptr(), B, Cv, H, pn, pn_next or 0, resi)
    return out


@needs_C
@pytest.mark.parametrize("name", sorted(PATCH_NUMS))
def test_cuda_kernel_code_on_host_matches_reference(name):
    for si, d_f, d_n in _run_sequence(_elementwise, PATCH_NUMS[name], 3, 8, V=37, resi=0.5):
        assert d_f <= TOL and d_n <= TOL, f"{name} scale {si}: {d_f} {d_n}"


@needs_C
def test_cuda_kernel_code_on_host_bad_id_gives_nan():
    kw = _valid()
    kw["idx"][0, 0] = 10 ** 9
    _elementwise(**kw)
    assert torch.isnan(kw["f_hat"][0]).any() and not torch.isnan(kw["f_hat"][1]).any()


@needs_C
@pytest.mark.parametrize("pn,H,pn_next", [(16, 16, 16), (5, 16, 16), (4, 7, 3), (9, 8, 5), (2, 5, 1), (1, 1, 1),
                                          (3, 16, None)])
def test_cpu_single_steps(pn, H, pn_next):
    """Edge sizes one step at a time: pn == H (no upsample), pn_next == H (plain copy), pn > H, 1x1 maps."""
    B, Cv, V = 2, 5, 11
    codebook, [(w, b)] = _weights(Cv, V, n_phi=1, seed=pn * 100 + H)
    f0 = torch.randn(B, Cv, H, H)
    idx = torch.randint(0, V, (B, pn * pn))
    f_ref, f_ext = f0.clone(), f0.clone()
    nxt_ref = ops.rvq_step_ref(idx, codebook, w, b, f_ref, pn, pn_next, 0.5)
    nxt = _ext.rvq_step_cpu(idx, codebook, w, b, f_ext, pn, pn_next, 0.5)
    assert (f_ext - f_ref).abs().max().item() <= TOL
    if pn_next is None:
        assert nxt is None
    else:
        assert (nxt - nxt_ref).abs().max().item() <= TOL


@needs_C
def test_cpu_scratch_and_out_reused_and_threads(monkeypatch):
    monkeypatch.setattr(_ext, "_THREADS_MIN_MACS", 0)  # threads even for this small step
    B, Cv, V, pns = 4, 16, 50, PATCH_NUMS["var256"]
    codebook, phis = _weights(Cv, V)
    H = pns[-1]
    scratch = torch.full((B, Cv, H, H), float("nan"))
    f_ref, f_ext = torch.zeros(B, Cv, H, H), torch.zeros(B, Cv, H, H)
    n_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # more threads than this machine's cores: the work items must not race
        for si, pn in enumerate(pns):
            idx = torch.randint(0, V, (B, pn * pn))
            pn_next = pns[si + 1] if si + 1 < len(pns) else None
            out = None if pn_next is None else torch.full((B, pn_next ** 2, Cv), float("nan"))
            w, b = phis[si % 4]
            r = ops.rvq_step_ref(idx, codebook, w, b, f_ref, pn, pn_next)
            got = _ext.rvq_step_cpu(idx, codebook, w, b, f_ext, pn, pn_next, scratch=scratch, out=out)
            assert got is out
            assert (f_ext - f_ref).abs().max().item() <= TOL
            if r is not None:
                assert (got - r).abs().max().item() <= TOL
    finally:
        torch.set_num_threads(n_threads)


@needs_C
def test_ops_dispatch_uses_extension_on_cpu():
    B, Cv, V, H = 2, 8, 20, 10
    codebook, [(w, b)] = _weights(Cv, V, n_phi=1)
    idx = torch.randint(0, V, (B, 36))
    f_ref, f_ext = torch.zeros(B, Cv, H, H), torch.zeros(B, Cv, H, H)
    r = ops.rvq_step(idx, codebook, w, b, f_ref, 6, 8, backend="torch")
    got = ops.rvq_step(idx, codebook, w, b, f_ext, 6, 8, backend="fast")  # the fast backend routes to _C (on the CPU too)
    assert got.is_contiguous() and (got - r).abs().max().item() <= TOL
    assert _ext.describe("cpu", "fast") == ("cpp", "_C CPU loop")
    assert _ext.describe("cpu", "torch")[0] == "torch"


# ---------------------------------------------------------------------------------------------------------------
def _valid(B=2, Cv=4, H=6, pn=3, V=9):
    return dict(idx=torch.randint(0, V, (B, pn * pn)), codebook=torch.randn(V, Cv), phi_w=torch.randn(Cv, Cv, 3, 3),
                phi_b=torch.randn(Cv), f_hat=torch.zeros(B, Cv, H, H), pn=pn, pn_next=4, resi=0.5)


BAD = {
    "f_hat float64": (dict(f_hat=torch.zeros(2, 4, 6, 6, dtype=torch.float64)), "f_hat must be torch.float32"),
    "f_hat not square": (dict(f_hat=torch.zeros(2, 4, 6, 5)), r"f_hat must be \(B, Cv, H, H\)"),
    "f_hat 3-d": (dict(f_hat=torch.zeros(4, 6, 6)), r"f_hat must be \(B, Cv, H, H\)"),
    "f_hat non-contiguous": (dict(f_hat=torch.zeros(2, 6, 6, 4).permute(0, 3, 1, 2)), "f_hat must be contiguous"),
    "idx int32": (dict(idx=torch.zeros(2, 9, dtype=torch.int32)), "idx must be torch.int64"),
    "idx wrong shape": (dict(idx=torch.zeros(2, 16, dtype=torch.int64)), r"idx must have shape \(2, 9\)"),
    "idx non-contiguous": (dict(idx=torch.zeros(9, 2, dtype=torch.int64).t()), "idx must be contiguous"),
    "codebook fp16": (dict(codebook=torch.randn(9, 4).half()), "codebook must be torch.float32"),
    "codebook wrong width": (dict(codebook=torch.randn(9, 5)), r"codebook must have shape \(9, 4\)"),
    "codebook 1-d": (dict(codebook=torch.randn(9)), r"codebook must be a \(V, Cv\) tensor"),
    "phi_w bf16": (dict(phi_w=torch.randn(4, 4, 3, 3).bfloat16()), "phi_w must be torch.float32"),
    "phi_w 1x1": (dict(phi_w=torch.randn(4, 4, 1, 1)), r"phi_w must have shape \(4, 4, 3, 3\)"),
    "phi_b wrong size": (dict(phi_b=torch.randn(5)), r"phi_b must have shape \(4,\)"),
    "phi_b on meta": (dict(phi_b=torch.empty(4, device="meta")), "phi_b is on meta"),
    "phi_w not a tensor": (dict(phi_w=[[1.0]]), "phi_w must be a torch.Tensor"),
    "pn zero": (dict(pn=0, idx=torch.zeros(2, 0, dtype=torch.int64)), "pn must be an int >= 1"),
    "pn float": (dict(pn=3.0), "pn must be an int >= 1"),
    "pn_next zero": (dict(pn_next=0), "pn_next must be None or an int >= 1"),
    "resi str": (dict(resi="0.5"), "resi must be a float"),
    "scratch wrong shape": (dict(scratch=torch.zeros(2, 4, 5, 5)), r"scratch must have shape \(2, 4, 6, 6\)"),
    "out wrong shape": (dict(out=torch.zeros(2, 9, 4)), r"out must have shape \(2, 16, 4\)"),
    "out without pn_next": (dict(out=torch.zeros(2, 16, 4), pn_next=None), "out given but pn_next is None"),
}


@needs_C
@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors(case):
    change, msg = BAD[case]
    kw = _valid()
    kw.update(change)
    f_before = kw["f_hat"].clone() if kw["f_hat"].dtype == torch.float32 else None
    with pytest.raises(ValueError, match=msg):
        _ext.rvq_step_cpu(**kw)
    if f_before is not None:
        assert torch.equal(kw["f_hat"], f_before)


@needs_C
@pytest.mark.parametrize("bad_id", [-1, 9, 10 ** 12])
def test_out_of_range_id_raises_and_leaves_f_hat(bad_id):
    kw = _valid()
    kw["f_hat"] = torch.randn(2, 4, 6, 6)
    kw["idx"][1, 4] = bad_id
    before = kw["f_hat"].clone()
    with pytest.raises(IndexError, match="out of range"):
        _ext.rvq_step_cpu(**kw)
    assert torch.equal(kw["f_hat"], before)


@needs_C
def test_raw_binding_rejects_bad_sizes():
    with pytest.raises(ValueError):
        _C.rvq_step_cpu(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0.5)  # vocab 0
    with pytest.raises(ValueError, match="null pointer"):
        _C.rvq_step_cpu(0, 0, 4, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0.5)


# ---------------------------------------------------------------------------------------------------------------
def test_load_and_describe_never_raise():
    m = _ext.load()
    assert (m is None) == (_ext.load_error() is not None)
    name, why = _ext.describe("cpu", "fast")
    assert name in ("cpp", "torch") and why
    name, why = _ext.describe("cuda", "fast")
    assert name in ("cuda", "torch") and why
    assert isinstance(_ext.has_cuda_code(), bool)


@needs_C
def test_cuda_device_count_is_safe_and_fallback_warns_once():
    assert _C.cuda_device_count() >= 0  # 0 (not a crash) with no GPU or driver
    if _C.cuda_device_count() > 0:
        pytest.skip("a GPU is visible: the fallback path is not taken")
    _ext._warned.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _ext.rvq_step_fn("cuda") is None
        assert _ext.rvq_step_fn(torch.device("cuda", 0)) is None
    msgs = [str(w.message) for w in rec if "rvq_step" in str(w.message)]
    assert len(msgs) == 1 and "torch reference" in msgs[0]
    assert _ext.describe("cuda", "fast")[0] == "torch"


@needs_C
def test_cuda_compiled_in_when_nvcc_present():
    """Cheap check of the build: nvcc on PATH (and VAR_RT_CUDA not 0) at install time means CUDA kernels inside.
    Assumes the install ran in this environment; reinstall after installing nvcc."""
    if os.environ.get("VAR_RT_CUDA", "").strip().lower() in ("0", "off", "false", "no"):
        pytest.skip("VAR_RT_CUDA=0")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no nvcc here")
    assert _C.has_cuda() is True
    assert _C.cuda_runtime_version() >= 12000
    assert hasattr(_C, "rvq_step_cuda")


# ---------------------------------------------------------------------------------------------------------------
cuda_ok = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda_code()),
                             reason="needs a CUDA GPU and _C built with CUDA")


@pytest.mark.cuda
@cuda_ok
@pytest.mark.parametrize("name", sorted(PATCH_NUMS))
@pytest.mark.parametrize("B", [1, 7])
def test_cuda_matches_reference(name, B):
    fn = _ext.rvq_step_fn("cuda")
    assert fn is not None, _ext.describe("cuda", "fast")
    for si, d_f, d_n in _run_sequence(fn, PATCH_NUMS[name], B, 32, V=37, resi=0.5, device="cuda"):
        assert d_f <= TOL, f"{name} scale {si}: f_hat differs by {d_f}"
        assert d_n <= TOL, f"{name} scale {si}: next input differs by {d_n}"


@pytest.mark.cuda
@cuda_ok
def test_cuda_graph_capture_replay():
    """A whole 10-scale accumulation captured in one CUDA graph (static buffers), replayed with new ids."""
    B, Cv, V, pns = 4, 32, 64, PATCH_NUMS["var256"]
    H, dev = pns[-1], torch.device("cuda")
    codebook, phis = _weights(Cv, V, device=dev)
    idx = [torch.zeros(B, pn * pn, dtype=torch.int64, device=dev) for pn in pns]
    f_hat = torch.zeros(B, Cv, H, H, device=dev)
    scratch = torch.empty_like(f_hat)
    outs = [torch.empty(B, pns[i + 1] ** 2, Cv, device=dev) for i in range(len(pns) - 1)]

    def run_all():
        f_hat.zero_()
        for si, pn in enumerate(pns):
            pn_next = pns[si + 1] if si + 1 < len(pns) else None
            w, b = phis[phi_index(si, len(pns), 4)]
            _ext.rvq_step_cuda(idx[si], codebook, w, b, f_hat, pn, pn_next, 0.5, scratch=scratch,
                               out=outs[si] if pn_next else None)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (loads the kernels)
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()

    for trial in range(2):
        g = torch.Generator().manual_seed(100 + trial)
        host_idx = [torch.randint(0, V, (B, pn * pn), generator=g) for pn in pns]
        for dst, src in zip(idx, host_idx):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        f_ref = torch.zeros(B, Cv, H, H)
        cb, ph = codebook.cpu(), [(w.cpu(), b.cpu()) for w, b in phis]
        for si, pn in enumerate(pns):
            pn_next = pns[si + 1] if si + 1 < len(pns) else None
            w, b = ph[phi_index(si, len(pns), 4)]
            r = ops.rvq_step_ref(host_idx[si], cb, w, b, f_ref, pn, pn_next, 0.5)
            if r is not None:
                r = r.clone()
                assert (outs[si].cpu() - r).abs().max().item() <= TOL, f"trial {trial} scale {si}"
        assert (f_hat.cpu() - f_ref).abs().max().item() <= TOL


@pytest.mark.cuda
@cuda_ok
def test_cuda_bad_id_gives_nan_not_a_crash():
    kw = _valid()
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw["idx"][0, 0] = 10 ** 9
    _ext.rvq_step_cuda(**kw)
    torch.cuda.synchronize()
    assert torch.isnan(kw["f_hat"][0]).any() and not torch.isnan(kw["f_hat"][1]).any()
