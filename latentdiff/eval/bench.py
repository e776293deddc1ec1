"""`latentdiff bench`: our UNet and diffusers' UNet2DConditionModel, same weights, timed side by side.

    latentdiff bench [--preset shapes|sd15] [--batch N] [--repeats N] [--backward] [--device cpu|cuda] [--dtype ...]

Both models run in one process on the same inputs, alternating call by call, so a busy machine slows
both alike; the report gives the median time per call, the ratio, the largest output difference (the
weights are ours, mapped by the diffusers converter) and, on CUDA, the peak memory of each. diffusers
is a test-only dependency: without it only our UNet is timed. Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from ..models.unet import UNet, UNetConfig
from ..train.diffusion import DiffusionTrainingConfig


@dataclass(frozen=True)
class BenchCase:
    unet: UNetConfig
    latent_size: int      # latent height = width
    context_length: int   # text tokens
    batch: int            # default batch


PRESETS: dict[str, Callable[[], BenchCase]] = {
    "shapes": lambda: BenchCase(DiffusionTrainingConfig().model, 8, 24, 64),
    "sd15": lambda: BenchCase(UNetConfig(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                                         attention_levels=(0, 1, 2), num_heads=8, context_dim=768), 64, 77, 1),
}


def diffusers_twin(unet: UNet, latent_size: int) -> torch.nn.Module | None:
    """diffusers' UNet2DConditionModel holding `unet`'s weights (None when diffusers is not installed)."""
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        return None
    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() concerns pretrained loading
    from ..convert.unet_keys import unet_config_to_diffusers, unet_to_diffusers

    config = {k: v for k, v in unet_config_to_diffusers(unet.config, latent_size).items() if not k.startswith("_")}
    twin = UNet2DConditionModel(**config)
    twin.load_state_dict(unet_to_diffusers(unet.state_dict(), unet.config), strict=True)
    return twin


def unet_for_bench(cfg: UNetConfig) -> UNet:
    """A fresh UNet whose zero-initialised layers are made random too: zeros would make every output 0
    and hide any difference between the two implementations."""
    unet = UNet(cfg)
    for p in unet.parameters():
        if not p.detach().any():
            p.data.normal_(0, 0.02)
    return unet


def _seconds(call: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_unet(case: BenchCase, batch: int | None = None, repeats: int = 5, backward: bool = False,
               device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Median seconds per call of ours and diffusers' UNet (forward, or forward + backward), their
    ratio, the largest output difference, and CUDA peak memory. One warm-up call each first."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    batch = batch or case.batch
    ours = unet_for_bench(case.unet)
    twin = diffusers_twin(ours, case.latent_size)
    models = {"latentdiff": ours, **({"diffusers": twin} if twin is not None else {})}
    for model in models.values():
        model.to(dev, dtype).train(backward)
    x = torch.randn(batch, case.unet.in_channels, case.latent_size, case.latent_size, device=dev, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=dev)
    context = torch.randn(batch, case.context_length, case.unet.context_dim, device=dev, dtype=dtype)

    def call(name: str) -> Callable[[], torch.Tensor]:
        model = models[name]
        run = (lambda: model(x, t, context)) if name == "latentdiff" else (lambda: model(x, t, context).sample)

        def step() -> torch.Tensor:
            if not backward:
                with torch.no_grad():
                    return run()
            out = run()
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            return out.detach()
        return step

    outputs = {name: call(name)() for name in models}  # warm-up, and the outputs to compare
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name in models:  # alternate, so both see the same machine
            times[name].append(_seconds(call(name), dev))
    report = {"batch": batch, "latent_size": case.latent_size, "backward": backward, "device": device,
              "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
              "parameters": sum(p.numel() for p in ours.parameters())}
    for name in models:
        report[f"{name}_seconds"] = statistics.median(times[name])
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            call(name)()
            report[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    if twin is not None:
        report["ratio"] = report["latentdiff_seconds"] / report["diffusers_seconds"]
        report["max_abs_diff"] = (outputs["latentdiff"].float() - outputs["diffusers"].float()).abs().max().item()
    return report


def format_report(report: dict) -> str:
    what = "forward + backward" if report["backward"] else "forward"
    lines = [f"UNet {report['parameters'] / 1e6:.1f}M parameters, {what}, batch {report['batch']} at "
             f"{report['latent_size']}x{report['latent_size']} latents, {report['device']} {report['dtype']}, "
             f"median of {report['repeats']}:"]
    for name in ("latentdiff", "diffusers"):
        if f"{name}_seconds" in report:
            memory = f", peak {report[f'{name}_peak_mib']:.0f} MiB" if f"{name}_peak_mib" in report else ""
            lines.append(f"  {name:10s} {report[f'{name}_seconds'] * 1000:9.1f} ms{memory}")
    if "ratio" in report:
        lines.append(f"  latentdiff / diffusers = {report['ratio']:.2f}; outputs differ by at most "
                     f"{report['max_abs_diff']:.1e}")
    else:
        lines.append("  (diffusers is not installed: `pip install diffusers` to time it alongside)")
    return "\n".join(lines)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="shapes", help=f"UNet to time: {', '.join(PRESETS)} (default: %(default)s)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 for shapes, 1 for sd15)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model (default: %(default)s)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (a training step)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help=f"{', '.join(DTYPES)} (default: %(default)s)")


def run_bench(args: argparse.Namespace) -> dict:
    if args.preset not in PRESETS:
        raise ConfigError(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPES)}")
    if args.repeats < 1 or (args.batch is not None and args.batch < 1):
        raise ConfigError("--repeats and --batch must be at least 1")
    report = bench_unet(PRESETS[args.preset](), args.batch, args.repeats, args.backward, args.device,
                        DTYPES[args.dtype])
    print(format_report(report))
    return report
