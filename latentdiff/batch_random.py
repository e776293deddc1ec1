"""Random draws for a batch that may be split across processes, so that N processes × batch b draw exactly
what 1 process × batch N·b draws.

The data order gives process r the samples at global positions r, r + N, r + 2N, ... of each step's batch
(train/data_order.py). A `BatchGenerator` therefore draws every random tensor for the whole global batch,
identically on every process (the same generator, or the default one, which every process seeds alike),
and keeps rows r::N. With one process that is exactly a plain draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class BatchGenerator:
    """`generator` (None: torch's default) drawing for the global batch; this process keeps rows rank::world_size."""
    generator: torch.Generator | None = None
    rank: int = 0
    world_size: int = 1


def draw(fn: Callable, shape: tuple, generator: torch.Generator | BatchGenerator | None, like: torch.Tensor,
         **kwargs) -> torch.Tensor:
    """`fn(*shape)` (torch.randn, torch.rand, ...) with `generator`, on `like`'s device; shape[0] is the batch.

    The draw happens on the generator's device (a CPU generator cannot fill a CUDA tensor), then moves.
    """
    rank, world = 0, 1
    if isinstance(generator, BatchGenerator):
        generator, rank, world = generator.generator, generator.rank, generator.world_size
    device = generator.device if generator is not None else like.device
    full = fn(shape[0] * world, *shape[1:], generator=generator, device=device, **kwargs)
    return full[rank::world].to(like.device)
