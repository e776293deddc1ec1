"""Checks that refuse a generation request before any work starts: numbers that must be finite, and a size
or batch whose memory would not fit.

The memory a generation needs is estimated from its shapes alone (no allocation), as the larger of its two
phases, which run one after the other, plus the weights:

- sampling: the UNet on the latents (twice the batch under classifier-free guidance): its skip
  connections, a few tensors of each level's shape alive at once, and the (B, heads, N, N) scores of its
  largest self-attention (the math backend materialises them; fused kernels need less, so the estimate
  errs on the side of refusing);
- decoding: the autoencoder decoder's activations up to full image size and its self-attention scores
  over the latent pixels (the middle block's).

The limit is the device's memory (a CUDA GPU's, else the machine's RAM or its cgroup's limit, whichever is
less), or a smaller one the caller sets (the web page's --max-memory).

Everything here is arithmetic on a PipelineSpec (pipeline_spec.py): torch loads only to ask a CUDA device
its memory, so that the CLI refuses a request before the pipeline loads.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .pipeline_spec import PipelineSpec

LIVE = 4  # tensors of one level's shape alive at once in a ResBlock: input, normed, conv output, residual
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def finite(name: str, value) -> float:
    """`value` as a float, refused (ConfigError) unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def integer(name: str, value) -> int:
    """`value` as an int, refused unless it is a whole number (3 or 3.0, not 3.5, nan or inf)."""
    number = finite(name, value)
    if number != int(number):
        raise ConfigError(f"{name}: must be a whole number, got {value!r}")
    return int(number)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if count < 1024 or unit == "EiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def parse_bytes(text: str) -> int:
    """'4GiB', '500MB', '2G', '123' (bytes) -> bytes; ConfigError otherwise."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?))?b?", text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"memory size {text!r}: expected a positive size such as 4GiB, 500MB or 2G")
    number, prefix, binary = match.groups()
    power = "kmgt".index(prefix) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def device_memory(device: str | torch.device) -> tuple[int | None, str]:
    """(bytes, what they are) of the memory a generation on `device` ("cpu", "cuda:0", ...) can use; None
    when unknown."""
    if str(device).startswith("cuda"):
        import torch  # only a CUDA device needs it asked

        props = torch.cuda.get_device_properties(torch.device(device))
        return props.total_memory, f"the {format_bytes(props.total_memory)} of {props.name}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no estimate of what fits
        return None, "unknown"
    for path in CGROUP_LIMITS:
        try:
            total = min(total, int(Path(path).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return total, f"the {format_bytes(total)} of memory this machine has"


def generation_memory(spec: PipelineSpec, batch: int, height: int, width: int, guided: bool) -> tuple[int, str]:
    """(bytes, the phase that needs most) to generate `batch` images of height x width pixels with the pipeline
    `spec` describes."""
    unet, ae = spec.unet, spec.autoencoder
    f = spec.latent_factor
    pixels = (height // f) * (width // f)  # latent positions, N at level 0
    rows = batch * (2 if guided else 1)   # guidance runs the conditional and unconditional halves in one batch
    levels = range(len(unet.channel_mult))
    skips = sum((unet.num_res_blocks + 1) * unet.width(lvl) * pixels / 4 ** lvl for lvl in levels)
    work = max(LIVE * unet.width(lvl) * pixels / 4 ** lvl for lvl in levels)
    attention = [unet.heads(lvl) * (pixels / 4 ** lvl) ** 2 + 8 * unet.width(lvl) * pixels / 4 ** lvl  # scores, GEGLU
                 for lvl in set(unet.attention_levels) | {len(levels) - 1}]
    sampling = rows * (skips + max(work, *attention)) * spec.unet_itemsize
    widths = [ae.ch * m for m in ae.ch_mult]
    # at level l the decoder holds widths[l] channels, and the upsampled widths[l + 1] on entry
    decoder = max(LIVE * max(widths[lvl:lvl + 2]) * height * width / 4 ** lvl for lvl in range(len(widths)))
    decoding = batch * max(decoder, pixels ** 2 if ae.mid_attention else 0) * spec.autoencoder_itemsize
    phase = "the UNet's activations and attention" if sampling >= decoding else "the decoder's activations"
    return int(max(sampling, decoding) + spec.weight_bytes), phase


def check_memory(spec: PipelineSpec, batch: int, height: int, width: int, guided: bool,
                 limit: int | None = None) -> None:
    """Refuse (ConfigError, one line naming the limit) a generation whose estimate exceeds `limit` bytes
    (default: the device's memory)."""
    available, what = device_memory(spec.device)
    if limit is not None:
        limit = integer("memory_limit", limit)
        if available is None or limit < available:
            available, what = limit, f"the memory limit of {format_bytes(limit)}"
    if available is None:
        return
    needed, phase = generation_memory(spec, batch, height, width, guided)
    if needed > available:
        raise ConfigError(f"{batch} image(s) of {width}x{height} would need about {format_bytes(needed)} of memory "
                          f"({phase}), more than {what}: ask for a smaller size or fewer images")
