"""Consistency distillation (Song et al. 2023; latent consistency models, Luo et al. 2023) in sigma space.

A consistency function f(x, σ) maps any point of one probability-flow ODE trajectory to that trajectory's
end at σ = 0, so one evaluation is a sample and a few (re-noising in between: `samplers.sample_lcm`)
refine it. With ε prediction the Denoiser D(x, σ) = x - σ·ε̂ already meets f's boundary condition
f(x, 0) = x exactly, so the student is an ordinary UNet and an ordinary Denoiser: only its training differs.

One step of distillation, on a grid σ_0 > σ_1 > ... > σ_N = 0 of the teacher's ODE:
    x      = z + σ_n·ε                                   a point at grid level n (z a data latent)
    x_next = x + (σ_{n+1} - σ_n)·(x - T(x, σ_n))/σ_n     one Euler (= DDIM) step of the guided teacher T
    loss   = |D_θ(x, σ_n) - sg[D_θ(x_next, σ_{n+1})]|²    the student agrees with itself one step later
The target is the student itself under stop-gradient (improved consistency training, Song & Dhariwal
2023, drops the EMA target) or, as in LCM, an EMA of it; at σ_{n+1} = 0 it is x_next, the teacher's own
x0, which anchors the chain.
The teacher is guided (classifier-free, scale w) and the student is not: the guidance is distilled into
it (as LCM does), so sampling the student costs one UNet call per step instead of two.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..batch_random import BatchGenerator, draw
from .losses import sample_noise

Generator = torch.Generator | BatchGenerator | None


def grid_levels(grid: torch.Tensor, batch: int, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    """(B,) grid indices n, uniform over 0..N-1 (each has a step to σ_{n+1}) for a grid of N + 1 sigmas."""
    def randint(*shape, **kw):
        return torch.randint(len(grid) - 1, shape, **kw)
    return draw(randint, (batch,), generator, like)


def teacher_step(teacher: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 cond: dict) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from σ to σ_next (both (B,)) with the teacher D(x, σ, cond)."""
    s, s_next = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    return x + (s_next - s) * (x - teacher(x, sigma, cond)) / s


def consistency_distillation_loss(student: Callable, teacher: Callable, z: torch.Tensor, cond: dict,
                                  teacher_cond: dict, grid: torch.Tensor, generator: Generator = None,
                                  target: Callable | None = None, huber_c: float = 0.0) -> torch.Tensor:
    """The loss of one batch (above). student, teacher: D(x, σ, cond) -> x0 (the teacher usually a CFGDenoiser);
    z (B, C, H, W) data latents; cond the student's conditioning, teacher_cond the teacher's (with
    "uncond_context" when guided); grid (N + 1,) decreasing sigmas ending in 0; target: the network that
    makes the targets (default: the student itself; LCM uses an EMA of it); huber_c > 0: the pseudo-Huber
    distance sqrt(|d|² + c²) - c per sample (improved consistency training), which weighs a sample's error by
    its size less than the square does, instead of the mean square."""
    target = student if target is None else target
    grid = grid.to(z.device, z.dtype)
    n = grid_levels(grid, z.shape[0], generator, z)  # (B,)
    sigma, sigma_next = grid[n], grid[n + 1]  # (B,) each
    noise = sample_noise(z, generator)
    x = z + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        x_next = teacher_step(teacher, x, sigma, sigma_next, teacher_cond)
        wanted = target(x_next, sigma_next, cond)  # = x_next where σ_next = 0
    diff = student(x, sigma, cond).float() - wanted.float()
    if huber_c > 0:
        return ((diff.pow(2).flatten(1).sum(1) + huber_c ** 2).sqrt() - huber_c).mean()
    return diff.pow(2).mean()
