"""The order in which a run reads its data: an endless, resumable stream of indices, split across processes."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """An endless stream of dataset indices: epoch e is a permutation seeded by (seed, e).

    Sample position p of the stream goes to process p % world_size, so processes see disjoint samples,
    and the stream can start at any position (resume) without replaying the earlier ones.
    """

    def __init__(self, length: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.start, self.rank, self.world_size = length, seed, start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world_size + self.rank
        while True:
            epoch, offset = divmod(position, self.length)
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            while offset < self.length:
                yield int(order[offset])
                offset += self.world_size
            position = (epoch + 1) * self.length + (offset - self.length)
