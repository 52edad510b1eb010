"""var_rt: a custom-kernel inference runtime for autoregressive image generation (VAR + CoDe, LlamaGen + ZipAR)."""
__version__ = "0.1.0"

__all__ = ["VARPipeline", "LlamaGenPipeline", "save_grid", "__version__"]


def __getattr__(name):  # lazy: `import var_rt` stays cheap and does not need every optional module
    if name == "VARPipeline":
        from var_rt.pipeline import VARPipeline
        return VARPipeline
    if name == "LlamaGenPipeline":
        from var_rt.llamagen_pipeline import LlamaGenPipeline
        return LlamaGenPipeline
    if name == "save_grid":
        from var_rt.images import save_grid
        return save_grid
    raise AttributeError(f"module 'var_rt' has no attribute {name!r}")
