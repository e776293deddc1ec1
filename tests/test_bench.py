"""`latentdiff bench`: both UNets get the same weights and inputs, the report holds what it says, and
`--all` produces every row of its table with finite numbers (tiny stages, one timed call each)."""
import dataclasses
import math
import re
import sys

import pytest
import torch
from tiny_stages import TINY_AE, TINY_TEXT, TINY_UNET

from latentdiff.cli import main
from latentdiff.config import apply_overrides
from latentdiff.eval import bench, bench_stages
from latentdiff.eval.bench import BenchCase
from latentdiff.eval.bench_timing import count_flops
from latentdiff.eval.bench_unet import bench_unet, diffusers_twin, unet_for_bench
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.train.autoencoder import AutoencoderTrainingConfig
from latentdiff.train.diffusion import DiffusionTrainingConfig
from latentdiff.train.text_encoder import TextEncoderTrainingConfig

TINY = BenchCase(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                            num_heads=2, context_dim=8, norm_groups=4), latent_size=8, context_length=5, batch=2)
STUDENTS = ("generation, consistency student", "generation, guidance student")
ROWS = ("GEMM peak float32", "GEMM peak bfloat16", "autoencoder train step", "text encoder train step",
        "UNet train step", "UNet forward", "VAE decode", "generation", "generation, padding hidden as trained here",
        *STUDENTS)
TWINS = ("UNet train step", "UNet forward", "VAE decode", "generation")


@pytest.mark.parametrize("backward", [False, True])
def test_bench_times_both_models_on_the_same_weights(backward):
    report = bench_unet(TINY, repeats=2, backward=backward)
    assert report["latentdiff_seconds"] > 0 and report["diffusers_seconds"] > 0
    assert report["ratio"] == pytest.approx(report["latentdiff_seconds"] / report["diffusers_seconds"])
    assert report["max_abs_diff"] < 1e-4
    assert report["parameters"] == sum(p.numel() for p in UNet(TINY.unet).parameters())
    assert report["latentdiff_flops"] == report["diffusers_flops"] > 0  # the same arithmetic, counted alike


def test_twin_outputs_are_not_trivially_zero():
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


def test_flops_are_counted_for_a_linear_layer_and_cpu_attention():
    linear = torch.nn.Linear(8, 16)
    assert count_flops(lambda: linear(torch.randn(3, 8)))[0] == 2 * 3 * 8 * 16
    q = torch.randn(2, 4, 10, 8, requires_grad=True)  # (B, heads, L, head width)
    flops, out = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 4 * 10 * 10 * 8)  # Q K^T and A V
    # backward: Q K^T again, then the gradients of Q, K, V and the attention weights: five products
    assert count_flops(lambda: out.sum().backward())[0] == 5 * flops // 2


def tiny_workload() -> bench_stages.Workload:
    autoencoder = apply_overrides(AutoencoderTrainingConfig(), {"train.batch_size": 2, "data.size": 16})
    text = apply_overrides(TextEncoderTrainingConfig(), {"train.batch_size": 4, "data.size": 16})
    return bench_stages.Workload(dataclasses.replace(autoencoder, model=TINY_AE),
                                 dataclasses.replace(text, model=TINY_TEXT),
                                 apply_overrides(DiffusionTrainingConfig(), TINY_UNET + ["data.size=16"]),
                                 generation_batch=2, steps=3)


def tiny_case() -> BenchCase:
    return BenchCase(tiny_workload().diffusion.model, latent_size=8, context_length=16, batch=2)


def test_bench_all_times_every_row_and_the_twins_agree():
    table = bench_stages.bench_all(tiny_workload(), tiny_case(), repeats=1, gemm_size=64)
    assert [row.name.split(" (")[0] for row in table.peaks + table.rows] == list(ROWS)
    assert "ours: 4 steps lcm, no guidance; diffusers: 3 steps dpmpp_2m, cfg 5" in table.rows[-2].name
    teacher = tiny_workload().diffusion.sampling  # the guidance student samples as its teacher, unguided
    assert f"ours: {teacher.steps} steps {teacher.sampler}, no guidance;" in table.rows[-1].name
    for row in table.peaks + table.rows:
        implementations = ("latentdiff", "diffusers") if row.name.startswith(TWINS) else ("latentdiff",)
        assert tuple(row.seconds) == tuple(row.flops) == implementations, row
        for name in implementations:
            assert math.isfinite(row.gflops_per_second(name)) and row.seconds[name] > 0 and row.flops[name] > 0, row
        if row.name.startswith((*STUDENTS, "generation, padding")):  # not diffusers' images
            assert row.max_diff is None, row
        if row.name.startswith("generation"):
            if not row.name.startswith(STUDENTS):  # at the same settings: the text projected once per call
                assert row.flops["latentdiff"] < row.flops["diffusers"], row
        elif row.ratio is not None:
            assert math.isfinite(row.ratio) and row.max_diff < 1e-3, row  # same weights, same noise: same outputs
    assert table.rows[-4].max_diff < 1e-3  # generation at diffusers' own settings: diffusers' images
    assert table.peak.name == "GEMM peak float32" and table.peak.flops["latentdiff"] == 2 * 64 ** 3
    text = bench_stages.format_table(table)
    assert all(f"| {name}" in text for name in ROWS) and not re.search(r"\b(nan|inf)\b", text)


def test_bench_all_cli_without_diffusers_times_ours_alone(monkeypatch, capsys):
    monkeypatch.setattr(bench_stages, "shapes_workload", tiny_workload)
    monkeypatch.setitem(bench.PRESETS, "shapes", tiny_case)
    monkeypatch.setattr(bench_stages, "GEMM_SIZE", 64)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert main(["bench", "--all", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {name}" in out for name in ROWS) and "diffusers is not installed" in out
    assert "| UNet forward | 2 |" in out and "| - | - |" in out


def test_an_emulated_gemm_peak_is_timed_once(monkeypatch):
    """bf16 on an AVX2 CPU takes about a minute per 2048² product: one timed call says enough."""
    from latentdiff.eval import bench_timing

    calls = []
    monkeypatch.setattr(bench_timing, "seconds", lambda call, device: calls.append(call) or 60.0)
    best, flops = bench_timing.gemm_peak(torch.float32, torch.device("cpu"), repeats=5, size=8)
    assert (best, flops, len(calls)) == (60.0, 2 * 8 ** 3, 1)
