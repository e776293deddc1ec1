"""Noise schedules, the prediction types, the denoiser contract D(x, sigma, cond) -> x0, and the training objective.

The names below load on first use (PEP 562), so that the torch-free modules of this package (schedule_config,
prediction_names) can be imported without torch.
"""
from ..lazy import lazy_attributes

_LAZY = {
    "Denoiser": "denoiser",
    **dict.fromkeys(["WEIGHTINGS", "DiffusionLoss", "ObjectiveConfig", "drop_conditioning", "sample_noise",
                     "sample_timesteps"], "losses"),
    **dict.fromkeys(["PREDICTIONS", "EpsPrediction", "Prediction", "VPrediction", "X0Prediction", "get_prediction"],
                    "prediction"),
    **dict.fromkeys(["SPACINGS", "NoiseSchedule", "karras_sigmas", "make_betas", "rescale_zero_terminal_snr"],
                    "schedules"),
}

__all__ = [*_LAZY]

__getattr__ = lazy_attributes(__name__, globals(), _LAZY)
