"""The training objective, as short pieces: timesteps, noise, targets, weights, conditioning dropout.

A training step draws t uniformly from 0..T-1 and ε ~ N(0, I), forms the VP latent
x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, and regresses the network output on the prediction type's target
(ε, v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0, or x0; see prediction.py), per sample weighted uniformly or by min-SNR-γ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..batch_random import BatchGenerator, draw
from ..config import check_choice
from ..errors import ConfigError
from .prediction import get_prediction
from .schedules import NoiseSchedule

Generator = torch.Generator | BatchGenerator | None  # see batch_random.py
WEIGHTINGS = ("uniform", "min_snr")
SELF_CONDITION_SHARE = 0.5  # samples trained with the net's own estimate (Chen et al. 2022), the rest with zeros


@dataclass(frozen=True)
class ObjectiveConfig:
    prediction: str = "eps"           # what the network predicts: "eps" (noise), "v" (velocity) or "x0" (clean latent)
    weighting: str = "uniform"        # per-timestep loss weight: "uniform" or "min_snr" (Hang et al. 2023)
    snr_gamma: float = 5.0            # γ of min-SNR weighting: the SNR is capped at γ
    offset_noise: float = 0.0         # std of a per-channel constant added to ε (0 = off; ~0.1 helps very dark/bright)
    cond_dropout: float = 0.1         # share of samples trained on the unconditional context (classifier-free guidance)
    # Grounding (issue 15; shapes data only, training only): pull each object word's cross-attention onto
    # the object's mask (diffusion/grounding.py). 0 = off, and then nothing of it runs.
    grounding_weight: float = 0.0     # weight of the grounding loss added to the denoising loss
    grounding_min_size: int = 4       # cross-attention on feature maps smaller than this on a side is left out
    # a warm-up: grounding from this step on, once the UNet places single objects (~1,700 steps on the preset)
    grounding_start: int = 0

    def __post_init__(self):
        get_prediction(self.prediction, "objective.prediction")  # a name in PREDICTIONS, else ConfigError
        check_choice("objective.weighting", self.weighting, WEIGHTINGS)
        if self.snr_gamma <= 0:
            raise ConfigError(f"objective.snr_gamma: must be positive, got {self.snr_gamma}")
        if self.offset_noise < 0:
            raise ConfigError(f"objective.offset_noise: must be at least 0, got {self.offset_noise}")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ConfigError(f"objective.cond_dropout: must be in [0, 1], got {self.cond_dropout}")
        if self.grounding_weight < 0:
            raise ConfigError(f"objective.grounding_weight: must be at least 0, got {self.grounding_weight}")
        if self.grounding_start < 0:
            raise ConfigError(f"objective.grounding_start: must be at least 0, got {self.grounding_start}")
        if self.grounding_min_size < 1:
            raise ConfigError(f"objective.grounding_min_size: must be at least 1, got {self.grounding_min_size}")


def sample_timesteps(x0: torch.Tensor, num_train_timesteps: int,
                     generator: Generator = None) -> torch.Tensor:
    """(B,) long timesteps, uniform over 0..T-1."""
    def randint(*shape, **kw):
        return torch.randint(num_train_timesteps, shape, **kw)
    return draw(randint, (x0.shape[0],), generator, x0)


def sample_noise(x0: torch.Tensor, generator: Generator = None, offset_noise: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) ε ~ N(0, I), plus `offset_noise`·N(0, 1) constant per (sample, channel) when > 0.

    The offset (Guttenberg 2023) lets the model change an image's mean colour, which plain ε almost never asks of it.
    """
    noise = draw(torch.randn, tuple(x0.shape), generator, x0, dtype=x0.dtype)
    if offset_noise > 0:
        offset = draw(torch.randn, (*x0.shape[:2], 1, 1), generator, x0, dtype=x0.dtype)  # (B, C, 1, 1)
        noise = noise + offset_noise * offset
    return noise


def conditioning_dropout(context: torch.Tensor, p: float, generator: Generator = None) -> torch.Tensor:
    """(B,) bool: which samples of the (B, L, D) context `drop_conditioning` replaces, each with probability p."""
    return draw(torch.rand, (context.shape[0],), generator, context) < p


