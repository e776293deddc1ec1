"""What the network predicts (ε, v or x0), as one object that both the training loss and the Denoiser use.

Two views of the same noisy latent at a timestep t:
    VP (training):     x_t = α·x0 + s·ε,  α = sqrt(ᾱ_t), s = sqrt(1-ᾱ_t), SNR = α²/s²
    sigma (sampling):  x = x_t/α = x0 + σ·ε,  σ = s/α, so α = 1/sqrt(1+σ²) and SNR = 1/σ²
Each prediction type knows
    target(x0, ε, α, s)      what the network should output for x_t: the regression target of the loss
    scalings(σ)              (c_skip, c_out) such that x0 = c_skip·x + c_out·output in sigma space
                             (k-diffusion's `get_scalings`, EDM's preconditioning)
    min_snr_weight(SNR, γ)   its per-sample loss weight under min-SNR-γ weighting (Hang et al. 2023)
A new type is one more class and one entry in PREDICTIONS: the config check and the Denoiser read the registry.

Min-SNR-γ weights the x0 error by min(SNR, γ). An output error δ of the network is an x0 error |c_out|·δ,
i.e. |x0 error|² = |δ|²·c_out², so the same weighting of the output error is min(SNR, γ)·c_out².
All tensors broadcast: x0, ε (B, C, H, W); α, s, σ (B, 1, 1, 1) or scalars; SNR (B,).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .prediction_names import PREDICTION_NAMES


class Prediction(ABC):
    """One prediction type; `name` is its key in PREDICTIONS (and in configs and checkpoints)."""

    name: ClassVar[str]

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
               sigma_vp: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = alpha·x0 + sigma_vp·noise."""

    @abstractmethod
    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(c_skip, c_out) such that x0 = c_skip·x + c_out·output, for x = x0 + σ·ε in sigma space."""

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
              sigma_vp: torch.Tensor) -> torch.Tensor:
        """The x0 that a network output for the VP latent x_t = alpha·x0 + sigma_vp·noise stands for."""
        c_skip, c_out = self.scalings(sigma_vp / alpha)
        return c_skip * (x_t / alpha) + c_out * output

    @abstractmethod
    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """(B,) min-SNR-γ loss weights for SNR = ᾱ/(1-ᾱ) values (B,)."""


@dataclass(frozen=True)
class EpsPrediction(Prediction):
    """ε (DDPM, SD 1.x): x0 = x - σ·ε; c_out² = σ² = 1/SNR, so the weight is min(SNR, γ)/SNR = min(γ/SNR, 1),
    written so that it is 1 at SNR = 0."""

    name: ClassVar[str] = "eps"

    def target(self, x0, noise, alpha, sigma_vp):
        return noise

    def scalings(self, sigma):
        return 1.0, -sigma

    def min_snr_weight(self, snr, gamma):
        return (gamma / snr).clamp(max=1.0)


@dataclass(frozen=True)
class VPrediction(Prediction):
    """v = α·ε - s·x0 (Salimans & Ho 2022; SD 2.x 768): x0 = α·x_t - s·v = x/(1+σ²) - σ/sqrt(1+σ²)·v;
    c_out² = σ²/(1+σ²) = 1/(SNR + 1), so the weight is min(SNR, γ)/(SNR + 1)."""

    name: ClassVar[str] = "v"

    def target(self, x0, noise, alpha, sigma_vp):
        return alpha * noise - sigma_vp * x0

    def scalings(self, sigma):
        return 1 / (1 + sigma ** 2), -sigma * (1 + sigma ** 2).rsqrt()

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr + 1)


@dataclass(frozen=True)
class X0Prediction(Prediction):
    """x0, the clean latent itself: c_skip = 0, c_out = 1, so the weight is min(SNR, γ)."""

    name: ClassVar[str] = "x0"

    def target(self, x0, noise, alpha, sigma_vp):
        return x0

    def scalings(self, sigma):
        return 0.0, 1.0

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma)


# The one definition of the valid prediction names (prediction_names.py lists them for checks without torch).
PREDICTIONS: dict[str, Prediction] = {p.name: p for p in (EpsPrediction(), VPrediction(), X0Prediction())}
assert tuple(PREDICTIONS) == PREDICTION_NAMES, "list the types of PREDICTIONS in prediction_names.PREDICTION_NAMES too"


def get_prediction(name: str, where: str = "prediction") -> Prediction:
    """The registered prediction object of that name; a ConfigError naming `where` and the valid names otherwise."""
    if name not in PREDICTIONS:
        raise ConfigError(f"{where}: {name!r} is not one of {', '.join(map(repr, PREDICTIONS))}")
    return PREDICTIONS[name]
