"""Consistency and guidance distillation: the losses' mechanics on fake denoisers, and `latentdiff distill` end to
end on tiny stages (what the student records, how it samples, resume after a kill, bad input)."""
import dataclasses
from pathlib import Path

import pytest
import torch
from resume_check import kill_then_resume
from tiny_stages import TINY_TRAINING, save_stages

from latentdiff.cli import main
from latentdiff.config import apply_overrides, load_config
from latentdiff.diffusion import Denoiser, NoiseSchedule
from latentdiff.diffusion.consistency import consistency_distillation_loss, grid_levels, teacher_step
from latentdiff.diffusion.guidance_distillation import guidance_distillation_loss
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.guidance import CFGDenoiser
from latentdiff.models.unet import UNet
from latentdiff.pipeline import Text2ImagePipeline
from latentdiff.samplers import sample_euler
from latentdiff.train.distill import DistillConfig, distill

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())
PATTERN = torch.linspace(-1, 1, 4 * 4 * 4).reshape(1, 4, 4, 4).sin()


def fake_net(x, t, context, context_mask=None):
    """ε̂ as a fixed function of x_vp, t and the context: (B, 4, 4, 4)."""
    c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return 0.8 * x + 0.2 * (torch.as_tensor(t).view(-1, 1, 1, 1) / 1000) * PATTERN + 0.1 * c


def batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 4, 4, generator=g)
    cond = {"context": torch.randn(n, 5, 6, generator=g)}
    return z, cond, {**cond, "uncond_context": torch.zeros(1, 5, 6)}


def test_levels_cover_every_step_of_the_grid_and_never_its_end():
    grid = SCHEDULE.sampling_sigmas(5, "trailing")  # 6 sigmas, the last 0
    levels = grid_levels(grid, 2000, torch.Generator().manual_seed(0), grid)
    assert set(levels.tolist()) == {0, 1, 2, 3, 4}


def test_teacher_step_is_one_euler_step_of_the_ode():
    denoiser = Denoiser(fake_net, SCHEDULE, "eps")
    z, cond, _ = batch()
    sigmas = torch.tensor([3.0, 1.2, 0.0])
    sigma = torch.full((3,), 3.0)
    stepped = teacher_step(denoiser, z * 3, sigma, torch.full((3,), 1.2), cond)
    # the first of two Euler steps from σ = 3, stopped at σ = 1.2 (captured by the callback of step 2)
    seen = []
    sample_euler(denoiser, z * 3, sigmas, cond=cond, callback=seen.append)
    torch.testing.assert_close(stepped, seen[1]["x"])


def test_the_loss_is_zero_for_a_student_that_is_the_teacher_on_a_one_step_grid():
    """On a grid [σ_max, 0] the target is the teacher's own x0 (at σ = 0, D(x, 0) = x exactly)."""
    denoiser = Denoiser(fake_net, SCHEDULE, "eps")
    z, cond, teacher_cond = batch()
    grid = SCHEDULE.sampling_sigmas(1, "trailing")
    loss = consistency_distillation_loss(denoiser, CFGDenoiser(denoiser, 1.0), z, cond, teacher_cond, grid,
                                         torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    guided = consistency_distillation_loss(denoiser, CFGDenoiser(denoiser, 4.0), z, cond, teacher_cond, grid,
                                           torch.Generator().manual_seed(1))
    assert guided.item() > 1e-3  # the guided teacher lands elsewhere: that is what the student learns


def test_the_loss_is_zero_for_an_oracle_on_any_grid():
    """A denoiser that always returns the data latent is a perfect consistency function."""
    z, cond, teacher_cond = batch()
    oracle = lambda x, sigma, cond: z.clone()  # noqa: E731
    loss = consistency_distillation_loss(oracle, oracle, z, cond, teacher_cond, SCHEDULE.sampling_sigmas(8, "trailing"),
                                         torch.Generator().manual_seed(2))
    assert loss.item() == 0


def test_pseudo_huber_is_the_distance_less_c_per_sample():
    z, cond, teacher_cond = batch()
    offset = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1)
    student = lambda x, sigma, cond: z + offset  # noqa: E731  (the teacher's x0 is z: errors 0, 8, 16 in norm)
    oracle = lambda x, sigma, cond: z.clone()  # noqa: E731
    grid = SCHEDULE.sampling_sigmas(1, "trailing")
    huber = consistency_distillation_loss(student, oracle, z, cond, teacher_cond, grid, target=oracle, huber_c=0.5)
    norms = torch.tensor([0.0, 8.0, 16.0])  # sqrt(64 elements · offset²)
    assert huber.item() == pytest.approx(((norms ** 2 + 0.25).sqrt() - 0.5).mean().item(), rel=1e-6)
    mean_square = consistency_distillation_loss(student, oracle, z, cond, teacher_cond, grid, target=oracle)
    assert mean_square.item() == pytest.approx(5 / 3)


