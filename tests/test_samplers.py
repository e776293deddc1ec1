"""Samplers and the Denoiser: one contract test over every registered sampler, and parity with diffusers.

The network is a fake: a fixed affine function of its input, its timestep and its context, so every step's
output depends on all three and both sides of a comparison can call the very same function.
"""
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from latentdiff.config import apply_overrides
from latentdiff.diffusion import Denoiser, NoiseSchedule
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.errors import ConfigError
from latentdiff.samplers import (
    SAMPLERS,
    SamplingConfig,
    initial_latent,
    randn_per_sample,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
)
from latentdiff.train.diffusion import DiffusionTrainingConfig

SHAPE = (1, 4, 8, 8)
STEPS = 10
PATTERN = torch.linspace(-1, 1, 4 * 8 * 8, dtype=torch.float64).reshape(1, 4, 8, 8).sin()


def fake_net(x, t, context, context_mask=None):
    """A fixed affine map: (B, C, H, W) from x_vp (B, C, H, W), t (B,) or scalar, context (B, L, D)."""
    t = torch.as_tensor(t).to(x.dtype).reshape(-1, 1, 1, 1)
    c = context.to(x.dtype).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return 0.9 * x + 0.1 * (t / 1000) * PATTERN.to(x.dtype) + 0.05 * c


def context_for(batch, dtype=torch.float32):
    return torch.linspace(-1, 1, batch * 3 * 5, dtype=dtype).reshape(batch, 3, 5)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


