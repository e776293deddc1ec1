"""latentdiff: a Stable-Diffusion-style latent text-to-image system you can train on a CPU and read end to end.

The public names load on first use (PEP 562), so that `latentdiff --help` does not wait for torch.
"""
from __future__ import annotations

from .errors import CheckpointError, ConfigError, DataError, LatentDiffError
from .lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "AutoencoderConfig": "models.autoencoder_config", "AutoencoderKL": "models.autoencoder",
    "TextEncoder": "models.text_encoder", "TextEncoderConfig": "models.text_encoder",
    "UNet": "models.unet", "UNetConfig": "models.unet_config",
    "Text2ImageOutput": "pipeline", "Text2ImagePipeline": "pipeline",
    "SAMPLERS": "samplers",
}

__all__ = ["CheckpointError", "ConfigError", "DataError", "LatentDiffError", "__version__", *_LAZY]


__getattr__ = lazy_attributes(__name__, globals(), _LAZY)