def test_the_gradient_flows_through_the_prediction_only():
    net = torch.nn.Conv2d(4, 4, 1)
    student = Denoiser(lambda x, t, context, context_mask=None: net(x), SCHEDULE, "eps")
    z, cond, teacher_cond = batch()
    teacher = Denoiser(fake_net, SCHEDULE, "eps")
    loss = consistency_distillation_loss(student, teacher, z, cond, teacher_cond, SCHEDULE.sampling_sigmas(4, "trailing"),
                                         torch.Generator().manual_seed(3))
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_guidance_distillation_is_the_eps_loss_against_the_guided_teacher():
    """The loss is |ε̂_student - (ε̂_u + w·(ε̂_c - ε̂_u))|² at x = z + σ(t)·ε (t, then ε drawn)."""
    net = torch.nn.Conv2d(4, 4, 1)
    student_net = lambda x, t, context, context_mask=None: net(x)  # noqa: E731
    student, teacher = Denoiser(student_net, SCHEDULE, "eps"), Denoiser(fake_net, SCHEDULE, "eps")
    z, cond, teacher_cond = batch()
    loss = guidance_distillation_loss(student, CFGDenoiser(teacher, 4.0), z, cond, teacher_cond, SCHEDULE,
                                      torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(1000, (3,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    sigma = SCHEDULE.t_to_sigma(t).float().view(-1, 1, 1, 1)
    x_vp = (z + sigma * noise) * (1 + sigma ** 2).rsqrt()
    eps_c = fake_net(x_vp, t, cond["context"])
    eps_u = fake_net(x_vp, t, torch.zeros_like(cond["context"]))
    wanted = eps_u + 4.0 * (eps_c - eps_u)
    with torch.no_grad():
        expected = (net(x_vp) - wanted).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert net.weight.grad.abs().sum() > 0


def test_guidance_distillation_is_zero_for_the_guided_teacher_and_at_guidance_one_for_the_teacher():
    teacher = Denoiser(fake_net, SCHEDULE, "eps")
    z, cond, teacher_cond = batch()
    guided = CFGDenoiser(teacher, 3.0)
    g = torch.Generator().manual_seed(0)
    assert guidance_distillation_loss(lambda x, s, c: guided(x, s, teacher_cond), guided, z, cond, teacher_cond,
                                      SCHEDULE, g).item() < 1e-10
    assert guidance_distillation_loss(teacher, CFGDenoiser(teacher, 1.0), z, cond, teacher_cond, SCHEDULE, g) == 0
    assert guidance_distillation_loss(teacher, guided, z, cond, teacher_cond, SCHEDULE, g) > 1e-4


# ---------------------------------------------------------------------------------------------
# latentdiff distill on tiny stages
# ---------------------------------------------------------------------------------------------

TINY_DISTILL = [o for o in TINY_TRAINING if not o.startswith(("model.", "sampling."))] + ["grid_steps=5"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_stages(tmp_path_factory.mktemp("distill"))


def tiny_config(stages, *extra):
    return apply_overrides(DistillConfig(), TINY_DISTILL + [f"teacher={stages['unet']}", *extra])


def test_student_records_its_teacher_and_samples_in_few_steps_without_guidance(stages, tmp_path):
    out = tmp_path / "student"
    results = distill(tiny_config(stages, "guidance_scale=3", f"cache_dir={tmp_path / 'cache'}"), out)
    assert results["train_minutes"] >= 0
    student, teacher = UNet.from_pretrained(out), UNet.from_pretrained(stages["unet"])
    meta = student.identity.metadata
    assert meta["distilled_from"] == {"teacher": str(stages["unet"]), "weights_hash": teacher.identity.weights_hash,
                                      "method": "consistency", "guidance_scale": 3.0, "grid_steps": 5}
    assert meta["sampling"] == {"sampler": "lcm", "steps": 4, "guidance_scale": 1.0, "spacing": "trailing",
                                "steps_offset": 1}
    assert student.config == teacher.config
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    pipe = Text2ImagePipeline.from_pretrained(out)  # the teacher's stages, found from the student's folder
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    images = pipe(["a red circle", "a blue square"], seed=0, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and images.isfinite().all()
    assert calls == [2, 2, 2, 2]  # 4 steps, one unguided call each
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["preview-0000003.png", "preview-0000006.png"]


def test_a_guidance_student_samples_as_its_teacher_does_in_one_call_per_step(stages, tmp_path):
    out = tmp_path / "student"
    distill(tiny_config(stages, "method=guidance", "guidance_scale=3", f"cache_dir={tmp_path / 'cache'}"), out)
    teacher = Text2ImagePipeline.from_pretrained(stages["unet"])
    meta = UNet.from_pretrained(out).identity.metadata
    assert meta["distilled_from"] == {"teacher": str(stages["unet"]), "method": "guidance", "guidance_scale": 3.0,
                                      "weights_hash": teacher.unet.identity.weights_hash}
    assert teacher.sampling.guidance_scale > 1
    assert meta["sampling"] == {**dataclasses.asdict(teacher.sampling), "guidance_scale": 1.0}
    pipe = Text2ImagePipeline.from_pretrained(out)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    images = pipe(["a red circle", "a blue square"], seed=0, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and images.isfinite().all()
    assert calls == [2] * teacher.sampling.steps  # the teacher's steps, one unguided call each


def test_killed_distillation_resumes_to_the_same_weights(stages, tmp_path, monkeypatch):
    cfg = tiny_config(stages, f"cache_dir={tmp_path / 'cache'}")
    distill(cfg, tmp_path / "straight")
    kill_then_resume(distill, cfg, tmp_path / "killed", monkeypatch)
    straight, resumed = UNet.from_pretrained(tmp_path / "straight"), UNet.from_pretrained(tmp_path / "killed")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_cli_distills_and_refuses_a_missing_teacher(stages, tmp_path, capsys):
    assert main(["distill", "--out", str(tmp_path / "a"), *TINY_DISTILL]) == 2
    assert "distill needs the trained teacher: --teacher DIR" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["distill", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b"), *TINY_DISTILL]) == 2
    assert "nowhere" in capsys.readouterr().err
    code = main(["distill", "--teacher", str(stages["unet"]), "--out", str(tmp_path / "c"), "--steps", "2",
                 *TINY_DISTILL, f"cache_dir={tmp_path / 'cache'}"])
    assert code == 0 and UNet.from_pretrained(tmp_path / "c").identity.metadata["step"] == 2


def test_an_ema_target_makes_the_targets_and_resumes_exactly(stages, tmp_path, monkeypatch):
    cfg = tiny_config(stages, "ema_target=true", "train.ema_decay=0.5", f"cache_dir={tmp_path / 'cache'}")
    distill(cfg, tmp_path / "straight")
    kill_then_resume(distill, cfg, tmp_path / "killed", monkeypatch)
    straight, resumed = UNet.from_pretrained(tmp_path / "straight"), UNet.from_pretrained(tmp_path / "killed")
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in straight.state_dict().items())
    distill(tiny_config(stages, "train.ema_decay=0.5", f"cache_dir={tmp_path / 'cache'}"), tmp_path / "own")
    own = UNet.from_pretrained(tmp_path / "own")
    assert any(not torch.equal(own.state_dict()[k], v) for k, v in straight.state_dict().items())


def test_bad_settings_are_refused_by_name():
    with pytest.raises(Exception, match="grid_steps: must be at least 1"):
        DistillConfig(grid_steps=0)
    with pytest.raises(Exception, match="guidance_scale: must be at least 0"):
        DistillConfig(guidance_scale=-1)
    with pytest.raises(Exception, match="ema_target: needs train.ema_decay > 0"):
        apply_overrides(DistillConfig(), ["ema_target=true", "train.ema_decay=0"])
    with pytest.raises(Exception, match="method: 'lcm' is not one of"):
        DistillConfig(method="lcm")
    with pytest.raises(Exception, match="ema_target, huber_c: consistency distillation only, not method='guidance'"):
        DistillConfig(method="guidance", huber_c=0.1)


def test_shapes_preset_file_is_the_dataclass_defaults():
    preset = Path(__file__).resolve().parent.parent / "configs" / "distill" / "shapes.yaml"
    assert load_config(DistillConfig, preset) == DistillConfig()


def test_a_student_exports_to_diffusers_with_its_lcm_scheduler_and_back(stages, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from latentdiff.convert.diffusers_format import load_diffusers, save_diffusers

    distill(tiny_config(stages, "train.steps=2", f"cache_dir={tmp_path / 'cache'}"), tmp_path / "student")
    pipe = Text2ImagePipeline.from_pretrained(tmp_path / "student")
    save_diffusers(pipe, tmp_path / "diffusers")
    theirs = StableDiffusionPipeline.from_pretrained(str(tmp_path / "diffusers"), safety_checker=None,
                                                     requires_safety_checker=False)
    assert isinstance(theirs.scheduler, LCMScheduler) and theirs.scheduler.config.clip_sample is False
    back = load_diffusers(tmp_path / "diffusers")
    assert (back.sampling.sampler, back.sampling.spacing) == ("lcm", "trailing")
