"""Reading images of any kind into 8-bit RGB, resizing and cropping them, and PIL <-> tensor.

Every image the data layer hands on is RGB, 8 bits per channel: transparency is composited onto a
background colour (dropping alpha would turn transparent pixels into whatever colour they happen to
store, often black), and high-bit-depth or float images are rescaled to 0..255 instead of clipped.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps

from ..config import check_choice
from ..errors import ConfigError, DataError

# Modes Pillow converts to RGB correctly by itself (CMYK is inverted for Adobe JPEGs at decode time).
_PLAIN_MODES = ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX", "HSV")
# Modes that carry an alpha channel (RGBa and La are premultiplied; convert("RGBA") undoes that).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

CROPS = ("center", "random")  # how resize_and_crop cuts the square


def parse_colour(name: str) -> tuple[int, int, int]:
    """A colour name or hex string ("white", "#808080") as an RGB triple."""
    try:
        return ImageColor.getrgb(name)[:3]
    except (ValueError, AttributeError):
        raise ConfigError(f"data.background: {name!r} is not a colour name or #rrggbb value") from None


class UnreadableImageError(DataError):
    """An image file that cannot be opened or decoded; `reason` is short ("truncated", "not an image")."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: cannot read image ({reason})")
        self.path, self.reason = path, reason


def load_image(path: str | Path, background: str = "white") -> Image.Image:
    """Any image Pillow reads, as 8-bit RGB; UnreadableImageError naming the file if it cannot be decoded."""
    path = Path(path)
    return _read_rgb(path, path, background)


def decode_image(data: bytes, name: str, background: str = "white") -> Image.Image:
    """`load_image` for an image held in memory (a tar member); errors name it by `name`."""
    return _read_rgb(io.BytesIO(data), name, background)


def _read_rgb(source: Path | BinaryIO, path: str | Path, background: str) -> Image.Image:
    try:
        with Image.open(source) as img:
            img.load()  # decode now, so a truncated file fails here rather than somewhere later
            img = ImageOps.exif_transpose(img)  # photos store their rotation in EXIF
            return to_rgb(img, background)
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(path, describe_image_error(err)) from None


def describe_image_error(err: BaseException) -> str:
    """A short reason for a failed open/verify/decode: 'not an image', 'truncated' or Pillow's message."""
    message = str(err).lower()
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image"
    if "truncated" in message or "broken" in message or isinstance(err, EOFError):
        return "truncated"
    return str(err) or type(err).__name__


def to_rgb(img: Image.Image, background: str = "white") -> Image.Image:
    """Convert an opened image of any mode to RGB (alpha composited, high bit depths rescaled)."""
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # palette / tRNS transparency becomes a real alpha channel
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, parse_colour(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode == "P":
        return img.convert("RGB")
    if img.mode in _PLAIN_MODES:
        return img.convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_rescale_to_uint8(img)).convert("RGB")
    return img.convert("RGB")  # anything else Pillow can convert; a ValueError here is reported by load_image


def _rescale_to_uint8(img: Image.Image) -> np.ndarray:
    """Single-channel 16-bit, 32-bit integer or float pixels as uint8 (H, W).

    I;16 variants are 16-bit by definition (divide by 257). Mode I is what Pillow opens 16-bit PNGs
    as, so values in 0..65535 are read as 16-bit when any exceeds 255 and as 8-bit otherwise. Float
    images in [0, 1] are scaled by 255. Anything else (negative values, larger ranges) is stretched
    from its own minimum and maximum.
    """
    values = np.asarray(img).astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        values = values / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        values = values * 255.0
    elif lo < 0 or hi > 255:
        values = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def resize_and_crop(img: Image.Image, size: int, crop: str = "center",
                    rng: random.Random | None = None) -> Image.Image:
    """Resize the short side to `size` (Lanczos), then crop size x size from the centre or at random."""
    check_choice("crop", crop, CROPS)
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng")
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        # reducing_gap: shrink big photos with a cheap box filter first, then Lanczos for the last 3x
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "center":
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    if (left, top, new_w, new_h) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def prepare_image(img: Image.Image, size: int, crop: str, flip: bool, rng: random.Random) -> Image.Image:
    """What every dataset does to a loaded image: resize_and_crop, then a horizontal flip half the time if `flip`."""
    img = resize_and_crop(img, size, crop, rng)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor (3, H, W) in [-1, 1]."""
    if img.mode != "RGB":
        img = to_rgb(img)
    # In numpy: small element-wise torch ops pay thread start-up costs that dominate a data loader.
    pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W) in 0..255
    return torch.from_numpy(np.ascontiguousarray(pixels) / np.float32(127.5) - np.float32(1.0))


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """A tensor (3, H, W) in [-1, 1] as an RGB PIL image (values outside the range are clipped)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    pixels = tensor.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
