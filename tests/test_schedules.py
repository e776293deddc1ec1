"""Noise schedules: betas, zero-terminal SNR, σ <-> t, and inference sigma sequences, checked against diffusers."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from latentdiff.config import apply_overrides
from latentdiff.diffusion import NoiseSchedule, karras_sigmas
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.errors import ConfigError

DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers(kind, zero_snr):
    ours = NoiseSchedule.from_config(ScheduleConfig(kind=kind, zero_terminal_snr=zero_snr))
    theirs = EulerDiscreteScheduler(beta_schedule=DIFFUSERS_KIND[kind], beta_start=0.00085, beta_end=0.012,
                                    rescale_betas_zero_snr=zero_snr)
    # diffusers computes in float32; the rescaling's subtraction costs it a few more digits near t = T-1.
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=1e-5, atol=1e-5 if zero_snr else 1e-8)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=1e-4, atol=1e-6)
    if zero_snr:  # including the clamp of ᾱ_T (σ_T finite)
        assert ours.alphas_cumprod[-1].item() == theirs.alphas_cumprod[-1].item() == 2.0 ** -24


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(kind):
    plain = NoiseSchedule.from_config(ScheduleConfig(kind=kind))
    zero = NoiseSchedule.from_config(ScheduleConfig(kind=kind, zero_terminal_snr=True))
    ab = zero.alphas_cumprod
    assert ab[-1] < 1e-7  # ≈ 0: the last timestep is pure noise
    if kind != "cosine":  # cosine's ᾱ_T is ~2e-9 already; the linear kinds' is far from 0 without rescaling
        assert plain.alphas_cumprod[-1] > 1e-4
    assert (ab[1:] < ab[:-1]).all()  # still strictly decreasing, so σ <-> t stays a bijection
    assert ab[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)  # first step unchanged
    assert 4000 < zero.sigma_max < 4200  # sqrt((1 - 2**-24) / 2**-24)
    assert zero.sigma_to_t(torch.tensor(zero.sigma_max)).item() == pytest.approx(999)


def test_long_zero_snr_schedule_stays_monotone():
    zero = NoiseSchedule.from_config(ScheduleConfig(kind="linear", num_train_timesteps=4000, zero_terminal_snr=True))
    assert (zero.alphas_cumprod[1:] < zero.alphas_cumprod[:-1]).all()
    assert zero.sigmas.isfinite().all()


def test_sigma_and_t_are_inverse(schedule):
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.t_to_sigma(t), schedule.sigmas)
    continuous = torch.linspace(0, 999, 777, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(continuous)), continuous, rtol=0, atol=1e-9)
    # Between two timesteps log σ is linear in t.
    mid = schedule.t_to_sigma(torch.tensor(10.5, dtype=torch.float64))
    assert mid.log().item() == pytest.approx(schedule.log_sigmas[10:12].mean().item())
    # float32 in, float32 out, shape kept; σ = 0 and σ beyond the table clamp to the ends.
    sig = torch.tensor([[0.0, 1.0], [schedule.sigma_max * 10, schedule.sigma_min]])
    t32 = schedule.sigma_to_t(sig)
    assert t32.dtype == torch.float32 and t32.shape == (2, 2)
    assert t32[0, 0] == 0 and t32[1, 0] == 999 and t32[1, 1] == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 999])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0)])
def test_integer_spacings_match_diffusers(spacing, offset, steps, schedule):
    ddim = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(steps)
    torch.testing.assert_close(schedule.timesteps(steps, spacing, offset), ddim.timesteps.double())
    euler = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(steps)
    sigmas = schedule.sampling_sigmas(steps, spacing, offset)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, euler.sigmas.double(), rtol=2e-5, atol=0)  # diffusers' are float32


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_linspace_spacing_matches_diffusers(steps, schedule):
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    euler.set_timesteps(steps)
    torch.testing.assert_close(schedule.timesteps(steps, "linspace"), euler.timesteps.double(), rtol=0, atol=1e-3)
    # Fractional timesteps: we interpolate log σ, diffusers' Euler interpolates σ itself; they differ by < 1e-4.
    torch.testing.assert_close(schedule.sampling_sigmas(steps, "linspace"), euler.sigmas.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("steps", [5, 25])
def test_karras_sigmas_match_diffusers(steps, schedule):
    ours = schedule.sampling_sigmas(steps, "karras")
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        theirs = cls(**SD, use_karras_sigmas=True, timestep_spacing="linspace")
        theirs.set_timesteps(steps)
        torch.testing.assert_close(ours, theirs.sigmas.double(), rtol=2e-5, atol=0)  # theirs: float32
    assert ours[0].item() == pytest.approx(schedule.sigma_max) and ours[-2].item() == pytest.approx(schedule.sigma_min)
    # Evenly spaced in σ^(1/ρ).
    root = karras_sigmas(steps, 0.1, 10.0, rho=7.0) ** (1 / 7)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(steps - 1))


def test_bad_spacing_and_steps_are_clear_errors(schedule):
    with pytest.raises(ConfigError, match="spacing"):
        schedule.sampling_sigmas(10, "cosine")
    with pytest.raises(ConfigError, match="steps"):
        schedule.sampling_sigmas(1001, "trailing")
    with pytest.raises(ConfigError, match="past the last training timestep"):
        schedule.sampling_sigmas(1000, "leading", steps_offset=1)


def test_schedule_config_is_validated():
    with pytest.raises(ConfigError, match="schedule.kind"):
        ScheduleConfig(kind="sigmoid")
    with pytest.raises(ConfigError, match="beta_start"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        ScheduleConfig(num_train_timesteps=1)
    cfg = apply_overrides(ScheduleConfig(), ["kind=cosine", "zero_terminal_snr=true"])
    assert cfg.kind == "cosine" and cfg.zero_terminal_snr
    assert NoiseSchedule.from_config(ScheduleConfig(num_train_timesteps=50)).num_train_timesteps == 50
