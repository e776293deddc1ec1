"""LPIPS (Zhang et al. 2018) on VGG16 features, used only when its weights are on the local disk.

Nothing is downloaded: `loss.lpips_weights` names a folder holding
    vgg16.pth   torchvision's ImageNet VGG16 state dict (keys features.N.weight / .bias)
    vgg.pth     the LPIPS v0.1 linear-layer weights for VGG (keys linK.model.1.weight)
Both exist only as pickles, so they are read with allow_pickle=True, through checkpoint.read_weights:
torch.load(weights_only=True), tensors only, never code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import vgg16

from ..checkpoint import read_weights
from ..errors import CheckpointError
from .autoencoder_loss import AutoencoderLossConfig

# Indices into torchvision's vgg16().features just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (4, 9, 16, 23, 30)
_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS input normalisation for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """(B, 3, H, W) pair in [-1, 1] -> (B, 1, 1, 1) perceptual distance."""

    def __init__(self):
        super().__init__()
        self.features = vgg16(weights=None).features[: _TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in _WIDTHS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            total = total + lin((fa - fb).pow(2)).mean(dim=(2, 3), keepdim=True)
        return total

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm-free, but keep it out of training mode anyway

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LPIPS":
        folder = Path(folder)
        # LPIPS is published only as .pth pickles, in a folder the user named; read_weights still refuses code
        vgg = read_weights(folder / "vgg16.pth", allow_pickle=True)[0]
        lin = read_weights(folder / "vgg.pth", allow_pickle=True)[0]
        model = cls()
        features = {k[len("features."):]: v for k, v in vgg.items()
                    if k.startswith("features.") and int(k.split(".")[1]) <= _TAPS[-1]}
        try:
            model.features.load_state_dict(features, strict=True)
            model.lins.load_state_dict({f"{k}.weight": lin[f"lin{k}.model.1.weight"] for k in range(5)}, strict=True)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{folder}: LPIPS weights do not have the expected keys/shapes: {err}") from None
        return model


def load_perceptual(cfg: AutoencoderLossConfig, say: Callable[[str], None]) -> LPIPS | None:
    """LPIPS if it is asked for and its weights are on disk; otherwise None, and the run says why."""
    if cfg.lpips_weight <= 0:
        return None
    if not cfg.lpips_weights:
        say("LPIPS is off: loss.lpips_weights names no local folder of weights (nothing is downloaded)")
        return None
    if not Path(cfg.lpips_weights).is_dir():
        raise CheckpointError(f"loss.lpips_weights: {cfg.lpips_weights} is not a folder")
    say(f"LPIPS on (weight {cfg.lpips_weight}) from {cfg.lpips_weights}")
    return LPIPS.from_folder(cfg.lpips_weights)
