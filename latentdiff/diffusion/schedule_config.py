"""ScheduleConfig and the names of the beta schedules and sigma spacings (schedules.py implements them),
importable without torch so that a saved UNet's record can be read before any model loads."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import check_choice
from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")  # make_betas' kinds
SPACINGS = ("leading", "trailing", "linspace", "karras")  # NoiseSchedule.sampling_sigmas' spacings


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "scaled_linear"       # betas: "linear", "scaled_linear" (SD: linear in sqrt β) or "cosine" (squaredcos_cap_v2)
    num_train_timesteps: int = 1000   # T: training timesteps 0..T-1
    beta_start: float = 0.00085       # β at t = 0 (linear kinds only; SD's value)
    beta_end: float = 0.012           # β at t = T-1 (linear kinds only; SD's value)
    zero_terminal_snr: bool = False   # rescale so ᾱ_T = 0 (Lin et al. 2023); pair with v prediction, trailing spacing

    def __post_init__(self):
        check_choice("schedule.kind", self.kind, BETA_SCHEDULES)
        if self.num_train_timesteps < 2:
            raise ConfigError(f"schedule.num_train_timesteps: must be at least 2, got {self.num_train_timesteps}")
        if self.kind != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(f"schedule: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
