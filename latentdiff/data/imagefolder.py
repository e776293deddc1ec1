"""A folder of images with captions, as a dataset of {"image": (3, H, W) in [-1, 1], "caption": str}.

Captions come from either
  - `metadata.jsonl` in the folder (the Hugging Face imagefolder convention): one JSON object per
    line with "file_name" (relative to the folder) and "text"; if present it is the only source, or
  - a sidecar text file beside each image: `cat.png` + `cat.txt`.
Sub-folders are searched recursively; hidden files and folders (".name") are ignored.

Bad files never stop training: at construction every image is opened and verified, and the ones
that fail are skipped (one warning lists them); an image that passes the check but fails to decode
later is skipped too (warned, recorded in `skipped`) and another sample is returned in its place.

Split: a folder has no held-out part of its own, so ~5% of the files (by a hash of the relative
path, stable when files are added or removed) form split="heldout", at least one; the rest form
"train". A folder with a single image uses it for both.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import check_choice
from ..errors import DataError
from .images import (
    CROPS,
    UnreadableImageError,
    describe_image_error,
    load_image,
    parse_colour,
    pil_to_tensor,
    prepare_image,
)

METADATA_NAME = "metadata.jsonl"
HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout")
_NAMES_SHOWN = 10  # files named in one message before "and N more"


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes of every format this Pillow build can open (".png", ".jpg", ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def heldout_score(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: files scoring below HELDOUT_FRACTION are held out."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _find_images(root: Path) -> list[str]:
    """Relative POSIX paths of files with an image suffix, sorted, skipping hidden entries."""
    extensions = image_extensions()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def read_metadata(root: Path) -> dict[str, str]:
    """{relative path: caption} from root/metadata.jsonl; DataError naming the line if one is bad."""
    path = root / METADATA_NAME
    captions = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                    or not isinstance(entry.get("text"), str):
                raise DataError(f"{path}, line {number}: needs string fields \"file_name\" and \"text\"")
            name = Path(entry["file_name"]).as_posix()
            if not (root / name).is_file():
                raise DataError(f"{path}, line {number}: file {entry['file_name']!r} does not exist")
            captions[name] = clean_caption(entry["text"])
    return captions


def read_sidecar_captions(root: Path, names: list[str]) -> dict[str, str]:
    """{relative path: caption} for every image with a `.txt` file of the same name beside it."""
    captions = {}
    for name in names:
        sidecar = (root / name).with_suffix(".txt")
        if sidecar.is_file():
            captions[name] = clean_caption(sidecar.read_text(encoding="utf-8", errors="replace"))
    return captions


def clean_caption(text: str) -> str:
    """One line, single spaces (newlines mean nothing to a tokenizer); folders and shards both use it."""
    return " ".join(text.split())


def verify_image(path: Path) -> str | None:
    """None if Pillow can open and verify the file (without decoding it all), else a short reason."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # Pillow raises many types for bad files; each just means "skip it"
        return describe_image_error(err)
    return None


def scan_folder(root: Path, require_captions: bool = True,
                stacklevel: int = 2) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(usable images, {image: caption}, {path: reason} for files left out) of a folder, as relative paths.

    Every image is opened and verified; the ones that fail are skipped with one warning naming them.
    DataError if none is usable, or (require_captions) if any usable image has no caption.
    """
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    candidates = _find_images(root)
    captions = read_metadata(root) if (root / METADATA_NAME).is_file() else read_sidecar_captions(root, candidates)
    usable, skipped = [], {}
    for name in candidates:
        reason = verify_image(root / name)
        if reason is None:
            usable.append(name)
        else:
            skipped[str(root / name)] = reason
    if skipped:
        listed = [f"{Path(p).relative_to(root).as_posix()} ({r})" for p, r in skipped.items()]
        warnings.warn(f"{root}: skipped {len(skipped)} of {len(candidates)} files: {_list_names(listed)}",
                      stacklevel=stacklevel)
    if not usable:
        raise DataError(f"{root}: no usable images (found {len(candidates)} image files)")
    uncaptioned = [name for name in usable if name not in captions]
    if uncaptioned and require_captions:
        raise DataError(
            f"{root}: {len(uncaptioned)} of {len(usable)} images have no caption "
            f"({_list_names(uncaptioned)}); put a .txt file beside each image, or a {METADATA_NAME} "
            f"with \"file_name\" and \"text\" in the folder")
    return usable, captions, skipped


class ImageFolderDataset(Dataset):
    """Captioned images from a folder, resized and cropped to size x size."""

    def __init__(self, root: str | Path, size: int, crop: str = "center", flip: bool = False,
                 background: str = "white", split: str = "train", require_captions: bool = True,
                 seed: int = 0):
        check_choice("crop", crop, CROPS)
        check_choice("split", split, SPLITS)
        parse_colour(background)  # fail now on a bad colour name, not in the first batch
        self.root, self.size, self.crop, self.flip = Path(root), size, crop, flip
        self.background, self.split, self.seed = background, split, seed
        self._bad: set[int] = set()  # indices that failed to decode (in this process)
        # skipped: path -> reason, for every file left out
        usable, captions, self.skipped = scan_folder(self.root, require_captions, stacklevel=3)
        self.files = self._split_files(usable, split)
        self.captions = [captions.get(name, "") for name in self.files]

    @staticmethod
    def _split_files(names: list[str], split: str) -> list[str]:
        if len(names) == 1:
            return names
        scores = {name: heldout_score(name) for name in names}
        heldout = {name for name in names if scores[name] < HELDOUT_FRACTION}
        if not heldout:
            heldout = {min(names, key=scores.__getitem__)}
        return [name for name in names if (name in heldout) == (split == "heldout")]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        """Image `index` resized, cropped and maybe flipped; UnreadableImageError if it cannot be decoded."""
        rng = random.Random(f"imagefolder/{self.seed}/{index}")  # same crop and flip for the same index
        return prepare_image(load_image(self.root / self.files[index], self.background), self.size, self.crop,
                             self.flip, rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        # A file that breaks mid-epoch is skipped: warn once, then serve the next good one instead.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._bad:
                continue
            try:
                image = self.load(candidate)
            except UnreadableImageError as err:
                self._bad.add(candidate)
                self.skipped[str(err.path)] = err.reason
                warnings.warn(f"skipping {err}", stacklevel=2)
                continue
            return {"image": pil_to_tensor(image), "caption": self.captions[candidate]}
        raise DataError(f"{self.root}: none of the {len(self)} images in split {self.split!r} can be decoded")
