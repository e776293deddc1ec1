"""latentdiff: a Stable-Diffusion-style latent text-to-image system you can train on a CPU and read end to end."""
from .config import AutoencoderConfig, UNetConfig
from .errors import CheckpointError, ConfigError, DataError, LatentDiffError
from .models.autoencoder import AutoencoderKL
from .models.unet import UNet

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "CheckpointError", "ConfigError", "DataError", "LatentDiffError",
    "UNet", "UNetConfig", "__version__",
]
