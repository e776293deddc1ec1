"""Where training samples come from: the DataConfig section of every stage's config, and the dataset it names."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch.utils.data import Dataset

from ..config import check_choice
from ..errors import ConfigError, DataError
from .imagefolder import ImageFolderDataset
from .images import CROPS
from .shapes import ShapesDataset
from .shards import ShardDataset, is_shard_source


@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"            # "shapes" (built in), a folder of images with captions, or tar shards:
                                      # a brace pattern ("data/{00000..00099}.tar"), a .txt list of shards,
                                      # or a folder of .tar files (see data/shards.py)
    size: int = 32                    # training images are size x size pixels
    crop: str = "center"              # "center" or "random" crop after resizing the short side
    flip: bool = False                # random horizontal flips (off: captions name left and right)
    length: int = 50_000              # shapes only: samples per epoch (rendered on the fly)
    seed: int = 0                     # shapes: sample i is rendered from (seed, i); folders, shards: crop/flip seed
    background: str = "white"         # colour that transparent pixels are composited onto
    num_workers: int = 0              # DataLoader worker processes
    shuffle_buffer: int = 1000        # shards: samples a worker mixes (as raw bytes, in memory); 0 = shard order
    # Levers for compositions (issue 15), shapes "train" split only; the defaults leave the data as it was.
    paraphrase: float = 0.0           # share of pair captions said the other way round ("B right of A")
    multi_object_weight: float = 1.0  # odds of counts and pairs against single objects, times this

    def __post_init__(self):
        check_choice("data.crop", self.crop, CROPS)
        if self.size < 8:
            raise ConfigError(f"data.size: {self.size} is too small (at least 8)")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer: must be at least 0, got {self.shuffle_buffer}")
        if not 0.0 <= self.paraphrase <= 1.0:
            raise ConfigError(f"data.paraphrase: must be in [0, 1], got {self.paraphrase}")
        if self.multi_object_weight <= 0:
            raise ConfigError(f"data.multi_object_weight: must be positive, got {self.multi_object_weight}")
        if self.source != "shapes" and (self.paraphrase, self.multi_object_weight) != (0.0, 1.0):
            raise ConfigError("data.paraphrase and data.multi_object_weight work on the built-in shapes only, "
                              f"whose scenes are known; data.source is {self.source!r}")


HELDOUT_SHAPES_MIN = 1000  # shapes "heldout" split: max(this, cfg.length // 10) samples


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset `cfg.source` names: "shapes", a folder of captioned images or tar shards; split "train"
    or "heldout". Shards give an IterableDataset (endless: see ShardDataset.configure, and in_order).
    The shapes levers change only "train": the held-out split stays the same yardstick for every run."""
    if cfg.source == "shapes":
        if split != "train":
            return ShapesDataset(size=cfg.size, length=max(HELDOUT_SHAPES_MIN, cfg.length // 10), seed=cfg.seed,
                                 split=split)
        return ShapesDataset(size=cfg.size, length=cfg.length, seed=cfg.seed, split=split,
                             paraphrase=cfg.paraphrase, multi_object_weight=cfg.multi_object_weight)
    if is_shard_source(cfg.source):
        return ShardDataset(cfg.source, cfg.size, crop=cfg.crop, flip=cfg.flip, background=cfg.background,
                            split=split, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
    root = Path(cfg.source).expanduser()
    if not root.exists():
        raise DataError(f"data source {cfg.source!r} is neither 'shapes', an existing folder, nor tar shards "
                        f"(a .tar, a .txt list, or a pattern like 'data/{{00000..00009}}.tar')")
    return ImageFolderDataset(root, cfg.size, crop=cfg.crop, flip=cfg.flip, background=cfg.background,
                              split=split, seed=cfg.seed)


def in_order(dataset: Dataset) -> Dataset:
    """A finite dataset of the same samples in a fixed order, for evaluation with DataLoader(shuffle=False):
    a map-style dataset itself, shards their `one_pass()`."""
    return dataset.one_pass() if isinstance(dataset, ShardDataset) else dataset


def iter_in_order(dataset: Dataset, limit: int | None = None) -> Iterator[dict]:
    """The samples of `in_order(dataset)`, the first `limit` of them (all when None)."""
    if isinstance(dataset, ShardDataset):
        return itertools.islice(iter(dataset.one_pass()), limit)
    return (dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset))))
