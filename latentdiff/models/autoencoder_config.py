"""AutoencoderConfig: the KL autoencoder's architecture and latent scale (models/autoencoder.py builds it),
importable without torch so that a request can be checked against a saved pipeline before any model loads."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

CHECKPOINT_KIND = "autoencoder"  # the "kind" of an autoencoder checkpoint folder's config.json


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3              # image channels
    out_channels: int = 3
    ch: int = 24                      # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2)  # downsampling factor f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1           # ResNet blocks per level (the decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (pixels) that get self-attention
    mid_attention: bool = True        # self-attention in the middle block
    z_channels: int = 4               # latent channels
    dropout: float = 0.0
    norm_groups: int = 8              # GroupNorm groups (SD uses 32)
    resolution: int = 32              # nominal image size, only to place attn_resolutions
    scale_factor: float = 1.0         # latents are multiplied by this for diffusion (set from data, 1/std)

    def __post_init__(self):
        if not self.ch_mult:
            raise ConfigError("model.ch_mult: needs at least one level")
        for width in (self.ch * m for m in self.ch_mult):
            if width % self.norm_groups:
                raise ConfigError(f"model: width {width} is not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)
