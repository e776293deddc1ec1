"""Noise schedules, the prediction types, the denoiser contract D(x, sigma, cond) -> x0, and the training objective."""
from .denoiser import Denoiser
from .losses import WEIGHTINGS, DiffusionLoss, ObjectiveConfig, drop_conditioning, sample_noise, sample_timesteps
from .prediction import PREDICTIONS, EpsPrediction, Prediction, VPrediction, X0Prediction, get_prediction
from .schedules import SPACINGS, NoiseSchedule, karras_sigmas, make_betas, rescale_zero_terminal_snr

__all__ = [
    "Denoiser",
    "WEIGHTINGS", "DiffusionLoss", "ObjectiveConfig", "drop_conditioning", "sample_noise", "sample_timesteps",
    "PREDICTIONS", "EpsPrediction", "Prediction", "VPrediction", "X0Prediction", "get_prediction",
    "SPACINGS", "NoiseSchedule", "karras_sigmas", "make_betas", "rescale_zero_terminal_snr",
]
