"""The training objective: targets, min-SNR weights, the loss itself, offset noise, conditioning dropout."""
import pytest
import torch
from diffusers import DDPMScheduler

from latentdiff.diffusion import DiffusionLoss, NoiseSchedule, drop_conditioning, sample_noise, sample_timesteps
from latentdiff.diffusion.losses import ObjectiveConfig
from latentdiff.diffusion.prediction import PREDICTIONS
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.errors import ConfigError


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


def vp_at(schedule, t):
    """sqrt(ᾱ_t), sqrt(1 - ᾱ_t) as (B, 1, 1, 1)."""
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def test_v_target_matches_diffusers(schedule):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    alpha, sigma = vp_at(schedule, t)
    ours = PREDICTIONS["v"].target(x0, noise, alpha.float(), sigma.float())
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").get_velocity(x0, noise, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert PREDICTIONS["eps"].target(x0, noise, alpha, sigma) is noise
    assert PREDICTIONS["x0"].target(x0, noise, alpha, sigma) is x0


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.1, 5.0, 50.0], dtype=torch.float64)
    expected = {"eps": [1.0, 1.0, 1.0, 0.1], "v": [0.0, 0.1 / 1.1, 5 / 6, 5 / 51], "x0": [0.0, 0.1, 5.0, 5.0]}
    for prediction, weights in expected.items():
        torch.testing.assert_close(PREDICTIONS[prediction].min_snr_weight(snr, 5.0), torch.tensor(weights).double())


@pytest.mark.parametrize("prediction,weighting", [("eps", "uniform"), ("v", "min_snr"), ("x0", "min_snr")])
def test_loss_is_the_weighted_error_of_the_drawn_batch(prediction, weighting, schedule):
    cfg = ObjectiveConfig(prediction=prediction, weighting=weighting, offset_noise=0.1)
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    context = torch.randn(4, 3, 5)
    seen = {}
    scale = torch.nn.Parameter(torch.tensor(0.5))

    def net(x_t, t, context, context_mask=None):
        seen.update(x_t=x_t, t=t, context=context)
        return scale * x_t

    loss = DiffusionLoss(schedule, cfg)(net, x0, {"context": context}, torch.Generator().manual_seed(7))
    # Replay the same draws, in the same order, from the same seed.
    gen = torch.Generator().manual_seed(7)
    t = sample_timesteps(x0, 1000, gen)
    noise = sample_noise(x0, gen, 0.1)
    alpha, sigma_vp = (v.float() for v in vp_at(schedule, t))
    x_t = alpha * x0 + sigma_vp * noise
    assert torch.equal(seen["t"], t.float()) and seen["context"] is context
    torch.testing.assert_close(seen["x_t"], x_t)
    snr = (alpha / sigma_vp).flatten().double() ** 2
    per_sample = (0.5 * x_t - PREDICTIONS[prediction].target(x0, noise, alpha, sigma_vp)).pow(2).mean(dim=(1, 2, 3))
    weights = PREDICTIONS[prediction].min_snr_weight(snr, 5.0) if weighting == "min_snr" else torch.ones_like(snr)
    expected = (weights.float() * per_sample).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert scale.grad is not None and scale.grad != 0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_to_x0_inverts_the_target(prediction, schedule):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 2, 3, 4, 4, generator=gen, dtype=torch.float64)  # (B=2, C=3, 4, 4) each
    alpha, sigma_vp = vp_at(schedule, torch.tensor([10, 900]))
    x_t = alpha * x0 + sigma_vp * noise
    kind = PREDICTIONS[prediction]
    torch.testing.assert_close(kind.to_x0(kind.target(x0, noise, alpha, sigma_vp), x_t, alpha, sigma_vp), x0)


def test_self_conditioning_feeds_half_the_batch_its_own_estimate_without_gradient(schedule):
    x0 = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    scale = torch.nn.Parameter(torch.tensor(0.5))
    calls = []

    def net(x_t, t, context, context_mask=None, x0_estimate=None):
        calls.append({"estimate": x0_estimate, "grad": torch.is_grad_enabled(), "x_t": x_t, "t": t})
        out = scale * x_t
        calls[-1]["out"] = out.detach()
        return out if x0_estimate is None else out + 0.1 * x0_estimate

    loss = DiffusionLoss(schedule, ObjectiveConfig(), self_condition=True)(
        net, x0, {"context": torch.zeros(64, 3, 5)}, torch.Generator().manual_seed(7))
    assert [c["estimate"] is None for c in calls] == [True, False] and [c["grad"] for c in calls] == [False, True]
    alpha, sigma_vp = (v.float() for v in vp_at(schedule, calls[0]["t"].long()))
    own = PREDICTIONS["eps"].to_x0(calls[0]["out"], calls[0]["x_t"], alpha, sigma_vp)
    given = calls[1]["estimate"]
    used = (given != 0).flatten(1).any(1)  # (B,): which samples got the estimate, the rest zeros
    assert 16 < used.sum() < 48  # half, drawn
    torch.testing.assert_close(given[used], own[used])
    loss.backward()  # through the second call only: the first is not part of the graph
    assert scale.grad is not None

    calls.clear()
    DiffusionLoss(schedule, ObjectiveConfig())(net, x0, {"context": torch.zeros(64, 3, 5)})
    assert len(calls) == 1 and calls[0]["estimate"] is None  # off: one call, nothing drawn for it


def test_timesteps_are_uniform_over_the_schedule():
    t = sample_timesteps(torch.zeros(20000, 1), 10, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).float()
    assert (counts / 2000 - 1).abs().max() < 0.1


def test_offset_noise_shifts_whole_channels():
    x0 = torch.zeros(512, 4, 16, 16)
    plain = sample_noise(x0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, torch.Generator().manual_seed(0), offset_noise=0.5)
    assert plain.std().item() == pytest.approx(1.0, abs=0.01)
    # A channel's mean is ~N(0, 1/256) without the offset and ~N(0, 1/256 + 0.25) with it.
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 16, rel=0.1)
    assert offset.mean(dim=(2, 3)).std().item() == pytest.approx((1 / 256 + 0.25) ** 0.5, rel=0.1)


def test_conditioning_dropout():
    B, L = 4000, 3
    cond = {"context": torch.ones(B, L, 2), "context_mask": torch.zeros(B, L, dtype=torch.bool)}
    uncond = {"context": torch.full((1, L, 2), -1.0)}
    out = drop_conditioning(cond, uncond, 0.1, torch.Generator().manual_seed(0))
    dropped = out["context"][:, 0, 0] == -1
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert torch.all(out["context"][~dropped] == 1)
    # A dropped sample takes the unconditional mask (none given: every token real); the others keep theirs.
    assert out["context_mask"][dropped].all() and not out["context_mask"][~dropped].any()
    assert torch.equal(cond["context"], torch.ones(B, L, 2))  # the input is not modified
    again = drop_conditioning(cond, uncond, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again["context"], out["context"])
    assert torch.all(drop_conditioning(cond, uncond, 0.0)["context"] == 1)
    assert torch.all(drop_conditioning(cond, uncond, 1.0)["context"] == -1)


def test_objective_config_is_validated():
    assert ObjectiveConfig().cond_dropout == 0.1 and ObjectiveConfig().snr_gamma == 5.0
    with pytest.raises(ConfigError, match="objective.prediction"):
        ObjectiveConfig(prediction="score")
    with pytest.raises(ConfigError, match="objective.weighting"):
        ObjectiveConfig(weighting="p2")
    with pytest.raises(ConfigError, match="cond_dropout"):
        ObjectiveConfig(cond_dropout=1.5)
