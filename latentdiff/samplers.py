"""Samplers: pure functions with one signature,

    sample_NAME(denoiser, x, sigmas, *, cond, generator=None, callback=None, **options) -> x at σ = 0

x (B, C, H, W) is the starting latent in sigma space (x = x0 + σ·ε, see `initial_latent`); sigmas is the
decreasing sequence from `NoiseSchedule.sampling_sigmas`, ending with 0; denoiser is D(x, sigma, cond) -> x0
(a `Denoiser`, or a guidance wrapper around one), so no sampler knows the prediction type.

`generator` is one torch.Generator per batch element: sample b's noise comes from generator[b] only, so an
image depends on its seed and not on the batch it was made in. `callback(dict(i, x, sigma, denoised))` is
called once per step, before the step updates x. Samplers run under torch.no_grad().

In sigma space DDPM, DDIM(η) and Euler ancestral(η) are one family: each moves x to x0 + σ_down·ε̂ and
adds σ_up of fresh noise, with σ_up² = η²·σ_next²(σ² - σ_next²)/σ² (DDIM with η = 1 is the DDPM
posterior), and DDIM(η = 0) is the Euler step. Each is kept in its paper's form here; the tests check that
they agree.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .sampling_config import SAMPLER_NAMES, SamplingConfig, check_sampler  # noqa: F401 (their old home)

Generators = Sequence[torch.Generator] | torch.Generator | None


def randn_per_sample(shape: Sequence[int], generator: Generators, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(B, ...) standard normal noise; row b is drawn from generator[b] alone (global RNG if None)."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        generator = [generator]
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
    # Drawn on each generator's own device (a CPU generator cannot fill a CUDA tensor), then moved.
    rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator]
    return torch.stack(rows).to(device)


def initial_latent(shape: Sequence[int], sigmas: torch.Tensor, generator: Generators = None, *,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, C, H, W) starting point for `sigmas`: noise · sqrt(1 + σ_max²).

    That is the std of x0 + σ_max·ε for unit-variance latents, and what diffusers uses for DDPM, DDIM and
    DPM-Solver (init_noise_sigma = 1 in VP space) and for Euler/Heun with "leading" spacing; diffusers' Euler
    and Heun use σ_max alone for "linspace" and "trailing" (0.2% less for SD's σ_max = 14.6, the same with
    zero-terminal SNR's σ_max ≈ 4096).
    """
    sigma_max = sigmas[0].item()
    return randn_per_sample(shape, generator, dtype=dtype, device=device) * (1 + sigma_max ** 2) ** 0.5


def _noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn_per_sample(x.shape, generator, dtype=x.dtype, device=x.device)


def _steps(x: torch.Tensor, sigmas: torch.Tensor):
    """(i, sigma, sigma_next, sigma_in) per step; sigma_in (B,) is what the denoiser takes."""
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=x.dtype)
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        yield i, sigmas[i], sigmas[i + 1], sigmas[i] * ones


def _denoise(denoiser, x: torch.Tensor, sigma_in: torch.Tensor, cond: dict, callback: Callable | None, i: int,
             sigma: torch.Tensor) -> torch.Tensor:
    """D(x, σ) for step i, reported to the callback before the step uses it."""
    denoised = denoiser(x, sigma_in, cond)
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return denoised


