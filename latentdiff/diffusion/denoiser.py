"""The one contract every sampler uses: `denoiser(x, sigma, cond) -> x0`.

x lives in sigma space, x = x0 + σ·ε (the VP latent times sqrt(1 + σ²)); sigma is (B,) or a scalar;
cond is a dict with "context" (B, L, D) and optionally "context_mask" (B, L) bool, so more conditioning
can be added later without touching the samplers. The wrapped network follows the training contract
`net(x_vp, t, context, context_mask=None)` and predicts ε, v or x0 of the VP latent; the Prediction
object (prediction.py) turns that output into x0.

The predicted x0 is never clipped: latents are not pixels in [-1, 1], and clipping them (diffusers'
`clip_sample=True` default) turns samples into one flat colour.

A self-conditioned network (Chen et al. 2022, "Analog Bits") also reads its own previous x0: that
Denoiser keeps the last x0 it returned and gives it back on the next call (zeros on the first), so one
sampling run needs one Denoiser of its own (`fresh()`).
"""
from __future__ import annotations

from typing import Callable

import torch

from .prediction import Prediction, get_prediction
from .schedules import NoiseSchedule


class Denoiser:
    """Wraps `net(x_vp, t, context, context_mask=None)` as `D(x, sigma, cond) -> x0` (all (B, C, H, W));
    with `self_condition`, `net(..., x0_estimate=previous x0 or None)`."""

    def __init__(self, net: Callable, schedule: NoiseSchedule, prediction: str | Prediction = "eps",
                 self_condition: bool = False):
        self.net = net
        self.schedule = schedule
        # a name in PREDICTIONS, or a Prediction object (e.g. one not registered)
        self.prediction = prediction if isinstance(prediction, Prediction) else get_prediction(prediction)
        self.self_condition = self_condition
        self._last_x0: torch.Tensor | None = None  # self-conditioning: what the previous call returned

    def fresh(self) -> "Denoiser":
        """This denoiser for a new sampling run: itself if it keeps no state, else a copy without any."""
        return Denoiser(self.net, self.schedule, self.prediction, self_condition=True) if self.self_condition else self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        x_vp = x * (1 + s ** 2).rsqrt()
        t = self.schedule.sigma_to_t(sigma)  # (B,) continuous timesteps, float32 or float64
        extra = {}
        if self.self_condition:  # the last x0 of this batch's shape, else none (zeros: a first step)
            last = self._last_x0
            extra["x0_estimate"] = last if last is not None and last.shape == x.shape else None
        out = self.net(x_vp, t, cond["context"], context_mask=cond.get("context_mask"), **extra)
        c_skip, c_out = self.prediction.scalings(s)
        x0 = c_skip * x + c_out * out
        if self.self_condition:
            self._last_x0 = x0
        return x0
