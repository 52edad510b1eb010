"""Build of var_rt's extension var_rt._C (metadata, packages and package data live in pyproject.toml only).

var_rt._C is built by ninja from a build.ninja this file writes: c++ for csrc/*.cpp (pybind11 + Python headers),
nvcc for csrc/*.cu when CUDA is on, one link step. It does not link torch. CUDA is on when `nvcc` is found
(CUDA_HOME/bin, then PATH); VAR_RT_CUDA=0 turns it off, VAR_RT_CUDA=1 makes a missing nvcc an error. The CUDA
runtime is linked statically (libcudart_static + -ldl -lrt -lpthread), with its symbols kept private, so the
module imports on machines with no GPU or driver and never mixes with torch's own libcudart.
Works for `pip install .` (isolated or not) and `pip install -e .` (the .so lands next to var_rt/__init__.py).
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CUDA_ARCHS = ("80", "90")  # A100, H100/H200: SASS for each, no PTX JIT at load time


def _log(msg):
    print(f"[var_rt setup] {msg}", flush=True)


def find_nvcc():
    """Path to nvcc, or None. VAR_RT_CUDA=0: None; VAR_RT_CUDA=1: error if missing."""
    flag = os.environ.get("VAR_RT_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return None
    cands = [os.path.join(os.environ[k], "bin", "nvcc") for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    cands.append(shutil.which("nvcc"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    if flag in ("1", "on", "true", "yes"):
        raise RuntimeError("VAR_RT_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return None


def cuda_lib_dir(nvcc):
    """The folder with libcudart_static.a for this nvcc (nvcc may be a wrapper script, so ask it for TOP)."""
    tops = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
        if m:
            tops.insert(0, os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    tops += [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    for top in filter(None, tops):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            d = os.path.join(top, sub)
            if os.path.isfile(os.path.join(d, "libcudart_static.a")):
                return d
    raise RuntimeError(f"nvcc found at {nvcc} but libcudart_static.a is not in its CUDA install ({tops})")


def find_ninja():
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:  # the `ninja` PyPI package (a build requirement) ships the binary
        import ninja
        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    raise RuntimeError("ninja not found: pip install ninja")


def _esc(path):
    """A path as ninja wants it in build lines."""
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _q(path):
    return shlex.quote(path)


class NinjaBuildExt(build_ext):
    """build_ext that writes build.ninja into build_temp and runs ninja; the .so goes where setuptools expects it
    (build_lib, then copied next to the sources for --inplace / editable installs by setuptools itself)."""

    def build_extension(self, ext):
        import pybind11

        out_so = os.path.abspath(self.get_ext_fullpath(ext.name))
        tmp = os.path.abspath(os.path.join(self.build_temp, "var_rt_C"))
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out_so), exist_ok=True)

        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
        nvcc = find_nvcc()
        incs = [CSRC, pybind11.get_include(), sysconfig.get_paths()["include"]]
        plat = sysconfig.get_paths().get("platinclude")
        if plat and plat not in incs:
            incs.append(plat)
        inc_flags = " ".join("-I" + _q(i) for i in incs)
        defs = "-DVAR_RT_WITH_CUDA" if nvcc else ""
        cflags = f"-O3 -std=c++17 -fPIC -fvisibility=hidden -Wall -Wno-unused-function {defs} {inc_flags}"
        ldflags = "-shared -Wl,--exclude-libs,ALL -lpthread"

        cpp_srcs = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
        cu_srcs = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) if nvcc else []
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {cflags}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
        ]
        if nvcc:
            libdir = cuda_lib_dir(nvcc)
            gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS)
            nvflags = (f"-O3 -std=c++17 -ccbin {_q(cxx)} -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
                       f"{gencode} -cudart static {defs} -I{_q(CSRC)}")
            lines += [
                f"nvcc = {_q(nvcc)}",
                f"nvflags = {nvflags}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = nvcc $in",
            ]
            # static cudart; --exclude-libs keeps its symbols local so torch's libcudart never interposes
            ldflags = f"-shared -Wl,--exclude-libs,ALL -L{_q(libdir)} -l:libcudart_static.a -ldl -lrt -lpthread"
            _log(f"CUDA on: {nvcc} (sm_{', sm_'.join(CUDA_ARCHS)}), static cudart from {libdir}")
        else:
            _log("CUDA off: " + ("VAR_RT_CUDA=0" if os.environ.get("VAR_RT_CUDA") else "nvcc not found") + "; CPU only")
        lines += [
            f"ldflags = {ldflags}",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
            "  description = link $out",
        ]
        objs = []
        for src in cpp_srcs + cu_srcs:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            objs.append(obj)
            lines.append(f"build {_esc(obj)}: {'nvcc' if src.endswith('.cu') else 'cxx'} {_esc(src)}")
        lines.append(f"build {_esc(out_so)}: link {' '.join(_esc(o) for o in objs)}")
        lines.append(f"default {_esc(out_so)}")
        ninja_file = os.path.join(tmp, "build.ninja")
        text = "\n".join(lines) + "\n"
        old = open(ninja_file).read() if os.path.exists(ninja_file) else None
        if old != text:
            with open(ninja_file, "w") as f:
                f.write(text)
        jobs = ["-j", str(self.parallel)] if isinstance(self.parallel, int) and self.parallel > 0 else []
        cmd = [find_ninja(), "-f", ninja_file] + jobs
        _log(" ".join(cmd))
        subprocess.run(cmd, cwd=tmp, check=True)


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, pattern)))


setup(
    # sources listed for sdists and for setuptools' bookkeeping; NinjaBuildExt does the compiling
    ext_modules=[Extension("var_rt._C", sources=_rel("*.cpp") + _rel("*.cu"), depends=_rel("*.h"))],
    cmdclass={"build_ext": NinjaBuildExt},
)
