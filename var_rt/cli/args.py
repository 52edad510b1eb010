"""The model and sampling arguments shared by `var-rt generate` and `var-rt sample`, what they build (the pipeline:
`build_pipeline`; the keyword arguments of a call to it: `sampling_kwargs`), and the checks every command runs
before it loads anything (`check_model`, `check_output`, `check_count`, `check_device_arg`).

`check_model` reads nothing but the checkpoint files' keys and shapes (var_rt.loaders.inspect) and knows, before
any model is loaded or built: the model family (an option of the other family is an error naming both), every
file's family ("--vq: x.pth is a VAR VQVAE checkpoint; expected ..."), the class count, the VAR scale count
(presets, per-scale lists and --draft-steps are checked against it) and the LlamaGen token grid (--zipar-window).
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

import torch

SMALL_RANDOM = "small"  # --random-weights small: a few-layer VAR + thin VQVAE, fast on a CPU (the demo)
BACKEND_CHOICES = ["torch", "fast", "triton", "cuda"]  # --backend; triton and cuda are old names of fast
RANDOM_SPECS = "dN (e.g. d16), dDRAFT,dREFINE with --draft-steps (CoDe), small, or llamagen-B|L|XL|XXL|3B"
VAR_DEFAULTS = dict(cfg=4.0, top_k=900, top_p=0.95, temperature=1.0)
LLAMAGEN_DEFAULTS = dict(cfg=4.0, top_k=2000, top_p=1.0, temperature=1.0)
# options that only one family takes (argparse dest -> option)
VAR_ONLY = {"vae": "--vae", "drafter": "--drafter", "refiner": "--refiner", "draft_steps": "--draft-steps",
            "preset": "--preset"}
LLAMAGEN_ONLY = {"vq": "--vq", "image_size": "--image-size", "zipar_window": "--zipar-window",
                 "zipar_mask": "--zipar-mask", "sjd_window": "--sjd-window", "sjd_relaxed": "--sjd-relaxed"}


class UsageError(ValueError):
    """A bad command line: printed as one line `var-rt: error: ...`, exit code 2."""


def _floats(s: str):
    vals = [float(x) for x in s.split(",")]
    return vals[0] if len(vals) == 1 else vals


def _ints(s: str):
    vals = [int(x) for x in s.split(",")]
    return vals[0] if len(vals) == 1 else vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of: --model | --var | --drafter/--refiner | --llamagen | --random-weights)")
    g.add_argument("--model", metavar="NAME",
                   help="an official model by name, fetched through the Hugging Face Hub cache: var-d16 ... var-d36, "
                        "code-6 ... code-9, code-free-1 ... code-free-9, llamagen-xl-384 ... (var-rt models lists "
                        "them; var-rt download NAME fetches ahead of time)")
    g.add_argument("--revision", help="--model: the Hub revision (branch, tag or commit) of the model's repo")
    g.add_argument("--var", help="VAR checkpoint (var_d16.pth ... var_d36.pth)")
    g.add_argument("--vae", help="VQVAE checkpoint (vae_ch160v4096z32.pth)")
    g.add_argument("--drafter", help="CoDe drafter (var_d30.pth or drafter_N.pth)")
    g.add_argument("--refiner", help="CoDe refiner (var_d16.pth or refiner_N.pth)")
    g.add_argument("--draft-steps", type=int, help="CoDe: scales run by the drafter (1..K-1; K = drafter alone)")
    g.add_argument("--llamagen", help="LlamaGen c2i GPT checkpoint (c2i_XL_384.pt ...)")
    g.add_argument("--vq", help="LlamaGen VQ-16 tokenizer (vq_ds16_c2i.pt)")
    g.add_argument("--image-size", type=int, help="LlamaGen: 256 or 384 (read from the file when it says)")
    g.add_argument("--zipar-window", type=int, help="LlamaGen: ZipAR window w (default: sequential decoding)")
    g.add_argument("--zipar-mask", choices=["exact", "official"],
                   help="LlamaGen ZipAR visibility: exact (default: decoded predecessors only) or official (every "
                        "earlier slot, zero-filled when undecoded, as the official ZipAR code)")
    g.add_argument("--sjd-window", type=int, help="LlamaGen: Speculative Jacobi Decoding with L draft tokens per "
                                                  "pass (0 = off; with --zipar-window: SJD + ZipAR, a window per row)")
    g.add_argument("--sjd-relaxed", type=int, help="LlamaGen SJD: relaxed acceptance over k codebook neighbours "
                                                   "(approximate; 0 = off)")
    g.add_argument("--random-weights", metavar="SPEC",
                   help="no files: 'd16' (any depth), 'd30,d16' with --draft-steps for CoDe, 'small' for a tiny "
                        "demo model, or 'llamagen-B' ... 'llamagen-XL'")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default bf16 on GPU, fp32 on CPU")
    g.add_argument("--backend", choices=BACKEND_CHOICES,
                   help="torch (the reference) or fast (Triton + _C + cuBLASLt; triton, cuda: aliases); default: "
                        "VAR_RT_BACKEND, else fast on CUDA, torch otherwise")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg", type=float, default=None, help="guidance (VAR default 4, LlamaGen 4)")
    g.add_argument("--top-k", type=_ints, default=None, help="int or K comma-separated ints (VAR 900, LlamaGen 2000)")
    g.add_argument("--top-p", type=_floats, default=None, help="float or K values (VAR 0.95, LlamaGen 1.0)")
    g.add_argument("--temperature", type=_floats, default=None, help="float or K values (default 1.0)")
    g.add_argument("--preset", choices=["code-eval", "var-demo"], help="VAR sampling presets (override the above)")
    g.add_argument("--cfg-skip-last", type=int, default=None, metavar="M",
                   help="VAR/CoDe: the last M scales run without the unconditional half and draw without guidance "
                        "(faster, approximate; default 0 = off)")
    g.add_argument("--seed", type=int, default=0)


def add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet, on every command that draws: no progress bars (stderr stays silent but for warnings and errors)."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (by default: scales/passes, decoding, images with img/s and ETA)")


# ---- checks before anything is loaded -----------------------------------------------------------------------------
def check_count(value, option: str, lo: int = 1, hi: int | None = None):
    """An integer option in [lo, hi] (None passes: not given)."""
    if value is not None and (value < lo or (hi is not None and value > hi)):
        want = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise UsageError(f"{option} {value}: expected {want}")
    return value


def check_device_arg(device: str, option: str = "--device") -> None:
    """cpu, cuda or cuda:N that exists here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} {device}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {device}: no CUDA device is available (use {option} cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {device}: there are {torch.cuda.device_count()} CUDA device(s)")


def check_output(path, option: str, is_dir: bool = False) -> None:
    """Fail at once, naming the option and the user's path, when an output cannot be written there: its folder (or
    the nearest one that exists; missing ones are created when the output is written) not a writable folder, a
    file path that is a folder, a folder path that is a file. Writes nothing."""
    if path is None:
        return
    if not str(path).strip():
        raise UsageError(f"{option}: empty path")
    full = os.path.abspath(path)
    if is_dir and os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{option} {path}: exists and is not a folder")
    if not is_dir and os.path.isdir(full):
        raise UsageError(f"{option} {path}: is a folder; expected a file path")
    if not is_dir and os.path.exists(full) and not os.access(full, os.W_OK):
        raise UsageError(f"{option} {path}: exists and cannot be overwritten (permission denied)")
    probe = full if is_dir else os.path.dirname(full)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{option} {path}: cannot write there, {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            ro = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            ro = False
        raise UsageError(f"{option} {path}: cannot write in {probe} ({'read-only file system' if ro else 'permission denied'})")


def make_parent(path) -> None:
    """Create the missing folders above an output file (check_output passed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


@dataclass
class ModelPlan:
    """What check_model found: the family ('var' | 'llamagen'), what builds it, and what the checks need."""
    family: str
    num_classes: int
    num_scales: int | None = None   # VAR scales K
    grid: int | None = None         # LlamaGen tokens per row
    random: tuple | None = None     # parsed --random-weights: ("var", cfgs dict, vae_cfg) | ("llamagen", name)


def _given(a, names: dict) -> list:
    return [opt for dest, opt in names.items() if getattr(a, dest, None) is not None]


def _parse_random(a):
    """--random-weights SPEC -> ("var", {"main"|"drafter"|"refiner": VARConfig}, VQVAEConfig) or ("llamagen", name)."""
    from var_rt.models import llamagen as gpt_model
    from var_rt.models.var import VARConfig
    from var_rt.models.vqvae import VQVAEConfig
    spec = a.random_weights.strip()
    low = spec.lower()
    if low.startswith("llamagen"):
        rest = spec[len("llamagen"):]
        name = rest[1:] if rest.startswith("-") else (rest or "B")
        if not (rest == "" or rest.startswith("-")) or name.upper().removeprefix("GPT-") not in gpt_model.GPT_CONFIGS:
            raise UsageError(f"--random-weights {spec}: unknown LlamaGen size {name!r}; expected one of "
                             f"{', '.join('llamagen-' + k for k in gpt_model.GPT_CONFIGS)}")
        return ("llamagen", name)
    if low == SMALL_RANDOM:
        small = VARConfig(depth=4, width=256, heads=4)
        vae = VQVAEConfig(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1)
        return ("var", {"drafter": small, "refiner": small} if a.draft_steps is not None else {"main": small}, vae)
    parts = [x.strip() for x in low.split(",")]
    if not (1 <= len(parts) <= 2 and all(re.fullmatch(r"d?\d+", x) for x in parts)):
        raise UsageError(f"--random-weights {spec}: expected {RANDOM_SPECS}")
    depths = [int(x.lstrip("d")) for x in parts]
    for d in depths:
        if not 1 <= d <= 64:
            raise UsageError(f"--random-weights {spec}: depth {d} outside 1..64 (official VAR: d16 ... d36)")
    if len(depths) == 2 and a.draft_steps is None:
        raise UsageError(f"--random-weights {spec}: CoDe with random weights needs --draft-steps N")
    if len(depths) == 1 and a.draft_steps is not None:
        raise UsageError(f"--draft-steps needs two depths for CoDe: --random-weights dDRAFT,dREFINE (got {spec})")
    if len(depths) == 1:
        return ("var", {"main": VARConfig.official(depths[0])}, VQVAEConfig())
    return ("var", {"drafter": VARConfig.official(depths[0]), "refiner": VARConfig.official(depths[1])}, VQVAEConfig())


def check_model(a) -> ModelPlan:
    """Every model argument, checked before anything is loaded or built (see the module docstring): one model
    source, options of its family only, readable files of the right family that fit together, the device."""
    from var_rt import loaders
    from var_rt.llamagen_pipeline import LlamaGenPipeline, check_image_size
    from var_rt.pipeline import VARPipeline
    sources = _given(a, {"model": "--model", "var": "--var", "drafter": "--drafter", "llamagen": "--llamagen",
                         "random_weights": "--random-weights"})
    if not sources:
        if a.refiner is not None:
            raise UsageError("--refiner needs --drafter (CoDe: --drafter, --refiner, --draft-steps)")
        raise UsageError("no model: give --model, --var, --drafter/--refiner, --llamagen or --random-weights")
    if len(sources) > 1:
        raise UsageError(f"give one model, not {' and '.join(sources)}")
    src = sources[0]
    if getattr(a, "revision", None) is not None and src != "--model":
        raise UsageError("--revision is for --model NAME (a Hub revision)")
    if src == "--model":
        src = _resolve_model(a)
    if src == "--var" and a.refiner is not None:
        raise UsageError("--refiner is for CoDe (--drafter, --refiner, --draft-steps), not --var")
    random = _parse_random(a) if src == "--random-weights" else None
    family = "llamagen" if src == "--llamagen" or (random and random[0] == "llamagen") else "var"
    wrong = _given(a, LLAMAGEN_ONLY if family == "var" else VAR_ONLY)
    if random and family == "llamagen":
        wrong = [o for o in wrong if o != "--image-size"]
    if wrong:
        other = "LlamaGen" if family == "var" else "VAR"
        raise UsageError(f"{wrong[0]} is for {other} models; this is a {'VAR' if family == 'var' else 'LlamaGen'} "
                         f"model ({src})")
    if random:
        files = _given(a, {"vae": "--vae", "refiner": "--refiner", "vq": "--vq"})
        if files:
            raise UsageError(f"{files[0]}: --random-weights takes no checkpoint files")
    if src == "--var" and a.draft_steps is not None:
        raise UsageError("--draft-steps is for CoDe (--drafter, --refiner), not --var")
    check_device_arg(a.device)
    _warn_backend(a)
    check_count(a.draft_steps, "--draft-steps")
    check_count(a.zipar_window, "--zipar-window")
    try:
        check_image_size(a.image_size)
    except ValueError as e:
        raise UsageError(f"--image-size {a.image_size}: {str(e).split(': ', 1)[1]}") from None
    if family == "llamagen":
        if random:
            from var_rt.models import llamagen as gpt_model
            cfg = gpt_model.config_for(random[1], a.image_size or 256)
            plan = ModelPlan("llamagen", cfg.num_classes, grid=cfg.grid, random=random)
        else:
            if not a.vq:
                raise UsageError("--llamagen needs --vq (the VQ-16 tokenizer, vq_ds16_c2i.pt)")
            cfg = loaders.inspect(a.llamagen, "llamagen", "--llamagen", image_size=a.image_size)
            vcfg = loaders.inspect(a.vq, "vq16", "--vq")
            LlamaGenPipeline.check_configs(cfg, vcfg)
            plan = ModelPlan("llamagen", cfg.num_classes, grid=cfg.grid)
        if a.zipar_window is not None:
            check_count(a.zipar_window, "--zipar-window", 1, plan.grid)
        check_count(getattr(a, "sjd_window", None), "--sjd-window", 0)
        check_count(getattr(a, "sjd_relaxed", None), "--sjd-relaxed", 0)
        if getattr(a, "sjd_window", None) and a.zipar_window is not None and a.zipar_mask == "official":
            raise UsageError("--sjd-window with --zipar-window supports --zipar-mask exact only")
        if getattr(a, "sjd_relaxed", None) and not getattr(a, "sjd_window", None):
            raise UsageError("--sjd-relaxed needs --sjd-window >= 1")
        return plan
    if random:
        cfgs, vae_cfg = random[1], random[2]
    else:
        if not a.vae:
            raise UsageError(f"{src} needs --vae (the VQVAE, vae_ch160v4096z32.pth)")
        if src == "--drafter" and a.draft_steps is None:
            raise UsageError("--drafter needs --draft-steps N (the scales the drafter runs; all = the drafter alone)")
        vae_cfg = loaders.inspect(a.vae, "vqvae", "--vae")
        cfgs = {"main": loaders.inspect(a.var, "var", "--var")} if a.var else \
            {"drafter": loaders.inspect(a.drafter, "var", "--drafter")}
        if a.refiner:
            cfgs["refiner"] = loaders.inspect(a.refiner, "var", "--refiner")
    K = len(next(iter(cfgs.values())).patch_nums)
    if "drafter" in cfgs:
        check_count(a.draft_steps, "--draft-steps", 1, K)
        if a.draft_steps < K and "refiner" not in cfgs:
            raise UsageError(f"--draft-steps {a.draft_steps} < {K} scales needs --refiner (or --draft-steps {K}: "
                             "the drafter alone)")
    VARPipeline.check_configs(cfgs, vae_cfg, a.draft_steps)
    return ModelPlan("var", next(iter(cfgs.values())).num_classes, num_scales=K, random=random)


def _resolve_model(a) -> str:
    """--model NAME: its files through the Hub cache (var_rt.hub.resolve; offline and not cached: one line naming
    the file, the repo and `var-rt download NAME`), set as the file options the rest of check_model checks; the
    name's sampling preset (code-eval for CoDe) unless sampling options are given. Returns the equivalent option."""
    from var_rt import checkpoint, hub
    try:
        e = hub.entry(a.model)
    except ValueError as err:
        raise UsageError(f"--model {a.model}: {err}") from None
    files = _given(a, {"vae": "--vae", "refiner": "--refiner", "vq": "--vq"})
    if files:
        raise UsageError(f"{files[0]}: --model {e.name} names all its files (give explicit files without --model)")
    if a.draft_steps is not None and e.draft_steps is None:
        raise UsageError(f"--draft-steps is for the CoDe names (code-N, code-free-N), not --model {e.name}")
    check_device_arg(a.device)  # before any download
    paths = hub.resolve(e.name, revision=a.revision)
    a.model_entry, a.model_paths = e, paths
    a.__dict__.update({"llamagen" if r == "gpt" else r: p for r, p in paths.items()})
    if e.draft_steps is not None and a.draft_steps is None:
        a.draft_steps = e.draft_steps
    if e.preset and getattr(a, "preset", None) is None and hasattr(a, "preset") and \
            all(getattr(a, k, None) is None for k in ("cfg", "top_k", "top_p", "temperature")):
        a.preset = e.preset
    from var_rt import loaders
    try:  # a damaged cached file: the strict loader's line and the hint to refetch
        for role, p in paths.items():
            loaders.inspect(p, hub.ROLE_FAMILY[role], f"--model {e.name} ({role})", **(
                {"image_size": a.image_size} if role == "gpt" else {}))
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(str(err) + hub.damaged_hint(e)) from None
    return "--llamagen" if e.family == "llamagen" else "--var" if "var" in paths else "--drafter"


def _warn_backend(a) -> None:
    """The fast backend on a CPU: one warning now, before the work (not in the middle of a progress bar)."""
    from var_rt import ops
    from var_rt.ops import dispatch
    if ops.resolve_backend(a.backend, a.device) == "fast" and dispatch._needs_cuda(torch.device(a.device)):
        what = f"--backend {a.backend}" if a.backend else "VAR_RT_BACKEND=fast"
        dispatch._warn_once("fast:needs-cuda", f"{what} on {a.device}: the fast path's Triton kernels need a CUDA "
                                               "device (or TRITON_INTERPRET=1); the torch reference runs")


def check_sampling(a, plan: ModelPlan) -> None:
    """The sampling options through the one rule set (SamplingSettings; presets against the scale count)."""
    from var_rt.pipeline import var_settings
    from var_rt.runtime.settings import SamplingSettings
    kw = sampling_options(a, plan.family)
    if plan.family == "var":
        var_settings(plan.num_scales, **kw)
    else:
        SamplingSettings.build(kw["cfg"], kw["top_k"], kw["top_p"], kw["temperature"])


def check_classes(classes, plan: ModelPlan, option: str = "--classes") -> None:
    bad = [c for c in classes if not 0 <= c < plan.num_classes]
    if bad:
        raise UsageError(f"{option}: class ids {bad} outside [0, {plan.num_classes}) (this model has "
                         f"{plan.num_classes} classes)")


# ---- building ----------------------------------------------------------------------------------------------------
def build_pipeline(a, log=print, plan: ModelPlan | None = None):
    """The pipeline the model arguments describe; VARPipeline or LlamaGenPipeline (checked first: check_model)."""
    from var_rt import pipeline as vp
    plan = plan or check_model(a)
    dtype = a.dtype  # None: bf16 on CUDA, fp32 on the CPU (the pipelines' default)
    if plan.random:
        log(f"var-rt: RANDOM WEIGHTS ({a.random_weights}): images are noise, for testing and timing only")
        if plan.family == "llamagen":
            from var_rt.llamagen_pipeline import LlamaGenPipeline
            return LlamaGenPipeline.random(plan.random[1], image_size=a.image_size or 256, device=a.device,
                                           dtype=dtype, backend=a.backend)
        cfgs, vae_cfg = plan.random[1], plan.random[2]
        if "main" in cfgs:
            return vp.VARPipeline.random(cfgs["main"], vae_cfg=vae_cfg, device=a.device, dtype=dtype,
                                         backend=a.backend)
        return vp.VARPipeline.random(cfgs["drafter"], refiner_depth=cfgs["refiner"], draft_steps=a.draft_steps,
                                     vae_cfg=vae_cfg, device=a.device, dtype=dtype, backend=a.backend)
    if plan.family == "llamagen":
        from var_rt.llamagen_pipeline import LlamaGenPipeline
        return LlamaGenPipeline.from_checkpoints(gpt=a.llamagen, vq=a.vq, device=a.device, dtype=dtype,
                                                 image_size=a.image_size, backend=a.backend)
    if a.var:
        return vp.VARPipeline.from_checkpoints(var=a.var, vae=a.vae, device=a.device, dtype=dtype, backend=a.backend)
    return vp.VARPipeline.from_checkpoints(drafter=a.drafter, refiner=a.refiner, vae=a.vae, draft_steps=a.draft_steps,
                                           device=a.device, dtype=dtype, backend=a.backend)


def sampling_options(a, family: str) -> dict:
    kw = dict(VAR_DEFAULTS if family == "var" else LLAMAGEN_DEFAULTS)
    for k in ("cfg", "top_k", "top_p", "temperature"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    if family == "var" and getattr(a, "preset", None):
        kw["preset"] = a.preset
    if getattr(a, "cfg_skip_last", None) is not None:
        if family != "var":
            raise UsageError("--cfg-skip-last is for VAR/CoDe models (LlamaGen has no scales to skip guidance at)")
        kw["cfg_skip_last"] = a.cfg_skip_last
    return kw


def sampling_kwargs(pipe, a) -> dict:
    """The keyword arguments of a call to `pipe`, validated (pipe.sampling_settings) before anything is drawn."""
    from var_rt.pipeline import VARPipeline
    family = "var" if isinstance(pipe, VARPipeline) else "llamagen"
    kw = sampling_options(a, family)
    pipe.sampling_settings(**kw)
    if family == "llamagen":
        kw["zipar_window"] = a.zipar_window
        for k in ("zipar_mask", "sjd_window", "sjd_relaxed"):
            if getattr(a, k, None) is not None:
                kw[k] = getattr(a, k)
        pipe.plan(a.zipar_window, kw.get("zipar_mask", "exact"))
    return kw
