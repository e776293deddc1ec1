"""Classifier-free guidance as a denoiser wrapper."""
import pytest
import torch

from latentdiff.diffusion import Denoiser, NoiseSchedule
from latentdiff.diffusion.schedules import ScheduleConfig
from latentdiff.guidance import CFGDenoiser
from latentdiff.samplers import sample_euler


class RecordingNet:
    """eps = 0.5·x_vp + mean(context) per sample; records every call's batch."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, context_mask=None):
        self.calls.append({"x": x, "t": t, "context": context, "mask": context_mask})
        return 0.5 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.fixture()
def setup():
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    net = RecordingNet()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = {"context": torch.randn(2, 3, 6, generator=gen) + 1, "uncond_context": torch.zeros(1, 3, 6)}
    return schedule, net, Denoiser(net, schedule, "eps"), x, cond


def test_scale_one_is_the_plain_denoiser_in_one_unbatched_call(setup):
    schedule, net, denoiser, x, cond = setup
    out = CFGDenoiser(denoiser, 1.0)(x, torch.tensor([2.0, 3.0]), cond)
    assert len(net.calls) == 1 and net.calls[0]["x"].shape[0] == 2
    torch.testing.assert_close(out, denoiser(x, torch.tensor([2.0, 3.0]), {"context": cond["context"]}))


def test_both_halves_run_in_one_batched_call(setup):
    schedule, net, denoiser, x, cond = setup
    scale, sigma = 7.5, torch.tensor([2.0, 3.0])
    out = CFGDenoiser(denoiser, scale)(x, sigma, cond)
    assert len(net.calls) == 1
    call = net.calls[0]
    assert call["x"].shape[0] == 4
    assert torch.equal(call["context"][:2], cond["uncond_context"].expand(2, -1, -1))
    assert torch.equal(call["context"][2:], cond["context"])
    torch.testing.assert_close(call["t"][:2], call["t"][2:])
    plain = Denoiser(RecordingNet(), schedule, "eps")
    uncond = plain(x, sigma, {"context": cond["uncond_context"].expand(2, -1, -1)})
    conditional = plain(x, sigma, {"context": cond["context"]})
    torch.testing.assert_close(out, uncond + scale * (conditional - uncond))


def test_guiding_x0_equals_guiding_eps(setup):
    schedule, net, denoiser, x, cond = setup
    scale, sigma = 4.0, 3.0
    out = CFGDenoiser(denoiser, scale)(x, sigma, cond)
    x_vp = x / (1 + sigma ** 2) ** 0.5
    eps_u = 0.5 * x_vp + 0.0
    eps_c = 0.5 * x_vp + cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x - sigma * (eps_u + scale * (eps_c - eps_u)))


def test_the_negative_context_is_used(setup):
    schedule, net, denoiser, x, cond = setup
    guided = CFGDenoiser(denoiser, 5.0)
    a = guided(x, 2.0, cond)
    b = guided(x, 2.0, {**cond, "uncond_context": torch.full((1, 3, 6), 0.3)})
    # A larger unconditional output pushes the guided result the other way: by (scale - 1)·σ·Δε.
    torch.testing.assert_close(b - a, torch.full_like(a, 4 * 2.0 * 0.3))


def test_masks_and_extra_conditioning_reach_both_halves(setup):
    schedule, net, denoiser, x, cond = setup
    mask = torch.tensor([[True, True, False], [True, False, False]])
    seen = {}

    def spy(x, sigma, c):
        seen.update(c)
        return denoiser(x, sigma, c)

    CFGDenoiser(spy, 3.0)(x, 1.0, {**cond, "context_mask": mask, "pooled": torch.ones(2, 5)})
    assert torch.equal(net.calls[0]["mask"], torch.cat([torch.ones(2, 3, dtype=torch.bool), mask]))
    assert seen["pooled"].shape == (4, 5)
    assert "uncond_context" not in seen


def test_guided_sampling_runs(setup):
    schedule, net, denoiser, x, cond = setup
    sigmas = schedule.sampling_sigmas(4, "trailing", 0)
    out = sample_euler(CFGDenoiser(denoiser, 3.0), x * sigmas[0], sigmas, cond=cond)
    assert out.shape == x.shape and out.isfinite().all()
    assert len(net.calls) == 4 and all(c["x"].shape[0] == 4 for c in net.calls)


def test_a_loop_gets_the_same_text_tensors_at_every_step_until_they_change(setup):
    schedule, net, denoiser, x, cond = setup
    guided = CFGDenoiser(denoiser, 3.0)
    sample_euler(guided, x, schedule.sampling_sigmas(3), cond=cond)
    contexts = [call["context"] for call in net.calls]
    assert len(contexts) == 3 and all(c is contexts[0] for c in contexts)  # so the UNet can keep its projections
    cond["context"].add_(1.0)  # changed in place: made again
    guided(x, torch.tensor(2.0), cond)
    assert net.calls[-1]["context"] is not contexts[0]
    torch.testing.assert_close(net.calls[-1]["context"][2:], cond["context"])
    guided(x[:1], torch.tensor(2.0), {**cond, "context": cond["context"][:1]})  # another batch: made again
    assert net.calls[-1]["context"].shape[0] == 2
