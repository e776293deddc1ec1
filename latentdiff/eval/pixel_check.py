"""A pixel check of single-object shapes prompts: is the generated object the prompt's colour, in its region?

For a prompt like "a red circle in the top left" (built with `make_sample`), the non-white pixels of the
generated image are taken as the object: their dominant colour (each pixel votes for the nearest of the
shapes COLOURS) must be the prompt's colour, and the centre of the dominant colour's pixels must lie in the
prompt's 3x3 region. The centre is that of their bounding box, as the dataset places objects by their box:
a triangle's centroid sits a sixth of its height below its box centre, in the next cell for some layouts.
The shape itself is not judged (that needs a classifier); this is a quick, model-free score for tuning.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from ..data.shapes import (COLOURS, HELDOUT_COLOUR_SHAPES, REGIONS, SHAPES, SIZES, ObjectSpec, ShapesSample,
                           make_sample)
from ..data.shapes_captions import caption_sample

COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (K, 3)
INK_THRESHOLD = 60.0  # a pixel is part of the object when it is this far (RGB distance) from white


@dataclass(frozen=True)
class PixelJudgement:
    colour: str | None      # dominant colour of the object's pixels (None: a blank image)
    region: str | None      # 3x3 region of their centroid
    colour_ok: bool
    region_ok: bool

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.region_ok


def single_object_prompts(count: int, seed: int = 0, image_size: int = 32,
                          heldout: bool = False) -> list[ShapesSample]:
    """`count` single-object samples with canonical captions ("a red circle in the top left"), each
    colour x shape x size x region drawn at random; heldout=False keeps to the training colour x shape pairs."""
    rng = random.Random(f"pixel-check/{seed}")
    samples = []
    while len(samples) < count:
        colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
        if ((colour, shape) in HELDOUT_COLOUR_SHAPES) != heldout:
            continue
        spec = ObjectSpec(colour, shape, rng.choice(tuple(SIZES)), rng.choice(REGIONS))
        sample = make_sample("single", [spec], image_size=image_size, rng=rng.randrange(1 << 30))  # any layout
        samples.append(replace(sample, caption=caption_sample(sample)))  # ... with the canonical caption
    return samples


def judge_single(image: np.ndarray, sample: ShapesSample) -> PixelJudgement:
    """image (H, W, 3) uint8 or float in [0, 1]; `sample` the single-object sample its prompt came from."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    target = sample.objects[0]
    ink = np.linalg.norm(255.0 - pixels, axis=-1) > INK_THRESHOLD  # (H, W) bool
    if not ink.any():
        return PixelJudgement(None, None, False, False)
    inked = pixels[ink]  # (N, 3)
    nearest = np.linalg.norm(inked[:, None, :] - PALETTE[None], axis=-1).argmin(1)  # (N,)
    colour = COLOUR_NAMES[np.bincount(nearest, minlength=len(COLOUR_NAMES)).argmax()]
    ys, xs = np.nonzero(ink)
    dominant = nearest == COLOUR_NAMES.index(colour)
    ys, xs = ys[dominant], xs[dominant]
    height, width = ink.shape
    row = min(2, int((ys.min() + ys.max() + 1) / 2 * 3 / height))  # bounding-box centre, in pixels
    col = min(2, int((xs.min() + xs.max() + 1) / 2 * 3 / width))
    region = REGIONS[row * 3 + col]
    return PixelJudgement(colour, region, colour == target.colour, region == target.region)


def pixel_check(pipeline, count: int = 64, seed: int = 0, batch_size: int = 64, **generate) -> dict:
    """Fractions of `count` single-object prompts whose image has the right colour, region and both.

    `generate` goes to the pipeline call (num_inference_steps, guidance_scale, sampler, ...); image k uses seed k.
    """
    size = pipeline.record.image_size or None
    samples = single_object_prompts(count, seed, image_size=size or 32)
    judgements = []
    for start in range(0, count, batch_size):
        chunk = samples[start:start + batch_size]
        seeds = list(range(seed * count + start, seed * count + start + len(chunk)))
        images = pipeline([s.caption for s in chunk], seed=seeds, output_type="np", **generate).images
        judgements += [judge_single(image, s) for image, s in zip(images, chunk)]
    n = len(judgements)
    return {"colour": sum(j.colour_ok for j in judgements) / n, "position": sum(j.region_ok for j in judgements) / n,
            "both": sum(j.ok for j in judgements) / n, "count": n}
