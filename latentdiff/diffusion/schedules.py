"""Noise schedules: betas -> ᾱ (alphas_cumprod) -> the sigma view that samplers work in.

Training uses the variance-preserving (VP) form  x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε,  t in 0..T-1.
Dividing by sqrt(ᾱ_t) gives the "sigma" form that every sampler here uses (Karras et al. 2022):

    x = x0 + σ·ε,    σ_t = sqrt((1 - ᾱ_t) / ᾱ_t),    x_vp = x / sqrt(1 + σ²).

σ grows with t, so the schedule is also a map t <-> σ; for continuous t it interpolates log σ linearly
between the integer timesteps, and `sigma_to_t` is its exact inverse.

Inference sigma sequences follow diffusers' `timestep_spacing` (Lin et al. 2023, table 2):
    leading    t = (N-1)·k, ..., k, 0  (+ steps_offset), k = T // N    (SD 1.x/2.x: steps_offset = 1)
    trailing   t = round(T - i·T/N) - 1                                 (starts at T-1, for zero-terminal SNR)
    linspace   t = linspace(T-1, 0, N), not rounded
    karras     σ_i = (σ_max^(1/ρ) + i/(N-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ over the whole training range
and always end with σ = 0. Deliberate differences from diffusers: linspace's fractional timesteps get their
σ by log-σ interpolation (diffusers' Euler interpolates σ linearly, < 1e-4 apart; DDIM rounds t), and one
linspace step starts at T-1 (diffusers: at 0); karras spans the whole training range for every sampler
(diffusers' Euler and Heun take the range of the spaced timesteps, the same thing only for linspace).
diffusers' DPMSolverMultistep has its own "leading" (k = T // (N + 1)).

Tables are float64 on the CPU; conversions move them to the device of their input.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .schedule_config import BETA_SCHEDULES, SPACINGS, ScheduleConfig

# ᾱ_T with zero-terminal SNR is exactly 0, so σ_T would be infinite. Like diffusers we clamp it to the
# smallest positive fp16 subnormal: σ_T = sqrt((1 - 2**-24) / 2**-24) ≈ 4096, finite, and x at σ_T is
# noise up to a 2.4e-4 share of signal.
ZERO_SNR_ALPHA_CUMPROD = 2.0 ** -24


def make_betas(kind: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """(T,) float64 betas for "linear", "scaled_linear" (SD: linear in sqrt β) or "cosine"."""
    T = num_train_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        # Nichol & Dhariwal 2021: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), β_t = 1 - ᾱ(t+1)/ᾱ(t), capped at 0.999
        # so the last step is not a division by ~0 (diffusers' "squaredcos_cap_v2").
        s = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ConfigError(f"schedule.kind: {kind!r} is not one of {', '.join(map(repr, BETA_SCHEDULES))}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose ᾱ_T is exactly 0 (Lin et al. 2023, algorithm 1).

    sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first value is unchanged; the model then
    learns to start from pure noise, which is what sampling starts from.
    """
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """The training noise schedule and its sigma view.

    Attributes (float64, CPU, index = timestep):
        betas, alphas_cumprod (T,)   ᾱ decreasing from ~1 towards 0
        sigmas, log_sigmas (T,)      σ increasing
    """

    def __init__(self, betas: torch.Tensor, zero_terminal_snr: bool = False):
        betas = betas.detach().to("cpu", torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ConfigError(f"schedule: needs at least 2 betas, got shape {tuple(betas.shape)}")
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if zero_terminal_snr:
            # Long schedules can put ᾱ_{T-2} below 2**-24; halve it then, to keep ᾱ strictly decreasing.
            before_last = alphas_cumprod[-2].item()
            alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD if before_last > ZERO_SNR_ALPHA_CUMPROD else before_last / 2
        if not (alphas_cumprod[1:] < alphas_cumprod[:-1]).all() or alphas_cumprod[-1] <= 0:
            raise ConfigError("schedule: betas must lie in (0, 1) so that ᾱ decreases strictly and stays above 0")
        self.betas = betas
        self.zero_terminal_snr = zero_terminal_snr
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        betas = make_betas(cfg.kind, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        return cls(betas, zero_terminal_snr=cfg.zero_terminal_snr)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def _table(self, like: torch.Tensor) -> torch.Tensor:
        """log σ table on `like`'s device, in float32 or float64 (half precision is too coarse for it)."""
        return self.log_sigmas.to(like.device, torch.promote_types(like.dtype, torch.float32))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timesteps (same shape as `sigma`) whose log σ interpolates the table; σ = 0 maps to t = 0."""
        sigma = torch.as_tensor(sigma)
        log_table = self._table(sigma)  # (T,) increasing
        log_sigma = sigma.to(log_table.dtype).clamp(min=1e-10).log()
        low = (torch.searchsorted(log_table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_table) - 2)
        low = low.reshape(log_sigma.shape)
        lo, hi = log_table[low], log_table[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(log_table.dtype) + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at continuous timesteps t in [0, T-1] (same shape as `t`), interpolating log σ."""
        t = torch.as_tensor(t)
        log_table = self._table(t if t.is_floating_point() else t.double())
        t = t.to(log_table.dtype).clamp(0, len(log_table) - 1)
        low = t.floor().long().clamp(max=len(log_table) - 2)
        w = t - low
        return ((1 - w) * log_table[low] + w * log_table[low + 1]).exp()

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 1) -> torch.Tensor:
        """(steps,) float64 timesteps, from noisiest to cleanest; `steps_offset` shifts "leading" only."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ConfigError(f"steps: {steps} must be between 1 and the {T} training timesteps")
        i = torch.arange(steps, dtype=torch.float64)
        if spacing == "leading":
            t = (i * (T // steps)).flip(0) + steps_offset
        elif spacing == "trailing":
            t = (T - i * (T / steps)).round() - 1
        elif spacing == "linspace":
            t = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
        else:
            raise ConfigError(f"spacing: {spacing!r} is not one of 'leading', 'trailing', 'linspace'")
        if t.max() > T - 1 or t.min() < 0:
            raise ConfigError(f"steps: {steps} steps with steps_offset={steps_offset} reach timestep "
                              f"{int(t.max())}, past the last training timestep {T - 1}")
        return t

    def sampling_sigmas(self, steps: int, spacing: str = "leading", steps_offset: int = 1,
                        rho: float = 7.0) -> torch.Tensor:
        """(steps + 1,) float64 sigmas from noisiest to 0, the sequence every sampler takes."""
        if spacing == "karras":
            if steps < 1:
                raise ConfigError(f"steps: must be at least 1, got {steps}")
            sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)
        elif spacing in SPACINGS:
            sigmas = self.t_to_sigma(self.timesteps(steps, spacing, steps_offset))
        else:
            raise ConfigError(f"spacing: {spacing!r} is not one of {', '.join(map(repr, SPACINGS))}")
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(steps,) float64 sigmas spaced evenly in σ^(1/ρ) (Karras et al. 2022, eq. 5), σ_max first."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
