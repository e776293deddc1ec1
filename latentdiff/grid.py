"""Grids of generated images with their prompts beside each row (quickstart and `generate --grid`)."""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 4  # pixels between tiles and around the grid


def label_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable, bundled (no font files needed)
    except TypeError:
        return ImageFont.load_default()


def prompt_grid(images: Sequence[Image.Image], prompts: Sequence[str], columns: int, scale: int = 4) -> Image.Image:
    """`images` in rows of `columns`, each enlarged `scale` times by nearest neighbour (the generated
    pixels, only bigger), with the prompt of each row's first image written to its left."""
    if not images or len(prompts) != len(images):
        raise ValueError(f"prompt_grid: {len(images)} images for {len(prompts)} prompts")
    tile_w, tile_h = images[0].width * scale, images[0].height * scale
    rows = math.ceil(len(images) / columns)
    labels = [prompts[row * columns] for row in range(rows)]
    font = label_font(max(10, min(16, tile_h // 3)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(label, font=font) for label in labels)) + 2 * PAD
    grid = Image.new("RGB", (label_w + columns * (tile_w + PAD) + PAD, rows * (tile_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(labels):
        top = PAD + row * (tile_h + PAD)
        draw.text((PAD, top + tile_h // 2), label, fill="black", font=font, anchor="lm")
    for k, image in enumerate(images):
        row, col = divmod(k, columns)
        tile = image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST)
        grid.paste(tile, (label_w + PAD + col * (tile_w + PAD), PAD + row * (tile_h + PAD)))
    return grid
