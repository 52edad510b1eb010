"""The Triton kernels compile for real GPUs (sm_90, sm_80) on a machine without one.

The interpreter tests (test_kernels.py) check the numbers; they cannot see what only the compiler sees (types
and layouts the GPU lowering rejects, shared-memory overflow, ptxas errors). This file compiles each kernel
ahead of time, down to a cubin, with the ptxas bundled in the triton wheel. It runs in a subprocess because a
process that imported the kernels under TRITON_INTERPRET=1 holds interpreter objects, not compilable ones.
`python tests/test_kernel_compile.py --all` compiles the full matrix (about a minute); the test runs a few.
Works with triton 3.2 .. 3.9 (the ahead-of-time API changed at 3.3; both spellings are here).
"""
import importlib
import os
import subprocess
import sys

import pytest


def test_kernels_compile_for_sm90_and_sm80():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


# ----------------------------------------------------------------------------------------------------------------
def _modules():
    return [importlib.import_module(f"var_rt.kernels.{m}") for m in ("attention", "adaln", "resample", "sampling")]


def _type(v, torch):
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
             torch.int64: "i64"}
    if isinstance(v, torch.Tensor):
        return "*" + names[v.dtype]
    if isinstance(v, float):
        return "fp32"
    return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"


def _compile(triton, torch, jf, args, consts, cc, warps=4, stages=3, **opts):
    """Ahead-of-time compile as a launch with these argument values would (1-valued ints specialised); opts: more
    launch options (enable_fp_fusion=False, ...)."""
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", cc, 32)
    names = jf.arg_names
    one = {n for n in names if n not in consts and isinstance(args[n], int) and args[n] == 1}
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
        from triton.backends.nvidia.compiler import CUDABackend
        vals = [consts[n] if n in consts else args[n] for n in names]
        attrs = CUDABackend(target).get_attrs_descriptor(jf.params, vals)
        sig = {n: _type(args[n], torch) for n in names if n not in consts}
        src = triton.compiler.ASTSource(jf, sig, {**consts, **{n: 1 for n in one}}, attrs)
    else:
        sig, const, attrs = {}, dict(consts), {}
        for i, n in enumerate(names):
            if n in consts or n in one:
                sig[n], const[n] = "constexpr", consts.get(n, 1)
            else:
                sig[n] = _type(args[n], torch)
                if isinstance(args[n], torch.Tensor) or (isinstance(args[n], int) and args[n] % 16 == 0):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = triton.compiler.ASTSource(jf, sig, const, attrs)
    return triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages, **opts))


