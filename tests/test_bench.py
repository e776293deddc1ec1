"""`latentdiff bench`: both UNets get the same weights and inputs, and the report holds what it says."""
import pytest

from latentdiff.cli import main
from latentdiff.eval.bench import BenchCase, bench_unet, diffusers_twin, unet_for_bench
from latentdiff.models.unet import UNet, UNetConfig

TINY = BenchCase(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                            num_heads=2, context_dim=8, norm_groups=4), latent_size=8, context_length=5, batch=2)


@pytest.mark.parametrize("backward", [False, True])
def test_bench_times_both_models_on_the_same_weights(backward):
    report = bench_unet(TINY, repeats=2, backward=backward)
    assert report["latentdiff_seconds"] > 0 and report["diffusers_seconds"] > 0
    assert report["ratio"] == pytest.approx(report["latentdiff_seconds"] / report["diffusers_seconds"])
    assert report["max_abs_diff"] < 1e-4
    assert report["parameters"] == sum(p.numel() for p in UNet(TINY.unet).parameters())


def test_twin_outputs_are_not_trivially_zero():
    import torch

    torch.manual_seed(0)
    unet = unet_for_bench(TINY.unet)
    twin = diffusers_twin(unet, TINY.latent_size)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 8)
    with torch.no_grad():
        ours, theirs = unet(x, t, ctx), twin(x, t, ctx).sample
    assert ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_bench_cli_prints_the_report_and_refuses_bad_flags(capsys):
    assert main(["bench", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "latentdiff / diffusers" in out and "ms" in out
    assert main(["bench", "--preset", "sd99"]) == 2
    assert "--preset 'sd99'" in capsys.readouterr().err
