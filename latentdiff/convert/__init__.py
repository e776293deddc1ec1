"""Stable Diffusion formats: import diffusers folders and original single-file checkpoints into a
Text2ImagePipeline, and export pipelines to both.

    from latentdiff.convert import load_pipeline, save_pipeline, convert
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")       # or a diffusers / latentdiff folder
    save_pipeline(pipe, "sd15-diffusers", to="diffusers")
    convert("sd15-diffusers", "sd15.safetensors", to="single-file")

Format by format: diffusers_format.py, single_file.py; key layouts: unet_keys.py, vae_keys.py,
text_encoder_keys.py; the SD 1.x / 2.x table for weights without configs: sd_variants.py.
"""
from ..lazy import lazy_attributes

# Loaded on first use: `latentdiff convert --help` (convert/command.py) need not wait for torch.
_LAZY = {"FORMATS": "api", "convert": "api", "detect_format": "api", "load_pipeline": "api", "save_pipeline": "api",
         "ContextMaskWarning": "assemble", "load_diffusers": "diffusers_format", "save_diffusers": "diffusers_format",
         "SkippedWeightsWarning": "single_file", "load_single_file": "single_file", "save_single_file": "single_file"}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, globals(), _LAZY)