def main(full: bool) -> int:
    import torch
    import triton
    try:
        attention, adaln, resample, sampling = _modules()
        from var_rt.kernels import groupnorm
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as _nv  # noqa: F401
    except Exception as e:  # pragma: no cover - a triton without the CUDA backend
        print(f"cannot compile ahead of time here: {type(e).__name__}: {e}")
        return 3

    def t(dt):
        return torch.empty(16, dtype=dt)

    n = 0
    ccs = (90, 80)
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16, torch.float32)
    for cc in ccs:
        for dt in dtypes:
            tiles = ((16, 16, 16, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 2))
            for D, bm, bn, w, st in (tiles if full else tiles[1:2]):
                if dt == torch.float32:
                    bm, bn, w, st = min(bm, 32), min(bn, 32), 4, 2
                for causal in ((False, True) if full else (cc == 90,)):
                    # qkv (N, l, 3, H, D) packed GEMM output; k and v pools (N, H, Lmax, D); out (N, l, H, D)
                    args = dict(QKV=t(dt), KP=t(dt), VP=t(dt), O=t(dt), SM=t(torch.float32), QS=t(torch.int64),
                                KS=t(torch.int32), sxn=169 * 3 * 30 * 64, sxl=3 * 30 * 64, sxw=30 * 64, sxh=64, sxd=1,
                                skn=30 * 680 * 64, skh=680 * 64, skm=64, skd=1, svn=30 * 680 * 64, svh=680 * 64,
                                svm=64, svd=1, son=169 * 30 * 64, sol=30 * 64, soh=64, sod=1,
                                s_sm=1, H=30, Lq=169, start=0 if causal else 342)
                    _compile(triton, torch, attention._var_attn_kernel, args,
                             dict(D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_CAUSAL=causal, F32_DOT=dt == torch.float32),
                             cc, w, st)
                    n += 1
            for br, bc, w in (((1, 2048, 4), (4, 64, 1), (32, 128, 8)) if full else ((1, 2048, 4),)):
                args = dict(X=t(dt), SC=t(dt), SH=t(torch.float32), Y=t(dt), R=128 * 169, L=169, C=1920,
                            sxn=169 * 1920, sxl=1920, sxc=1, scn=6 * 1920, scc=1, shn=0, shc=1, syn=169 * 1920,
                            syl=1920, syc=1, eps=1e-6)
                _compile(triton, torch, adaln._adaln_kernel, args, dict(BLOCK_R=br, BLOCK_C=bc), cc, w)
                n += 1
            # gated residual add + AdaLN (VAR-d30 rows), GroupNorm+SiLU (the VQVAE decoder's top level)
            args = dict(X=t(dt), YB=t(dt), G=t(dt), SC=t(dt), SH=t(dt), XO=t(dt), HO=t(dt), R=128 * 169, L=169,
                        C=1920, sxn=169 * 1920, sxl=1920, sxc=1, syn=169 * 1920, syl=1920, syc=1, sgn=6 * 1920, sgc=1, scn=6 * 1920, scc=1,
                        shn=6 * 1920, shc=1, son=169 * 1920, sol=1920, soc=1, shon=169 * 1920, shol=1920, shoc=1,
                        eps=1e-6)
            _compile(triton, torch, adaln._residual_adaln_kernel, args, dict(BLOCK_R=2, BLOCK_C=2048), cc, 4)
            # GroupNorm+SiLU at the VQVAE decoder's top level (b64, C 160, 256^2): NCHW, and the channels_last
            # stats / finalize / apply kernels, residual add fused
            f32, HW = torch.float32, 65536
            args = dict(X=t(dt), R=t(dt), S=t(dt), W=t(dt), B=t(dt), Y=t(dt), G=32, CPG=5, HW=HW, eps=1e-6)
            _compile(triton, torch, groupnorm._gn_nchw_kernel, args, dict(SILU=True, HAS_RES=True, BLOCK=2048), cc, 8)
            bc, ncc, bhw, rows, ns = groupnorm.nhwc_geometry(64, 160, HW, t(dt).element_size())
            geo = dict(HW=HW, C=160, CPG=5, ROWS=rows, NS=ns, NCC=ncc)
            _compile(triton, torch, groupnorm._nhwc_stats, dict(X=t(dt), R=t(dt), S=t(dt), P=t(f32), **geo),
                     dict(HAS_RES=True, BLOCK_HW=bhw, BLOCK_C=bc), cc, 8)
            bs, bg, bj = groupnorm.finalize_geometry(32, 5, ns)
            args = dict(P=t(f32), SRC=t(dt), MEAN=t(f32), RSTD=t(f32), G=32, HW=HW, C=160, CPG=5, NS=ns, eps=1e-6)
            _compile(triton, torch, groupnorm._gn_finalize, args, dict(BLOCK_S=bs, BLOCK_G=bg, BLOCK_J=bj), cc, 4)
            args = dict(SRC=t(dt), MEAN=t(f32), RSTD=t(f32), W=t(dt), B=t(dt), Y=t(dt), G=32, **geo)
            _compile(triton, torch, groupnorm._nhwc_apply, args, dict(SILU=True, BLOCK_HW=bhw, BLOCK_C=bc), cc, 8)
            n += 5
            rs = dict(X=t(dt), Y=t(dt), total=64 * 32 * 256, C=32, H=13, W=13, OH=16, OW=16, sxb=32 * 169,
                      sxc=169, sxh=13, sxw=1, syb=8192, syc=256, syh=16, syw=1)
            _compile(triton, torch, resample._bicubic_kernel, dict(rs, scale_h=13 / 16, scale_w=13 / 16),
                     dict(BLOCK=256), cc)
            _compile(triton, torch, resample._area_kernel, rs, dict(KH=3, KW=3, BLOCK=256), cc)
            n += 2
        # sampler (launched with enable_fp_fusion=False): VAR's bf16 (2B, l, V) head logits with one guidance t;
        # LlamaGen's 16k vocab with per-query steps and guidance tensors; fp32 logits without guidance
        cfgs = ((1, 4096, 1024, 4, True, True, torch.bfloat16, 1, False),
                (1, 16384, 4096, 16, True, False, torch.bfloat16, 2, True),
                (1, 4096, 1024, 4, True, True, torch.float32, 0, False),
                (1, 16384, 4096, 16, True, True, torch.float32, 0, False),
                (1, 16384, 4096, 16, True, True, torch.bfloat16, 1, False),
                (64, 32, 32, 4, True, True, torch.float16, 2, True),
                (1, 4096, 1024, 4, False, False, torch.float32, 1, True),
                (4, 512, 256, 4, False, True, torch.bfloat16, 0, False))
        for br, bv, ch, w, tk, tp, ldt, guide, step_t in (cfgs if full else cfgs[:3]):
            args = dict(LOGITS=t(ldt), SEEDS=t(torch.int64), OUT=t(torch.int64), STEPS=t(torch.int64),
                        GUIDES=t(torch.float32), R=64 * 169, l=169, B=64, V=bv - 3, s_lb=169 * bv, s_ll=bv, s_lv=1,
                        s_seed=1, s_ob=169, s_ol=1, s_step=1, s_g=1, step=3, top_k=900, one_minus_p=0.04,
                        inv_temp=1.0, g_a=2.5, g_t=1.5)
            k = _compile(triton, torch, sampling._sample_kernel, args,
                         dict(BLOCK_R=br, BLOCK_V=bv, CHUNK=ch, TOP_K=tk, TOP_P=tp, GUIDE=guide, STEP_T=step_t),
                         cc, w, 1, enable_fp_fusion=False)
            assert "fma.rn.f32" not in k.asm["ptx"] or not guide, "the CFG mix must not be contracted to an FMA"
            n += 1
        if not full:
            break  # the quick run: sm_90 only
    print(f"triton {triton.__version__}: {n} kernel configs compiled to cubin for sm_{'/'.join(map(str, ccs if full else ccs[:1]))}")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main("--all" in sys.argv))
