"""The model and sampling arguments shared by `var-rt generate` and `var-rt sample`, and what they build: the
pipeline (`build_pipeline`) and the keyword arguments of a call to it (`sampling_kwargs`)."""
from __future__ import annotations

import argparse

import torch

SMALL_RANDOM = "small"  # --random-weights small: a few-layer VAR + thin VQVAE, fast on a CPU (the demo)
BACKEND_CHOICES = ["torch", "fast", "triton", "cuda"]  # --backend; triton and cuda are old names of fast


def _floats(s: str):
    vals = [float(x) for x in s.split(",")]
    return vals[0] if len(vals) == 1 else vals


def _ints(s: str):
    vals = [int(x) for x in s.split(",")]
    return vals[0] if len(vals) == 1 else vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of: --var | --drafter/--refiner | --llamagen | --random-weights)")
    g.add_argument("--var", help="VAR checkpoint (var_d16.pth ... var_d36.pth)")
    g.add_argument("--vae", help="VQVAE checkpoint (vae_ch160v4096z32.pth)")
    g.add_argument("--drafter", help="CoDe drafter (var_d30.pth or drafter_N.pth)")
    g.add_argument("--refiner", help="CoDe refiner (var_d16.pth or refiner_N.pth)")
    g.add_argument("--draft-steps", type=int, help="CoDe: scales run by the drafter (1..K-1; K = drafter alone)")
    g.add_argument("--llamagen", help="LlamaGen c2i GPT checkpoint (c2i_XL_384.pt ...)")
    g.add_argument("--vq", help="LlamaGen VQ-16 tokenizer (vq_ds16_c2i.pt)")
    g.add_argument("--image-size", type=int, help="LlamaGen: 256 or 384 (read from the file when it says)")
    g.add_argument("--zipar-window", type=int, help="LlamaGen: ZipAR window w (default: sequential decoding)")
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
    g.add_argument("--seed", type=int, default=0)


def build_pipeline(a, log=print):
    """The pipeline the model arguments describe; VARPipeline or LlamaGenPipeline."""
    from var_rt import pipeline as vp
    dtype = a.dtype  # None: bf16 on CUDA, fp32 on the CPU (the pipelines' default)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --device cpu)")
    if a.random_weights:
        spec = a.random_weights
        log(f"var-rt: RANDOM WEIGHTS ({spec}): images are noise, for testing and timing only")
        if spec.startswith("llamagen"):
            from var_rt.llamagen_pipeline import LlamaGenPipeline
            name = spec.split("-", 1)[1] if "-" in spec else "B"
            return LlamaGenPipeline.random(name, image_size=a.image_size or 256, device=a.device, dtype=dtype,
                                           backend=a.backend)
        if spec == SMALL_RANDOM:
            from var_rt.models.var import VARConfig
            from var_rt.models.vqvae import VQVAEConfig
            small = VARConfig(depth=4, width=256, heads=4)
            return vp.VARPipeline.random(small, refiner_depth=small if a.draft_steps else None, draft_steps=a.draft_steps,
                                         vae_cfg=VQVAEConfig(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1),
                                         device=a.device, dtype=dtype, backend=a.backend)
        depths = [int(x.strip().lstrip("d")) for x in spec.split(",")]
        if len(depths) == 1 and a.draft_steps is None:
            return vp.VARPipeline.random(depths[0], device=a.device, dtype=dtype, backend=a.backend)
        if len(depths) != 2 or a.draft_steps is None:
            raise SystemExit("error: CoDe with random weights needs '--random-weights dDRAFT,dREFINE --draft-steps N'")
        return vp.VARPipeline.random(depths[0], refiner_depth=depths[1], draft_steps=a.draft_steps, device=a.device,
                                     dtype=dtype, backend=a.backend)
    if a.llamagen:
        if not a.vq:
            raise SystemExit("error: --llamagen needs --vq (vq_ds16_c2i.pt)")
        from var_rt.llamagen_pipeline import LlamaGenPipeline
        return LlamaGenPipeline.from_checkpoints(gpt=a.llamagen, vq=a.vq, device=a.device, dtype=dtype,
                                                 image_size=a.image_size, backend=a.backend)
    if not a.vae:
        raise SystemExit("error: --vae is required with --var or --drafter (or use --random-weights)")
    if a.var:
        return vp.VARPipeline.from_checkpoints(var=a.var, vae=a.vae, device=a.device, dtype=dtype, backend=a.backend)
    if a.drafter:
        return vp.VARPipeline.from_checkpoints(drafter=a.drafter, refiner=a.refiner, vae=a.vae, draft_steps=a.draft_steps,
                                               device=a.device, dtype=dtype, backend=a.backend)
    raise SystemExit("error: no model: give --var, --drafter/--refiner, --llamagen or --random-weights")


def sampling_kwargs(pipe, a) -> dict:
    from var_rt.pipeline import VARPipeline
    if isinstance(pipe, VARPipeline):
        kw = dict(cfg=4.0, top_k=900, top_p=0.95, temperature=1.0)
    else:
        kw = dict(cfg=4.0, top_k=2000, top_p=1.0, temperature=1.0, zipar_window=a.zipar_window)
    for k in ("cfg", "top_k", "top_p", "temperature"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    if getattr(a, "preset", None):
        if not isinstance(pipe, VARPipeline):
            raise SystemExit("error: --preset is for VAR models")
        kw["preset"] = a.preset
    return kw
