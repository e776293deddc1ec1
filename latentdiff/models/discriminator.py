"""PatchGAN discriminator (Isola et al. 2017, as used by the latent diffusion autoencoder): a stack of
strided 4x4 convs whose output is one real/fake logit per overlapping image patch."""
from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) image -> (B, 1, h, w) patch logits; `layers` strided convs set the patch size."""

    def __init__(self, in_channels: int = 3, ch: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ch
        for i in range(1, layers + 1):
            out = ch * min(2 ** i, 8)
            stride = 2 if i < layers else 1  # the last block keeps the resolution, as in pix2pix
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
