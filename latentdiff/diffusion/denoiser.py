"""The one contract every sampler uses: `denoiser(x, sigma, cond) -> x0`.

x lives in sigma space, x = x0 + σ·ε (the VP latent times sqrt(1 + σ²)); sigma is (B,) or a scalar;
cond is a dict with "context" (B, L, D) and optionally "context_mask" (B, L) bool, so more conditioning
can be added later without touching the samplers. The wrapped network follows the training contract
`net(x_vp, t, context, context_mask=None)` and predicts ε, v or x0 of the VP latent.

The predicted x0 is never clipped: latents are not pixels in [-1, 1], and clipping them (diffusers'
`clip_sample=True` default) turns samples into one flat colour.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")


def x0_coefficients(prediction: str, sigma: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(c_skip, c_out) such that x0 = c_skip·x + c_out·net_output, for x = x0 + σ·ε in sigma space.

    With α = 1/sqrt(1+σ²) and the VP quantities x_vp = α·x = α·x0 + ασ·ε, v = α·ε - ασ·x0:
        eps:  x0 = x - σ·ε
        v:    x0 = α·x_vp - ασ·v = x/(1+σ²) - σ/sqrt(1+σ²)·v
        x0:   x0 = output
    """
    if prediction == "eps":
        return 1.0, -sigma
    if prediction == "v":
        return 1 / (1 + sigma ** 2), -sigma * (1 + sigma ** 2).rsqrt()
    if prediction == "x0":
        return 0.0, 1.0
    raise ConfigError(f"prediction: {prediction!r} is not one of {', '.join(map(repr, PREDICTIONS))}")


class Denoiser:
    """Wraps `net(x_vp, t, context, context_mask=None)` as `D(x, sigma, cond) -> x0` (all (B, C, H, W))."""

    def __init__(self, net: Callable, schedule: NoiseSchedule, prediction: str = "eps"):
        x0_coefficients(prediction, torch.zeros(()))  # validates the name
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        x_vp = x * (1 + s ** 2).rsqrt()
        t = self.schedule.sigma_to_t(sigma)  # (B,) continuous timesteps, float32 or float64
        out = self.net(x_vp, t, cond["context"], context_mask=cond.get("context_mask"))
        c_skip, c_out = x0_coefficients(self.prediction, s)
        return c_skip * x + c_out * out
