"""Datasets of captioned images: the built-in `shapes`, folders of images with captions, and tar shards.

Every dataset yields {"image": FloatTensor (3, H, W) in [-1, 1], "caption": str}, which the default
DataLoader collate batches into {"image": (B, 3, H, W), "caption": list[str]}.
"""
from __future__ import annotations

from .imagefolder import ImageFolderDataset
from .images import load_image, pil_to_tensor, tensor_to_pil
from .shapes import ShapesDataset
from .shards import ShardDataset
from .sources import DataConfig, build_dataset, in_order, iter_in_order

__all__ = ["DataConfig", "ShapesDataset", "ImageFolderDataset", "ShardDataset", "build_dataset", "in_order",
           "iter_in_order", "load_image", "pil_to_tensor", "tensor_to_pil"]
