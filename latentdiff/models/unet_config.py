"""UNetConfig: the denoising UNet's architecture (models/unet.py builds it), importable without torch so that
a request can be checked against a saved pipeline before any model loads."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

CHECKPOINT_KIND = "unet"  # the "kind" of a UNet checkpoint folder's config.json


def _at_level(value: int | tuple[int, ...], level: int) -> int:
    """A setting given once for all levels (an int) or per level (a tuple)."""
    return value if isinstance(value, int) else value[level]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4              # latent channels in
    out_channels: int = 4             # predicted channels (eps, v or x0 of the latent)
    model_channels: int = 64          # base width; level i has model_channels * channel_mult[i] channels
    channel_mult: tuple[int, ...] = (1, 2)  # one entry per level; H and W halve between levels
    num_res_blocks: int = 2           # ResBlocks per level on the down path (the up path has one more)
    attention_levels: tuple[int, ...] = (0, 1)  # levels (0 = full size) with transformers; the middle always has one
    num_heads: int | tuple[int, ...] = 4  # attention heads, per level if a tuple (SD 1.x: 8)
    head_dim: int | tuple[int, ...] = 0   # > 0: heads = width // head_dim and num_heads is ignored (SD 2.x: 64)
    transformer_depth: int | tuple[int, ...] = 1  # BasicTransformerBlocks per spatial transformer, per level if a tuple
    context_dim: int = 256            # width of the text tokens that cross-attention reads (SD 1.x 768, 2.x 1024)
    use_linear_projection: bool = False  # transformer proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv (SD 1.x)
    dropout: float = 0.0              # in ResBlocks and transformer feed-forwards
    norm_groups: int = 32             # GroupNorm groups (ResBlocks, spatial transformers, output)
    upcast_attention: bool = False    # compute attention in fp32 when the model runs in fp16/bf16 (SD 2.1 needs it)
    position_embedding: bool = False  # lever (issue 15): add each token's (row, column) as fixed sin/cos features in
                                      # every spatial transformer; SD has none, so such a UNet exports to no SD format
    self_condition: bool = False      # lever (issue 15): also read the sampler's previous x0 estimate (in_channels
                                      # more input channels; Chen et al. 2022); exports to no SD format either

    def __post_init__(self):
        levels = len(self.channel_mult)
        if not levels or min(self.channel_mult) < 1:
            raise ConfigError(f"model.channel_mult: needs at least one level, each >= 1, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ConfigError(f"model.num_res_blocks: must be at least 1, got {self.num_res_blocks}")
        if self.context_dim < 1:
            raise ConfigError(f"model.context_dim: must be at least 1, got {self.context_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < levels]
        if bad or len(set(self.attention_levels)) != len(self.attention_levels):
            raise ConfigError(f"model.attention_levels: {self.attention_levels} must be distinct levels "
                              f"in 0..{levels - 1}")
        for name in ("num_heads", "head_dim", "transformer_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != levels:
                raise ConfigError(f"model.{name}: {value} needs one entry per level ({levels})")
        for level in range(levels):
            if self.width(level) % self.norm_groups:
                raise ConfigError(f"model: width {self.width(level)} is not divisible by "
                                  f"norm_groups={self.norm_groups}")
        for level in sorted(set(self.attention_levels) | {levels - 1}):  # the middle block uses the last level's
            width, head_dim = self.width(level), _at_level(self.head_dim, level)
            if head_dim > 0 and width % head_dim:
                raise ConfigError(f"model.head_dim: width {width} at level {level} is not a multiple of {head_dim}")
            if self.heads(level) < 1 or width % self.heads(level):
                raise ConfigError(f"model.num_heads: width {width} at level {level} does not split into "
                                  f"{self.heads(level)} heads")
            if self.depth(level) < 1:
                raise ConfigError(f"model.transformer_depth: must be at least 1 at level {level}")

    def width(self, level: int) -> int:
        """Channels of the feature maps at `level`."""
        return self.model_channels * self.channel_mult[level]

    def heads(self, level: int) -> int:
        """Attention heads of the spatial transformers at `level`."""
        head_dim = _at_level(self.head_dim, level)
        return self.width(level) // head_dim if head_dim > 0 else _at_level(self.num_heads, level)

    def depth(self, level: int) -> int:
        """BasicTransformerBlocks in each spatial transformer at `level`."""
        return _at_level(self.transformer_depth, level)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)
