"""Guidance distillation (Meng et al. 2023, "On distillation of guided diffusion models", its first stage).

Classifier-free guidance costs two UNet calls per sampling step, D_w = D_u + w·(D_c - D_u) (guidance.py).
A student that starts as a copy of the teacher learns to give D_w in one call, at every noise level the
teacher was trained on:
    t ~ U{0..T-1},  σ = σ(t),  x = z + σ·ε                 (z a data latent, ε ~ N(0, I))
    loss = |D_θ(x, σ, c) - sg[D_w(x, σ, c)]|² / σ²
Dividing by σ² makes it the ε-prediction loss of the teacher's own training (D = x - σ·ε̂, so the loss is
|ε̂_θ - ε̂_w|²), whatever the network predicts. Unlike the consistency student (consistency.py) this one
stays a denoiser of the guided probability-flow ODE, so every sampler and step count works on it as on
the guided teacher, at half the UNet calls.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..batch_random import BatchGenerator
from .losses import sample_noise, sample_timesteps
from .schedules import NoiseSchedule

Generator = torch.Generator | BatchGenerator | None


def guidance_distillation_loss(student: Callable, teacher: Callable, z: torch.Tensor, cond: dict,
                               teacher_cond: dict, schedule: NoiseSchedule,
                               generator: Generator = None) -> torch.Tensor:
    """The loss of one batch (above). student, teacher: D(x, σ, cond) -> x0, the teacher a CFGDenoiser;
    z (B, C, H, W) data latents; cond the student's conditioning, teacher_cond the teacher's (with
    "uncond_context")."""
    t = sample_timesteps(z, schedule.num_train_timesteps, generator)  # (B,)
    sigma = schedule.t_to_sigma(t).to(z.device, z.dtype)  # (B,)
    noise = sample_noise(z, generator)
    s = sigma.view(-1, 1, 1, 1)
    x = z + s * noise
    with torch.no_grad():
        wanted = teacher(x, sigma, teacher_cond)
    return ((student(x, sigma, cond).float() - wanted.float()) / s.float()).pow(2).mean()
