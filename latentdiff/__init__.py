"""latentdiff: a Stable-Diffusion-style latent text-to-image system you can train on a CPU and read end to end."""
from .errors import CheckpointError, ConfigError, DataError, LatentDiffError
from .models.autoencoder import AutoencoderConfig, AutoencoderKL
from .models.text_encoder import TextEncoder, TextEncoderConfig
from .models.unet import UNet, UNetConfig
from .pipeline import Text2ImageOutput, Text2ImagePipeline
from .samplers import SAMPLERS

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "CheckpointError", "ConfigError", "DataError", "LatentDiffError",
    "SAMPLERS", "Text2ImageOutput", "Text2ImagePipeline", "TextEncoder", "TextEncoderConfig", "UNet", "UNetConfig", "__version__",
]