def _probability_flow(denoiser, x, sigmas, cond, callback, *, heun: bool):
    """Steps of the probability-flow ODE dx/dσ = (x - D(x, σ))/σ: Euler's, or Heun's with a corrector that
    evaluates D again at the Euler point (not on the step to σ = 0, where σ_next would divide by 0)."""
    for i, sigma, sigma_next, sigma_in in _steps(x, sigmas):
        denoised = _denoise(denoiser, x, sigma_in, cond, callback, i, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        x_euler = x + d * dt
        if not heun or sigma_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - denoiser(x_euler, sigma_next * torch.ones_like(sigma_in), cond)) / sigma_next
        x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond, generator=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, alg. 2, no churn)."""
    return _probability_flow(denoiser, x, sigmas, cond, callback, heun=False)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, alg. 1); Euler for the step to 0."""
    return _probability_flow(denoiser, x, sigmas, cond, callback, heun=True)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up): step deterministically to σ_down, then add σ_up of noise; σ_down² + σ_up² = σ_next²."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).sqrt())
    sigma_down = (sigma_next ** 2 - sigma_up ** 2).sqrt()
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, cond, generator=None, callback=None, eta=1.0):
    """Euler ancestral sampling (k-diffusion): an Euler step to σ_down, then fresh noise of std σ_up."""
    for i, sigma, sigma_next, sigma_in in _steps(x, sigmas):
        denoised = _denoise(denoiser, x, sigma_in, cond, callback, i, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0 and eta > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, cond, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12) in VP coordinates; η = 0 is deterministic, η = 1 is DDPM's posterior."""
    for i, sigma, sigma_next, sigma_in in _steps(x, sigmas):
        denoised = _denoise(denoiser, x, sigma_in, cond, callback, i, sigma)
        eps = (x - denoised) / sigma
        # sqrt(ᾱ) and sqrt(1 - ᾱ) at σ_next, written without the cancellation in 1 - ᾱ.
        alpha_next = (1 + sigma_next ** 2).rsqrt()
        std_next = sigma_next * alpha_next
        # DDIM's σ_t(η) = η·sqrt((1-ᾱ_next)/(1-ᾱ))·sqrt(1 - ᾱ/ᾱ_next) = η·std_next·sqrt(σ²-σ_next²)/σ
        std = eta * std_next * (sigma ** 2 - sigma_next ** 2).sqrt() / sigma
        x_vp = alpha_next * denoised + (std_next ** 2 - std ** 2).clamp(min=0).sqrt() * eps
        if sigma_next > 0 and eta > 0:
            x_vp = x_vp + std * _noise_like(x, generator)
        x = x_vp / alpha_next
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond, generator=None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7, "fixed small" variance), which is DDIM with η = 1."""
    return sample_ddim(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=1.0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2): multistep, 2nd order in λ = -log σ; 1st on the first and last step."""
    old_denoised, h_last = None, None
    for i, sigma, sigma_next, sigma_in in _steps(x, sigmas):
        denoised = _denoise(denoiser, x, sigma_in, cond, callback, i, sigma)
        if sigma_next == 0:
            x = denoised  # the exponential integrator's limit as σ_next -> 0
            continue
        h = (sigma / sigma_next).log()
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, cond, generator=None, callback=None):
    """UniPC (Zhao et al. 2023), data prediction, B(h) = e^-h - 1 ("bh2"), order 2: each step is predicted
    as DPM-Solver++(2M)'s is (UniP-2 with this B(h) is that step), and once D at the new point is known the
    step is taken again with it (UniC), which costs no extra call. First order on the first and last step
    (diffusers' lower_order_final); the step to σ = 0 is not corrected (nothing is evaluated there)."""
    n = len(sigmas) - 1
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas.double().tolist()]  # λ = -log σ
    history: list[torch.Tensor] = []  # D at the last two points, newest last
    start, start_order = None, 0  # where the last step started (corrected) and its order
    for i, sigma, sigma_next, sigma_in in _steps(x, sigmas):
        denoised = _denoise(denoiser, x, sigma_in, cond, callback, i, sigma)
        if start is not None:  # UniC: redo step i-1 with D at its end
            x = _unipc_step(start, lambdas[i - 2:i + 1] if start_order == 2 else lambdas[i - 1:i + 1],
                            history[-start_order:], corrector=denoised)
        history = (history + [denoised])[-2:]
        order = min(2, n - i, i + 1)
        start, start_order = x, order
        if sigma_next == 0:
            x = denoised  # the exponential integrator's limit as σ_next -> 0
        else:
            x = _unipc_step(x, lambdas[i + 1 - order:i + 2], history[-order:])
    return x


def _unipc_step(x: torch.Tensor, lambdas: list[float], denoised: list[torch.Tensor],
                corrector: torch.Tensor | None = None) -> torch.Tensor:
    """One UniPC step of order len(denoised) (1 or 2) from x at λ_s to λ_t: `lambdas` is [λ_t] preceded by
    the λ of each point in `denoised` (oldest first, the step's start last); without `corrector` the
    predictor UniP, with it (D at λ_t) the corrector UniC."""
    *before, lambda_s, lambda_t = lambdas
    d_s = denoised[-1]
    h = lambda_t - lambda_s
    phi_1 = math.expm1(-h)  # h·φ1 in data prediction; also B(h)
    out = math.exp(-h) * x - phi_1 * d_s  # σ_t / σ_s = e^-h
    if before:  # the slope from the point before the start, scaled to the step: D1 = (d_prev - d_s) / r
        r = (before[0] - lambda_s) / h
        slope = (denoised[0] - d_s) / r
    if corrector is None:
        return out - phi_1 * 0.5 * slope if before else out  # UniP-2 takes ρ = 1/2
    # UniC: ρ solves [[1, 1], [r, 1]] ρ = b with b_k = k!·φ_k(h) / B(h), φ_k of -h
    b_1 = (phi_1 / -h - 1) / phi_1
    if not before:
        return out - phi_1 * 0.5 * (corrector - d_s)  # first order: ρ = 1/2
    b_2 = 2 * ((phi_1 / -h - 1) / -h - 0.5) / phi_1
    rho_slope = (b_1 - b_2) / (1 - r)
    return out - phi_1 * (rho_slope * slope + (b_1 - rho_slope) * (corrector - d_s))


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, cond, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, alg. 1; the LCM scheduler): jump to x0 = D(x, σ), then
    noise it afresh to σ_next. Made for a consistency-distilled student (train/distill.py), whose D lands on
    the end of the ODE trajectory from any σ; with an ordinary model it is ancestral sampling with σ_down = 0."""
    for i, sigma, sigma_next, sigma_in in _steps(x, sigmas):
        x = _denoise(denoiser, x, sigma_in, cond, callback, i, sigma)
        if sigma_next > 0:
            x = x + _noise_like(x, generator) * sigma_next
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}

# The names a check reads without importing this module (and torch); the two lists must agree.
assert tuple(SAMPLERS) == SAMPLER_NAMES, "list the samplers of SAMPLERS in sampling_config.SAMPLER_NAMES too"
