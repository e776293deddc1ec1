"""Datasets of captioned images: the built-in `shapes`, folders of images with captions, and tar shards.

Every dataset yields {"image": FloatTensor (3, H, W) in [-1, 1], "caption": str}, which the default
DataLoader collate batches into {"image": (B, 3, H, W), "caption": list[str]}.
"""
from __future__ import annotations

from ..lazy import lazy_attributes

# Loaded on first use (PEP 562): `latentdiff pack --help` and other light users need not wait for torch.
_LAZY = {
    "ImageFolderDataset": "imagefolder", "load_image": "images", "pil_to_tensor": "images",
    "tensor_to_pil": "images", "ShapesDataset": "shapes", "ShardDataset": "shards", "DataConfig": "sources",
    "build_dataset": "sources", "in_order": "sources", "iter_in_order": "sources",
}
__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, globals(), _LAZY)