def drop_conditioning(cond: dict, uncond: dict, p: float, generator: Generator = None, *,
                      drop: torch.Tensor | None = None) -> dict:
    """A copy of `cond` where, with probability p, a sample's "context" (and "context_mask") is the unconditional one.

    uncond["context"] is (1 or B, L, D), e.g. the empty caption's encoding. Training on it teaches the
    unconditional model that classifier-free guidance needs, in the same network. A missing mask means
    every token is real. drop: the (B,) choice already drawn by `conditioning_dropout` (then p is unused).
    """
    context = cond["context"]  # (B, L, D)
    B, L = context.shape[:2]
    drop = conditioning_dropout(context, p, generator) if drop is None else drop  # (B,) bool
    out = dict(cond)
    out["context"] = torch.where(drop[:, None, None], uncond["context"].expand_as(context), context)
    mask, uncond_mask = cond.get("context_mask"), uncond.get("context_mask")
    if mask is not None or uncond_mask is not None:
        full = torch.ones(B, L, dtype=torch.bool, device=context.device)
        mask = full if mask is None else mask
        uncond_mask = full if uncond_mask is None else uncond_mask.expand(B, L)
        out["context_mask"] = torch.where(drop[:, None], uncond_mask, mask)
    return out


class DiffusionLoss:
    """`loss(net, x0, cond, generator=None) -> scalar`: the weighted denoising loss of one batch.

    net(x_t, t, context, context_mask=None) -> (B, C, H, W); x0 (B, C, H, W) scaled latents; cond as for
    the Denoiser. Conditioning dropout is left to the caller (`drop_conditioning`), which holds the
    unconditional encoding.
    """

    def __init__(self, schedule: NoiseSchedule, cfg: ObjectiveConfig, self_condition: bool = False):
        self.schedule = schedule
        self.cfg = cfg
        self.prediction = get_prediction(cfg.prediction)
        self.self_condition = self_condition  # the net takes x0_estimate (model.self_condition)

    def __call__(self, net: Callable, x0: torch.Tensor, cond: dict,
                 generator: Generator = None) -> torch.Tensor:
        cfg = self.cfg
        t = sample_timesteps(x0, self.schedule.num_train_timesteps, generator)  # (B,)
        noise = sample_noise(x0, generator, cfg.offset_noise)
        alphas_cumprod = self.schedule.alphas_cumprod.to(x0.device)[t]  # (B,) float64
        alpha = alphas_cumprod.sqrt().to(x0.dtype).view(-1, 1, 1, 1)
        sigma_vp = (1 - alphas_cumprod).sqrt().to(x0.dtype).view(-1, 1, 1, 1)
        x_t = alpha * x0 + sigma_vp * noise
        t = t.to(torch.promote_types(x0.dtype, torch.float32))
        extra = {}
        if self.self_condition:
            extra["x0_estimate"] = self.first_estimate(net, x_t, t, cond, alpha, sigma_vp, generator)
        out = net(x_t, t, cond["context"], context_mask=cond.get("context_mask"), **extra)
        target = self.prediction.target(x0, noise, alpha, sigma_vp)
        per_sample = (out.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        if cfg.weighting == "min_snr":
            weights = self.prediction.min_snr_weight(snr, cfg.snr_gamma)
        else:  # "uniform"
            weights = torch.ones_like(snr)
        return (weights.float() * per_sample).mean()

    def first_estimate(self, net: Callable, x_t: torch.Tensor, t: torch.Tensor, cond: dict, alpha: torch.Tensor,
                       sigma_vp: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Self-conditioning's input (Chen et al. 2022): for half the samples, drawn, the net's own x0 from
        a first call without an estimate (no gradient, as a sampler's previous step gives none); zeros
        for the rest, as on a sampler's first step. (B, C, H, W)"""
        use = draw(torch.rand, (x_t.shape[0],), generator, x_t) < SELF_CONDITION_SHARE  # (B,) bool
        with torch.no_grad():
            first = net(x_t, t, cond["context"], context_mask=cond.get("context_mask"))
            estimate = self.prediction.to_x0(first.to(x_t.dtype), x_t, alpha, sigma_vp)
        return torch.where(use[:, None, None, None], estimate, torch.zeros_like(estimate))
