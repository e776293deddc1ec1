"""The one contract every sampler uses: `denoiser(x, sigma, cond) -> x0`.

x lives in sigma space, x = x0 + σ·ε (the VP latent times sqrt(1 + σ²)); sigma is (B,) or a scalar;
cond is a dict with "context" (B, L, D) and optionally "context_mask" (B, L) bool, so more conditioning
can be added later without touching the samplers. The wrapped network follows the training contract
`net(x_vp, t, context, context_mask=None)` and predicts ε, v or x0 of the VP latent; the Prediction
object (prediction.py) turns that output into x0.

The predicted x0 is never clipped: latents are not pixels in [-1, 1], and clipping them (diffusers'
`clip_sample=True` default) turns samples into one flat colour.
"""
from __future__ import annotations

from typing import Callable

import torch

from .prediction import Prediction, get_prediction
from .schedules import NoiseSchedule


class Denoiser:
    """Wraps `net(x_vp, t, context, context_mask=None)` as `D(x, sigma, cond) -> x0` (all (B, C, H, W))."""

    def __init__(self, net: Callable, schedule: NoiseSchedule, prediction: str | Prediction = "eps"):
        self.net = net
        self.schedule = schedule
        # a name in PREDICTIONS, or a Prediction object (e.g. one not registered)
        self.prediction = prediction if isinstance(prediction, Prediction) else get_prediction(prediction)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        x_vp = x * (1 + s ** 2).rsqrt()
        t = self.schedule.sigma_to_t(sigma)  # (B,) continuous timesteps, float32 or float64
        out = self.net(x_vp, t, cond["context"], context_mask=cond.get("context_mask"))
        c_skip, c_out = self.prediction.scalings(s)
        return c_skip * x + c_out * out
