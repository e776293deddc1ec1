"""Where training samples come from: the DataConfig section of every stage's config, and the dataset it names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..config import check_choice
from ..errors import ConfigError, DataError
from .imagefolder import ImageFolderDataset
from .images import CROPS
from .shapes import ShapesDataset


@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"            # "shapes" (built in) or a folder of images with captions
    size: int = 32                    # training images are size x size pixels
    crop: str = "center"              # "center" or "random" crop after resizing the short side
    flip: bool = False                # random horizontal flips (off: captions name left and right)
    length: int = 50_000              # shapes only: samples per epoch (rendered on the fly)
    seed: int = 0                     # shapes: sample i is rendered from (seed, i); folders: crop/flip seed
    background: str = "white"         # colour that transparent pixels are composited onto
    num_workers: int = 0              # DataLoader worker processes

    def __post_init__(self):
        check_choice("data.crop", self.crop, CROPS)
        if self.size < 8:
            raise ConfigError(f"data.size: {self.size} is too small (at least 8)")


HELDOUT_SHAPES_MIN = 1000  # shapes "heldout" split: max(this, cfg.length // 10) samples


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset `cfg.source` names: "shapes" or a folder of captioned images; split "train" or "heldout"."""
    if cfg.source == "shapes":
        length = cfg.length if split == "train" else max(HELDOUT_SHAPES_MIN, cfg.length // 10)
        return ShapesDataset(size=cfg.size, length=length, seed=cfg.seed, split=split)
    root = Path(cfg.source).expanduser()
    if not root.exists():
        raise DataError(f"data source {cfg.source!r} is neither 'shapes' nor an existing folder")
    return ImageFolderDataset(root, cfg.size, crop=cfg.crop, flip=cfg.flip, background=cfg.background,
                              split=split, seed=cfg.seed)
