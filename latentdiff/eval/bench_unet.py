"""Our UNet and diffusers' UNet2DConditionModel with the same weights, timed side by side (`latentdiff bench`)."""
from __future__ import annotations

from typing import Callable

import torch

from ..models.unet import UNet, UNetConfig
from .bench import BenchCase
from .bench_timing import time_in_turn

IMPLEMENTATIONS = ("latentdiff", "diffusers")


def quiet_diffusers():
    """The diffusers module with its logging and progress bars (and transformers', which it loads and
    saves with) turned off, or None when it is not installed."""
    try:
        import diffusers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return None
    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() concerns pretrained loading
    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
    return diffusers


def diffusers_twin(unet: UNet, latent_size: int) -> torch.nn.Module | None:
    """diffusers' UNet2DConditionModel holding `unet`'s weights (None when diffusers is not installed)."""
    diffusers = quiet_diffusers()
    if diffusers is None:
        return None
    from ..convert.unet_keys import unet_config_to_diffusers, unet_to_diffusers

    config = {k: v for k, v in unet_config_to_diffusers(unet.config, latent_size).items() if not k.startswith("_")}
    twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(unet_to_diffusers(unet.state_dict(), unet.config), strict=True)
    return twin


def randomize_zeros(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """`module` with its all-zero parameters (zero-initialised output layers, biases) drawn at random:
    zeros would make outputs 0 and hide any difference between two implementations."""
    for p in module.parameters():
        if not p.detach().any():
            p.data.normal_(0, std)
    return module


def unet_for_bench(cfg: UNetConfig) -> UNet:
    """A fresh UNet with no zero layer (see randomize_zeros)."""
    return randomize_zeros(UNet(cfg))


def bench_unet(case: BenchCase, batch: int | None = None, repeats: int = 5, backward: bool = False,
               device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Median seconds per call of ours and diffusers' UNet (forward, or forward + backward), their
    ratio, the largest output difference, FLOPs per call, and CUDA peak memory. One warm-up call each first."""
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

    measured = time_in_turn({name: call(name) for name in models}, repeats, dev)
    report = {"batch": batch, "latent_size": case.latent_size, "backward": backward, "device": device,
              "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
              "parameters": sum(p.numel() for p in ours.parameters())}
    for name in models:
        report[f"{name}_seconds"] = measured.seconds[name]
        report[f"{name}_flops"] = measured.flops[name]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            call(name)()
            report[f"{name}_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    if twin is not None:
        outputs = measured.outputs
        report["ratio"] = report["latentdiff_seconds"] / report["diffusers_seconds"]
        report["max_abs_diff"] = (outputs["latentdiff"].float() - outputs["diffusers"].float()).abs().max().item()
    return report


def format_report(report: dict) -> str:
    what = "forward + backward" if report["backward"] else "forward"
    lines = [f"UNet {report['parameters'] / 1e6:.1f}M parameters, {what}, batch {report['batch']} at "
             f"{report['latent_size']}x{report['latent_size']} latents, {report['device']} {report['dtype']}, "
             f"median of {report['repeats']}:"]
    for name in IMPLEMENTATIONS:
        if f"{name}_seconds" in report:
            memory = f", peak {report[f'{name}_peak_mib']:.0f} MiB" if f"{name}_peak_mib" in report else ""
            lines.append(f"  {name:10s} {report[f'{name}_seconds'] * 1000:9.1f} ms{memory}")
    if "ratio" in report:
        lines.append(f"  latentdiff / diffusers = {report['ratio']:.2f}; outputs differ by at most "
                     f"{report['max_abs_diff']:.1e}")
    else:
        lines.append("  (diffusers is not installed: `pip install diffusers` to time it alongside)")
    return "\n".join(lines)
