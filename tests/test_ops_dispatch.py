"""var_rt.ops' dispatch: backend names, use_backend's scope, the Triton gate's fallbacks and warnings.

All on CPU tensors; no kernel runs here (the gate is tested on loaders that fail or on a CPU without the
interpreter), so these tests need no triton.
"""
import pathlib
import re
import sys
import threading
import warnings

import pytest
import torch

from var_rt import ops
from var_rt.ops import dispatch

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch):
    """No warning issued and no kernel loaded yet, as in a new process; VAR_RT_BACKEND unset."""
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.delenv("VAR_RT_BACKEND", raising=False)
    return monkeypatch


def _var_rt_warnings(rec):
    return [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning) and "var_rt" in str(w.message)]


# ---- names ------------------------------------------------------------------------------------------------------
def test_resolve_backend_defaults_aliases_and_errors(fresh):
    assert ops.BACKENDS == ("torch", "fast")
    assert ops.resolve_backend(None, "cpu") == "torch"
    assert ops.resolve_backend(None, torch.device("cuda", 0)) == "fast"
    assert ops.resolve_backend(None, "meta") == "torch"
    for name in ("fast", "triton", "cuda"):
        assert ops.resolve_backend(name, "cpu") == "fast"
    assert ops.resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match=r"'tpu'.*'torch', 'fast'"):
        ops.resolve_backend("tpu", "cpu")
    fresh.setenv("VAR_RT_BACKEND", "triton")
    assert ops.resolve_backend(None, "cpu") == "fast"
    assert ops.resolve_backend("torch", "cpu") == "torch"       # an explicit choice beats the environment
    fresh.setenv("VAR_RT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="VAR_RT_BACKEND"):
        ops.resolve_backend(None, "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        with ops.use_backend("nope"):
            pass


# ---- use_backend ------------------------------------------------------------------------------------------------
def test_use_backend_nests_and_restores(fresh):
    assert ops.default_backend(CPU) == "torch"
    with ops.use_backend("cuda"):                                     # alias, stored canonical
        assert ops.default_backend(CPU) == "fast"
        with ops.use_backend("torch"):
            assert ops.default_backend("cuda") == "torch"
            with ops.use_backend(None):                               # None keeps the enclosing choice
                assert ops.default_backend("cuda") == "torch"
        assert ops.default_backend(CPU) == "fast"
        with pytest.raises(RuntimeError):
            with ops.use_backend("torch"):
                raise RuntimeError("unwinds")
        assert ops.default_backend(CPU) == "fast"
    assert ops.default_backend(CPU) == "torch"


def test_a_thread_does_not_see_another_threads_backend(fresh):
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def forced_fast():
        with ops.use_backend("fast"):
            inside.set()
            release.wait(10)
            seen["a"] = ops.default_backend(CPU)

    def plain():
        inside.wait(10)
        seen["b"] = ops.default_backend(CPU)                          # while the other thread holds "fast"
        with ops.use_backend("torch"):
            seen["c"] = ops.default_backend("cuda")
        release.set()

    with ops.use_backend("torch"):                                    # nor this thread's choice
        threads = [threading.Thread(target=forced_fast), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert ops.default_backend(CPU) == "torch"
    assert seen == {"a": "fast", "b": "torch", "c": "torch"}


# ---- the gate ---------------------------------------------------------------------------------------------------
def test_kernel_that_fails_to_import_runs_the_reference_with_one_warning(fresh):
    fresh.setenv("TRITON_INTERPRET", "1")                             # past the device check, on to the import
    fresh.setitem(sys.modules, "var_rt.kernels.swiglu", None)          # `import` raises ImportError
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(ops.swiglu(a, b, backend="fast"), ops.swiglu_ref(a, b), rtol=0, atol=0)
    msgs = _var_rt_warnings(rec)
    assert len(msgs) == 1 and "swiglu" in msgs[0] and "torch reference" in msgs[0], msgs
    impl, why = ops.describe_backends(CPU, "fast")["swiglu"]
    assert impl == dispatch.TORCH and "var_rt.kernels.swiglu" in why


def test_broken_kernel_module_runs_the_reference_with_one_warning(fresh, tmp_path):
    (tmp_path / "var_rt_broken_kernel.py").write_text("raise RuntimeError('half-edited kernel')\n")
    fresh.syspath_prepend(str(tmp_path))
    fresh.setenv("TRITON_INTERPRET", "1")

    def loader():
        import var_rt_broken_kernel
        return var_rt_broken_kernel.kernel
    loader.op = "broken_op"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert dispatch.fast_kernel(loader, "fast", CPU) is None
        assert dispatch.fast_kernel(loader, "triton", CPU) is None
        assert dispatch.fast_kernel(loader, "torch", CPU) is None
    msgs = _var_rt_warnings(rec)
    assert len(msgs) == 1 and "broken_op" in msgs[0] and "half-edited kernel" in msgs[0], msgs


def test_fast_on_cpu_without_interpreter_warns_once_in_total(fresh):
    fresh.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    sc, sh = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    w = torch.randn(16, generator=g)
    img = torch.randn(1, 4, 3, 3, generator=g)
    logits, seeds = torch.randn(2, 3, 11, generator=g), torch.tensor([1, 2])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ops.use_backend("cuda"):                                 # what `--backend cuda` did on a CPU
            for _ in range(2):
                torch.testing.assert_close(ops.adaln(x, sc, sh), ops.adaln_ref(x, sc, sh), rtol=0, atol=0)
                torch.testing.assert_close(ops.rms_norm(x, w), ops.rms_norm_ref(x, w), rtol=0, atol=0)
                torch.testing.assert_close(ops.swiglu(x, x), ops.swiglu_ref(x, x), rtol=0, atol=0)
                torch.testing.assert_close(ops.upsample_bicubic(img, 5), ops.upsample_bicubic_ref(img, 5))
                assert torch.equal(ops.sample_tokens(logits, seeds, 0, top_k=3),
                                   ops.sample_tokens_ref(logits, seeds, 0, top_k=3))
                assert not ops.decoder_channels_last(CPU)
    msgs = _var_rt_warnings(rec)
    assert len(msgs) == 1 and "CUDA" in msgs[0] and "torch reference" in msgs[0], msgs


def test_torch_backend_never_touches_the_gate(fresh):
    def gate(*a, **k):
        raise AssertionError("the torch backend asked for a kernel")
    fresh.setattr(dispatch, "triton_fn", gate)
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    with ops.use_backend("torch"):
        ops.rms_norm(x, w)
    ops.rms_norm(x, w, backend="torch")


def test_triton_fn_is_the_one_patch_point(fresh):
    """Every Triton launch asks dispatch.triton_fn, looked up at call time (the cost model replaces it)."""
    asked = []

    def gate(op, device, loader):
        asked.append((op, loader.op))
        return lambda x, weight, eps: ("kernel", op)
    fresh.setattr(dispatch, "triton_fn", gate)
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    assert ops.rms_norm(x, w, backend="fast") == ("kernel", "rms_norm")
    assert asked == [("rms_norm", "rms_norm")]


# ---- describe_backends ------------------------------------------------------------------------------------------
def test_describe_backends_names_every_op(fresh):
    want = {"var_attention", "zipar_attention", "adaln", "residual_adaln", "group_norm_silu",
            "residual_group_norm_silu", "rms_norm", "residual_rms_norm", "linear_gelu", "swiglu", "rope_kv_write",
            "upsample_bicubic", "downsample_area", "sample_tokens", "rvq_step"}
    labels = {dispatch.TORCH, dispatch.TRITON, dispatch.C_CPU, dispatch.C_CUDA, dispatch.CUBLASLT}
    fresh.delenv("TRITON_INTERPRET", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # describing warns about nothing
        ref = ops.describe_backends("cpu", "torch")
        fast = ops.describe_backends("cpu", "fast")
    assert set(ref) == set(fast) == want
    assert all(impl == dispatch.TORCH and why for impl, why in ref.values())
    assert all(impl in labels and why for impl, why in fast.values())
    assert fast["var_attention"] == (dispatch.TORCH, "Triton needs a CUDA device (or TRITON_INTERPRET=1)")
    assert fast["linear_gelu"][0] == dispatch.TORCH
    assert fast["rvq_step"][0] in (dispatch.C_CPU, dispatch.TORCH)  # _C's CPU loop wherever _C is built
    meta = ops.describe_backends("meta", "fast")
    assert meta["linear_gelu"][0] == dispatch.CUBLASLT


# ---- source rules -----------------------------------------------------------------------------------------------
def test_no_kernel_is_imported_from_a_string():
    """Each dispatch names its kernel in an import statement a reader (or an editor) can follow."""
    root = pathlib.Path(ops.__file__).parent
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "dispatch.py", "attention.py", "norms.py", "rvq.py"}
    for f in files:
        src = f.read_text()
        assert not re.search(r"\bimportlib\b|__import__|import_module", src), f.name
    loaders = "".join(f.read_text() for f in files)
    for mod in ("attention", "zipar_attention", "adaln", "groupnorm", "rmsnorm", "rope_kv", "swiglu", "resample",
                "sampling"):
        assert f"from var_rt.kernels.{mod} import " in loaders, mod
