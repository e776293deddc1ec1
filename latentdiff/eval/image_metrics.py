"""Pixel-space image metrics."""
from __future__ import annotations

import torch


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [-1, 1], measured on the [0, 1] scale: (B,)."""
    pred = (prediction.float().clamp(-1, 1) + 1) / 2
    true = (target.float().clamp(-1, 1) + 1) / 2
    mse = (pred - true).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)
