"""The UNet's building blocks: timestep embedding, ResBlock, resampling, and the container that routes
the timestep embedding and the text tokens to whichever children need them.

Names follow ldm's `openaimodel` (in_layers / emb_layers / out_layers / skip_connection, Downsample.op,
Upsample.conv, Upsample being shared with the autoencoder) so that CompVis checkpoints map onto these modules key for key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) float timesteps -> (B, dim), cosines first (the SD order).

    Frequencies run geometrically from 1 down to 1/max_period, so continuous t are as welcome as integers.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + projected timestep embedding, GroupNorm → SiLU → dropout → conv,
    plus a skip connection (1x1 conv when the width changes)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # Zero the last conv so a fresh block starts as its skip connection (as ldm does).
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), emb (B, E) -> (B, C_out, H, W)"""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padded on every side: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepSequential(nn.Sequential):
    """A Sequential whose ResBlocks also get the timestep embedding and whose transformers get the text."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x
