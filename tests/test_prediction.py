"""Prediction types: one contract over every registered type, shared by the training loss and the Denoiser."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from latentdiff.diffusion import (
    PREDICTIONS,
    Denoiser,
    DiffusionLoss,
    NoiseSchedule,
    ObjectiveConfig,
    Prediction,
    get_prediction,
)
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.errors import ConfigError

T = torch.tensor([0, 3, 250, 700, 999])  # (B,) from almost clean to almost pure noise
COND = {"context": torch.zeros(len(T), 1, 1)}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


@dataclass(frozen=True)
class ScorePrediction(Prediction):
    """A type the package does not ship: the score -ε/s. x0 = x - σ·ε = x + σ²/sqrt(1+σ²)·score (s = σ/sqrt(1+σ²));
    c_out² = σ⁴/(1+σ²) = 1/(SNR·(SNR + 1))."""

    name: ClassVar[str] = "score"

    def target(self, x0, noise, alpha, sigma_vp):
        return -noise / sigma_vp

    def scalings(self, sigma):
        return 1.0, sigma ** 2 * (1 + sigma ** 2).rsqrt()

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr * (snr + 1))


def draw(schedule, seed):
    """x0, ε (B, 2, 4, 4) float64; sqrt(ᾱ_t), sqrt(1-ᾱ_t) (B, 1, 1, 1); x in sigma space; σ (B,)."""
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, len(T), 2, 4, 4, generator=gen, dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod[T].view(-1, 1, 1, 1)
    alpha, sigma_vp = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = alpha * x0 + sigma_vp * noise  # the VP latent the network sees in training
    x = x_t / alpha  # sigma space: x0 + σ·ε
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().flatten()
    return x0, noise, alpha, sigma_vp, x, sigma


def check_round_trip(prediction, schedule):
    """A perfect network outputs the training target; the Denoiser must turn it back into x0."""
    x0, noise, alpha, sigma_vp, x, sigma = draw(schedule, 1)
    target = prediction.target(x0, noise, alpha, sigma_vp)
    denoiser = Denoiser(lambda x_vp, t, context, context_mask=None: target, schedule, prediction.name)
    torch.testing.assert_close(denoiser(x, sigma, COND), x0, rtol=1e-5, atol=1e-5)


def check_min_snr_is_x0_weighting(prediction, schedule):
    """Hang et al.: the weighted output error equals min(SNR, γ)·|x0 error|², whatever the type predicts."""
    x0, noise, alpha, sigma_vp, x, sigma = draw(schedule, 2)
    snr = (alpha / sigma_vp).flatten() ** 2  # (B,)
    error = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    output = prediction.target(x0, noise, alpha, sigma_vp) + error
    denoised = Denoiser(lambda *a, **k: output, schedule, prediction)(x, sigma, COND)
    weighted = prediction.min_snr_weight(snr, 5.0) * error.pow(2).mean(dim=(1, 2, 3))
    x0_weighted = snr.clamp(max=5.0) * (denoised - x0).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, x0_weighted, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_training_target_round_trips_through_the_denoiser(name, schedule):
    assert PREDICTIONS[name].name == name and get_prediction(name) is PREDICTIONS[name]
    check_round_trip(PREDICTIONS[name], schedule)


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_min_snr_weight_is_the_same_x0_weighting(name, schedule):
    check_min_snr_is_x0_weighting(PREDICTIONS[name], schedule)


def test_unknown_prediction_is_a_config_error_naming_it(schedule):
    valid = ", ".join(map(repr, PREDICTIONS))
    with pytest.raises(ConfigError, match=f"objective.prediction: 'epsilon' is not one of {valid}"):
        ObjectiveConfig(prediction="epsilon")
    with pytest.raises(ConfigError, match=f"prediction: 'epsilon' is not one of {valid}"):
        Denoiser(lambda *a, **k: None, schedule, "epsilon")


def test_a_registered_prediction_needs_no_other_edit(monkeypatch, schedule):
    with pytest.raises(ConfigError, match="'score'"):
        ObjectiveConfig(prediction="score")
    monkeypatch.setitem(PREDICTIONS, "score", ScorePrediction())
    cfg = ObjectiveConfig(prediction="score", weighting="min_snr")
    assert isinstance(Denoiser(lambda *a, **k: None, schedule, "score").prediction, ScorePrediction)
    check_round_trip(PREDICTIONS["score"], schedule)
    check_min_snr_is_x0_weighting(PREDICTIONS["score"], schedule)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    loss = DiffusionLoss(schedule, cfg)(lambda x_t, t, c, context_mask=None: 0.5 * x_t, x0,
                                        {"context": torch.zeros(3, 1, 1)}, torch.Generator().manual_seed(5))
    assert loss.isfinite() and loss > 0
