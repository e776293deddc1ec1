"""The training objective, as short pieces: timesteps, noise, targets, weights, conditioning dropout.

A training step draws t uniformly from 0..T-1 and ε ~ N(0, I), forms the VP latent
x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, and regresses the network output on ε, v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0,
or x0, per sample weighted by `snr_weights`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import ObjectiveConfig
from .denoiser import PREDICTIONS
from .schedules import NoiseSchedule


def _on_generator(draw: Callable, shape: tuple, generator: torch.Generator | None, like: torch.Tensor,
                  **kwargs) -> torch.Tensor:
    """`draw(shape)` on the generator's device (a CPU generator cannot fill a CUDA tensor), moved to `like`'s."""
    device = generator.device if generator is not None else like.device
    return draw(*shape, generator=generator, device=device, **kwargs).to(like.device)


def sample_timesteps(x0: torch.Tensor, num_train_timesteps: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) long timesteps, uniform over 0..T-1."""
    def randint(*shape, **kw):
        return torch.randint(num_train_timesteps, shape, **kw)
    return _on_generator(randint, (x0.shape[0],), generator, x0)


def sample_noise(x0: torch.Tensor, generator: torch.Generator | None = None, offset_noise: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) ε ~ N(0, I), plus `offset_noise`·N(0, 1) constant per (sample, channel) when > 0.

    The offset (Guttenberg 2023) lets the model change an image's mean colour, which plain ε almost never asks of it.
    """
    noise = _on_generator(torch.randn, tuple(x0.shape), generator, x0, dtype=x0.dtype)
    if offset_noise > 0:
        offset = _on_generator(torch.randn, (*x0.shape[:2], 1, 1), generator, x0, dtype=x0.dtype)  # (B, C, 1, 1)
        noise = noise + offset_noise * offset
    return noise


def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                    sigma_vp: torch.Tensor) -> torch.Tensor:
    """What the network should output for x_t = alpha·x0 + sigma_vp·noise; alpha, sigma_vp (B, 1, 1, 1)."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha * noise - sigma_vp * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction: {prediction!r} is not one of {PREDICTIONS}")


def snr_weights(snr: torch.Tensor, prediction: str, weighting: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """(B,) loss weights for SNR = ᾱ/(1-ᾱ) values (B,).

    min-SNR-γ (Hang et al. 2023) weights the x0 error by min(SNR, γ). An ε error equals the x0 error times
    SNR, and a v error times SNR + 1, so the same weighting is min(SNR, γ)/SNR for ε (written min(γ/SNR, 1),
    which is 1 at SNR = 0) and min(SNR, γ)/(SNR + 1) for v.
    """
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"weighting: {weighting!r} is not one of 'uniform', 'min_snr'")
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    if prediction == "x0":
        return snr.clamp(max=gamma)
    raise ValueError(f"prediction: {prediction!r} is not one of {PREDICTIONS}")


def drop_conditioning(cond: dict, uncond: dict, p: float, generator: torch.Generator | None = None) -> dict:
    """A copy of `cond` where, with probability p, a sample's "context" (and "context_mask") is the unconditional one.

    uncond["context"] is (1 or B, L, D), e.g. the empty caption's encoding. Training on it teaches the
    unconditional model that classifier-free guidance needs, in the same network. A missing mask means
    every token is real.
    """
    context = cond["context"]  # (B, L, D)
    B, L = context.shape[:2]
    drop = _on_generator(torch.rand, (B,), generator, context) < p  # (B,) bool
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

    def __init__(self, schedule: NoiseSchedule, cfg: ObjectiveConfig):
        self.schedule = schedule
        self.cfg = cfg

    def __call__(self, net: Callable, x0: torch.Tensor, cond: dict,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.cfg
        t = sample_timesteps(x0, self.schedule.num_train_timesteps, generator)  # (B,)
        noise = sample_noise(x0, generator, cfg.offset_noise)
        alphas_cumprod = self.schedule.alphas_cumprod.to(x0.device)[t]  # (B,) float64
        alpha = alphas_cumprod.sqrt().to(x0.dtype).view(-1, 1, 1, 1)
        sigma_vp = (1 - alphas_cumprod).sqrt().to(x0.dtype).view(-1, 1, 1, 1)
        x_t = alpha * x0 + sigma_vp * noise
        out = net(x_t, t.to(torch.promote_types(x0.dtype, torch.float32)), cond["context"],
                  context_mask=cond.get("context_mask"))
        target = training_target(cfg.prediction, x0, noise, alpha, sigma_vp)
        per_sample = (out.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        weights = snr_weights(snr, cfg.prediction, cfg.weighting, cfg.snr_gamma).float()
        return (weights * per_sample).mean()
