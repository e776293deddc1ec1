"""Datasets of captioned images: the built-in `shapes` and folders of images with captions.

Every dataset yields {"image": FloatTensor (3, H, W) in [-1, 1], "caption": str}, which the default
DataLoader collate batches into {"image": (B, 3, H, W), "caption": list[str]}.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from .imagefolder import ImageFolderDataset
from .images import load_image, pil_to_tensor, tensor_to_pil
from .shapes import ShapesDataset

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


__all__ = ["ShapesDataset", "ImageFolderDataset", "build_dataset", "load_image", "pil_to_tensor",
           "tensor_to_pil"]
