"""`latentdiff bench`: our models against diffusers' with the same weights, timed side by side.

    latentdiff bench [--preset shapes|sd15] [--batch N] [--repeats N] [--backward] [--device cpu|cuda] [--dtype ...]
    latentdiff bench --all [--repeats N] [--device ...] [--dtype ...]

Both implementations run in one process on the same inputs, alternating call by call, so a busy machine
slows both alike. Without --all: the UNet alone (bench_unet.py), with the median time per call, the ratio,
the largest output difference (the weights are ours, mapped by the diffusers converter) and, on CUDA, the
peak memory of each. With --all: one table of where the time goes (bench_stages.py), from a GEMM peak
measured first to the training steps of the three stages and end-to-end generation, each row with its
achieved GFLOP/s and that as a share of the peak. diffusers is a test-only dependency: without it only
ours is timed. Timings are printed, never asserted.

This module defines the flags without importing torch, so that `latentdiff bench --help` answers at once.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..models.unet import UNetConfig


@dataclass(frozen=True)
class BenchCase:
    unet: UNetConfig
    latent_size: int      # latent height = width
    context_length: int   # text tokens
    batch: int            # default batch


def shapes_case() -> BenchCase:
    """The UNet the shapes preset trains, at its training batch."""
    from ..train.diffusion import DiffusionTrainingConfig

    cfg = DiffusionTrainingConfig()
    return BenchCase(cfg.model, 8, 24, cfg.train.batch_size)


def sd15_case() -> BenchCase:
    from ..models.unet import UNetConfig

    return BenchCase(UNetConfig(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                                attention_levels=(0, 1, 2), num_heads=8, context_dim=768), 64, 77, 1)


PRESETS: dict[str, Callable[[], BenchCase]] = {"shapes": shapes_case, "sd15": sd15_case}
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true",
                        help="one table of where the time goes: GEMM peak, the three stages' training steps, "
                             "UNet forward, VAE decode and end-to-end generation (the shapes presets)")
    parser.add_argument("--preset", default="shapes", help=f"UNet to time: {', '.join(PRESETS)} (default: %(default)s)")
    parser.add_argument("--batch", type=int, help="UNet batch size (default: 64 for shapes, 1 for sd15)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model (default: %(default)s)")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (a training step); --all times both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help=f"{', '.join(DTYPES)} (default: %(default)s)")


def run_bench(args: argparse.Namespace):
    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    if args.repeats < 1 or (args.batch is not None and args.batch < 1):
        raise ConfigError("--repeats and --batch must be at least 1")
    import torch

    dtype = getattr(torch, args.dtype)
    if args.all:
        from . import bench_stages

        table = bench_stages.bench_all(bench_stages.shapes_workload(), PRESETS[args.preset](), args.batch,
                                       args.repeats, args.device, dtype)
        print(bench_stages.format_table(table))
        return table
    from .bench_unet import bench_unet, format_report

    report = bench_unet(PRESETS[args.preset](), args.batch, args.repeats, args.backward, args.device, dtype)
    print(format_report(report))
    return report