# ---------------------------------------------------------------------------------------------
# The contract every sampler keeps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_image(name, schedule):
    sigmas = schedule.sampling_sigmas(6, "leading")
    denoiser = Denoiser(fake_net, schedule, "eps")

    def run():
        x = initial_latent((2, 4, 8, 8), sigmas, seeds(3, 4))
        return SAMPLERS[name](denoiser, x, sigmas, cond={"context": context_for(2)}, generator=seeds(3, 4))

    a, b = run(), run()
    assert torch.equal(a, b)
    assert a.isfinite().all() and a.abs().max() > 0.1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_image_depends_on_its_seed_not_its_batch(name, schedule):
    sigmas = schedule.sampling_sigmas(6, "trailing", 0)
    denoiser = Denoiser(fake_net, schedule, "v")
    context = context_for(3)
    x = initial_latent((3, 4, 8, 8), sigmas, seeds(10, 11, 12))
    batch = SAMPLERS[name](denoiser, x, sigmas, cond={"context": context}, generator=seeds(10, 11, 12))
    x_alone = initial_latent((1, 4, 8, 8), sigmas, seeds(11))
    assert torch.equal(x_alone, x[1:2])
    alone = SAMPLERS[name](denoiser, x_alone, sigmas, cond={"context": context[1:2]}, generator=seeds(11))
    torch.testing.assert_close(alone, batch[1:2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("spacing", ["leading", "karras"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_oracle_denoiser_recovers_x0(name, spacing, schedule):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = schedule.sampling_sigmas(8, spacing)
    x = initial_latent(x0.shape, sigmas, seeds(1, 2), dtype=torch.float64)
    steps = []
    out = SAMPLERS[name](lambda x, sigma, cond: x0.clone(), x, sigmas, cond={}, generator=seeds(1, 2),
                         callback=steps.append)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    assert [s["i"] for s in steps] == list(range(8))
    assert [s["sigma"].item() for s in steps] == pytest.approx(sigmas[:-1].tolist())
    assert all(s["denoised"] is not None and s["x"].shape == x0.shape for s in steps)


def test_one_generator_per_sample_is_required():
    with pytest.raises(ValueError, match="one per sample"):
        randn_per_sample((2, 4), seeds(0))


def test_initial_latent_has_the_std_of_x0_plus_sigma_noise(schedule):
    sigmas = schedule.sampling_sigmas(10, "trailing", 0)
    x = initial_latent((4, 4, 32, 32), sigmas, seeds(0, 1, 2, 3))
    expected = math.sqrt(1 + schedule.sigma_max ** 2)
    assert x.std().item() == pytest.approx(expected, rel=0.03)


# The sampler family, in sigma space: DDIM(η=1) is the DDPM posterior and the Euler-ancestral step;
# DDIM(η=0) is the Euler step. Kept as separate implementations, they must agree.

def test_ddim_eta1_equals_ddpm_and_euler_ancestral(schedule):
    sigmas = schedule.sampling_sigmas(7, "leading").double()
    denoiser = Denoiser(fake_net, schedule, "eps")
    cond = {"context": context_for(2, torch.float64)}
    x = initial_latent((2, 4, 8, 8), sigmas, seeds(5, 6), dtype=torch.float64)
    ddim = sample_ddim(denoiser, x, sigmas, cond=cond, generator=seeds(7, 8), eta=1.0)
    ddpm = sample_ddpm(denoiser, x, sigmas, cond=cond, generator=seeds(7, 8))
    euler_a = sample_euler_ancestral(denoiser, x, sigmas, cond=cond, generator=seeds(7, 8))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)
    torch.testing.assert_close(ddim, euler_a, rtol=1e-10, atol=1e-10)
    deterministic = sample_ddim(denoiser, x, sigmas, cond=cond)
    torch.testing.assert_close(deterministic, sample_euler(denoiser, x, sigmas, cond=cond), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The Denoiser: prediction types, scaling, timesteps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_denoiser_turns_an_exact_prediction_into_x0(prediction, schedule):
    """A net that predicts exactly (from the true x0 and ε) must give back x0 for every σ."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 3, 4, 4, generator=gen, dtype=torch.float64)
    seen = {}

    def oracle_net(x_vp, t, context, context_mask=None):
        seen.update(t=t, x_vp=x_vp, mask=context_mask)
        alpha_bar = 1 / (1 + schedule.t_to_sigma(t) ** 2).view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]

    denoiser = Denoiser(oracle_net, schedule, prediction)
    sigma = torch.tensor([0.05, 9.0], dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = denoiser(x, sigma, {"context": torch.zeros(2, 5, 8), "context_mask": mask})
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(seen["x_vp"], x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt())
    torch.testing.assert_close(schedule.t_to_sigma(seen["t"]), sigma)
    assert seen["mask"] is mask


def test_a_self_conditioned_denoiser_gives_back_its_last_x0_within_one_run(schedule):
    seen = []

    def net(x_vp, t, context, context_mask=None, x0_estimate=None):
        seen.append(x0_estimate)
        return 0.5 * x_vp

    shared = Denoiser(net, schedule, "eps", self_condition=True)
    run = shared.fresh()
    assert run is not shared
    x, cond = torch.randn(2, 4, 8, 8), {"context": torch.zeros(2, 3, 5)}
    first = run(x, 3.0, cond)
    run(x, 2.0, cond)
    assert seen[0] is None and seen[1] is first  # zeros (None) on the first call, then the last x0
    run(x[:1], 1.0, {"context": torch.zeros(1, 3, 5)})
    assert seen[2] is None  # no estimate of another batch's shape
    shared.fresh()(x, 3.0, cond)
    assert seen[3] is None  # a new run starts afresh
    plain = Denoiser(lambda x_vp, t, context, context_mask=None: 0.5 * x_vp, schedule, "eps")
    assert plain.fresh() is plain and plain(x, 3.0, cond).shape == x.shape  # no x0_estimate passed


def test_denoiser_never_clips_x0(schedule):
    denoiser = Denoiser(lambda x, t, c, context_mask=None: torch.full_like(x, 7.0), schedule, "x0")
    out = denoiser(torch.zeros(1, 4, 2, 2), 3.0, {"context": torch.zeros(1, 2, 3)})
    assert torch.all(out == 7.0)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------
# diffusers runs DDPM, DDIM and DPM-Solver on the VP latent x_vp (the model sees x_vp as is) and Euler,
# Euler-a and Heun on the sigma-space latent x (the model sees scale_model_input(x) = x / sqrt(1 + σ²)).
# Both sides start from the same sigma-space latent, converted to VP where needed, and are given the same
# sigmas: the ones diffusers computes (their spacing is tested against ours in test_schedules.py).
# Noise: batch 1, and a generator seeded the same on both sides. diffusers draws its step noise with
# randn(1, C, H, W) from it and ours draws randn(C, H, W) from generator[0] — the same numbers in the same
# order. Each side draws once per step and only for step noise (the start latent comes from elsewhere);
# diffusers also draws on the last step, where the noise is multiplied by 0 and nothing is drawn after.

DIFFUSERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,
}
SIGMA_SPACE = {"euler", "euler_a", "heun"}


def diffusers_scheduler(name, prediction, spacing, **extra):
    kwargs = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction], **extra)
    if spacing == "karras":
        kwargs.update(use_karras_sigmas=True, timestep_spacing="linspace")
    else:
        kwargs.update(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    if name in ("ddpm", "ddim"):
        kwargs.update(clip_sample=False, thresholding=False)
    if name == "ddim":
        kwargs.update(set_alpha_to_one=True)  # the last step lands on σ = 0, as ours do
    if name == "dpmpp_2m":
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    if name == "unipc":
        kwargs.update(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                      final_sigmas_type="zero")
    if name == "lcm":
        # LCM's boundary scalings c_skip = 0.25/((t·s)² + 0.25), c_out ≈ 1 - c_skip are ours (1 and 0 except at
        # σ = 0, which an ε Denoiser meets exactly) as the timestep scaling s grows; its steps come from its own
        # 50-step grid, and both sides walk diffusers' timesteps here
        kwargs.update(timestep_scaling=1e5)
    sched = DIFFUSERS[name](**kwargs)
    sched.set_timesteps(STEPS)
    return sched


def diffusers_sigmas(name, sched):
    """The sigma sequence, ending with 0, that diffusers' loop walks through."""
    if name in ("ddpm", "ddim", "lcm"):
        alpha_bar = sched.alphas_cumprod.double()[sched.timesteps]
        sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
        return torch.cat([sigmas, sigmas.new_zeros(1)])
    if name == "heun":
        sigmas = sched.sigmas.double()  # (2N,): s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0 (inner ones twice, for stage 2)
        return torch.cat([sigmas[0:-1:2], sigmas[-1:]])
    return sched.sigmas.double().clone()


def run_diffusers(name, sched, x, sigma_max, context, generator, eta):
    vp = name not in SIGMA_SPACE
    if vp:
        x = x / math.sqrt(1 + sigma_max ** 2)
    for t in sched.timesteps:
        model_in = x if vp else sched.scale_model_input(x, t)
        out = fake_net(model_in, t, context)
        extra = {"eta": eta} if name == "ddim" else {}
        if name in ("ddpm", "ddim", "euler_a", "lcm"):
            extra["generator"] = generator
        x = sched.step(out, t, x, **extra).prev_sample
    return x  # σ = 0 at the end, where VP and sigma space coincide


KARRAS = ("euler", "heun", "dpmpp_2m", "unipc")  # the diffusers schedulers that offer Karras sigmas
PARITY = [(name, options, prediction, spacing)
          for name, options in [(name, {}) for name in sorted(SAMPLERS)] + [("ddim", {"eta": 0.7})]
          for prediction in ("eps", "v")
          for spacing in ("leading", "trailing") + (("karras",) if name in KARRAS else ())]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,options,prediction,spacing", PARITY,
                         ids=["-".join([n + str(o.get("eta", "")), p, s]) for n, o, p, s in PARITY])
def test_matches_diffusers(name, options, prediction, spacing, dtype, schedule):
    check_parity(name, options, prediction, spacing, dtype, schedule)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
def test_matches_diffusers_with_zero_terminal_snr(name, dtype):
    """Both clamp ᾱ_T to 2**-24, so the first step starts at σ ≈ 4096 (the schedulers diffusers clamps in)."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(zero_terminal_snr=True))
    check_parity(name, {}, "v", "trailing", dtype, schedule, rescale_betas_zero_snr=True)


def check_parity(name, options, prediction, spacing, dtype, schedule, **diffusers_options):
    sched = diffusers_scheduler(name, prediction, spacing, **diffusers_options)
    sigmas = diffusers_sigmas(name, sched)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0].item()
    x = x.to(dtype)
    context = context_for(1, dtype)

    net = fake_net
    if name in ("dpmpp_2m", "unipc") and spacing == "karras":
        # diffusers' DPM-Solver and UniPC round the timesteps they give the model for Karras sigmas (not the sigmas
        # they step with); ours gives the exact continuous t. Rounding inside the net puts both on the same t.
        def net(x, t, context, context_mask=None):
            return fake_net(x, t.round(), context)

    ours = SAMPLERS[name](Denoiser(net, schedule, prediction), x, sigmas.to(dtype), cond={"context": context},
                          generator=seeds(42), **options)
    theirs = run_diffusers(name, sched, x, sigmas[0].item(), context, torch.Generator().manual_seed(42),
                           options.get("eta", 0.0))
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs.to(dtype), rtol=1e-5, atol=1e-5)


def test_a_sampler_added_to_the_registry_is_accepted_by_the_config_check(monkeypatch):
    with pytest.raises(ConfigError, match="sampling.sampler: unknown sampler 'my_euler'"):
        SamplingConfig(sampler="my_euler")
    monkeypatch.setitem(SAMPLERS, "my_euler", sample_euler)  # the only edit a new sampler needs
    assert SamplingConfig(sampler="my_euler").sampler == "my_euler"
    cfg = apply_overrides(DiffusionTrainingConfig(), ["sampling.sampler=my_euler"])
    assert cfg.sampling.sampler == "my_euler"
