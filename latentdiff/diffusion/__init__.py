"""Noise schedules, the denoiser contract D(x, sigma, cond) -> x0, and the training objective."""
from .denoiser import PREDICTIONS, Denoiser, x0_coefficients
from .losses import DiffusionLoss, drop_conditioning, sample_noise, sample_timesteps, snr_weights, training_target
from .schedules import SPACINGS, NoiseSchedule, karras_sigmas, make_betas, rescale_zero_terminal_snr

__all__ = [
    "PREDICTIONS", "Denoiser", "x0_coefficients",
    "DiffusionLoss", "drop_conditioning", "sample_noise", "sample_timesteps", "snr_weights", "training_target",
    "SPACINGS", "NoiseSchedule", "karras_sigmas", "make_betas", "rescale_zero_terminal_snr",
]
