"""GenEval-style prompt suites on the `shapes` attributes, and their scoring by the shapes judge.

Six categories, after GenEval (Ghosh et al. 2023), each scored on its own skill:

  single_object   "a red circle in the top left"       the one object: colour, shape and region, nothing else
  two_objects     "a red circle and a green square"    both shapes present (colours not checked)
  counting        "three red circles"                  exactly n objects of the shape
  colours         "a red circle"                       the shape present, and every one of it in the colour
  position        "a red circle above a green square"  both shapes found and the relation holds between them
                                                       (colours not checked: "a red circle above a blue
                                                       circle" passes with either circle on top)
  colour_binding  "a red circle and a green square"    each colour on its own shape (no swaps)

A suite is built for split "train" (compositions the training split shows) or "heldout" (every
prompt contains a held-out colour x shape pair, or for `position` a held-out relation, so
`is_heldout` holds for each). Generating the pictures is the caller's job: `score_images` takes
them in, one per suite entry, in order.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.shapes import (
    COLOURS, HELDOUT_COLOUR_SHAPES, HELDOUT_RELATIONS, REGIONS, RELATIONS, SHAPES, SIZES, SPLITS,
    ObjectSpec, ShapesSample, canonical_relation, is_heldout, make_sample,
)
from ..data.shapes_captions import caption_sample, with_article
from .judge import Verdict, judge_image, relation_seen
from .judge_segment import SegmentConfig

CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_binding")
_TRIES = 100  # draws per prompt before giving up (a layout with no room, or held-out by accident)


def _colour_shape(rng: random.Random, heldout: bool) -> tuple[str, str]:
    """A held-out colour x shape pair, or (heldout=False) one the training split shows."""
    if heldout:
        return rng.choice(sorted(HELDOUT_COLOUR_SHAPES))
    while True:
        pair = (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        if pair not in HELDOUT_COLOUR_SHAPES:
            return pair


def _two_objects(rng: random.Random, heldout: bool, colours_differ: bool) -> list[tuple[str, str]]:
    """Two objects of different shapes (and colours, if asked); held out: one of them a held-out pair."""
    while True:
        pairs = [_colour_shape(rng, heldout), _colour_shape(rng, heldout=False)]
        rng.shuffle(pairs)
        if pairs[0][1] != pairs[1][1] and (not colours_differ or pairs[0][0] != pairs[1][0]):
            return pairs


def _draw_prompt(category: str, rng: random.Random, heldout: bool, image_size: int) -> ShapesSample:
    """One prompt of the category (may raise ValueError when the layout finds no room)."""
    def size() -> str:
        return rng.choice(tuple(SIZES))

    if category in ("single_object", "colours"):
        colour, shape = _colour_shape(rng, heldout)
        region = rng.choice(REGIONS) if category == "single_object" else None
        sample = make_sample("single", [ObjectSpec(colour, shape, size(), region)], image_size=image_size, rng=rng)
        if category == "colours":  # no region in the prompt: only the colour is asked for
            return replace(sample, caption=with_article(f"{colour} {shape}"))
        return replace(sample, caption=caption_sample(sample))
    if category == "counting":
        colour, shape = _colour_shape(rng, heldout)
        specs = [ObjectSpec(colour, shape, size())] * rng.choice((2, 3))
        sample = make_sample("count", specs, image_size=image_size, rng=rng)
        return replace(sample, caption=caption_sample(sample))
    if category in ("two_objects", "colour_binding"):
        pairs = _two_objects(rng, heldout, colours_differ=category == "colour_binding")
        sample = make_sample("pair", [ObjectSpec(c, s, size()) for c, s in pairs], image_size=image_size, rng=rng)
        return replace(sample, caption=caption_sample(sample))
    if category == "position":
        if heldout:  # a held-out relation, said either way round
            shape_a, relation, shape_b = rng.choice(sorted(HELDOUT_RELATIONS))
            if rng.random() < 0.5:
                shape_a, relation, shape_b = shape_b, {"above": "below", "left of": "right of"}[relation], shape_a
        else:
            shape_a, relation, shape_b = rng.choice(SHAPES), rng.choice(RELATIONS), rng.choice(SHAPES)
            if canonical_relation(shape_a, relation, shape_b) in HELDOUT_RELATIONS:
                raise ValueError("held-out relation drawn for the training suite")
        colour_a, colour_b = (rng.choice([c for c in COLOURS if (c, s) not in HELDOUT_COLOUR_SHAPES])
                              for s in (shape_a, shape_b))
        if (colour_a, shape_a) == (colour_b, shape_b):
            raise ValueError("two identical objects are a count, not a pair")
        specs = [ObjectSpec(colour_a, shape_a, size()), ObjectSpec(colour_b, shape_b, size())]
        sample = make_sample("pair", specs, relation, image_size=image_size, rng=rng)
        return replace(sample, caption=caption_sample(sample))
    raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")


def build_prompt_suite(split: str, per_category: int, seed: int = 0,
                       image_size: int = 32) -> list[tuple[str, ShapesSample]]:
    """[(category, sample)] with `per_category` prompts of each category, canonical captions,
    deterministic in (split, per_category, seed, image_size)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    heldout = split == "heldout"
    suite = []
    for category in CATEGORIES:
        rng = random.Random(f"geneval/{seed}/{split}/{category}")
        for _ in range(per_category):
            for _ in range(_TRIES):
                try:
                    sample = _draw_prompt(category, rng, heldout, image_size)
                except ValueError:  # no room for the layout, or a composition of the other split
                    continue
                # A training prompt must not show a held-out relation in pixels by accident.
                if is_heldout(sample) == heldout:
                    suite.append((category, sample))
                    break
            else:
                raise RuntimeError(f"no {split} prompt found for {category}")  # a bug, not bad input
    return suite


def category_correct(category: str, sample: ShapesSample, verdict: Verdict) -> bool:
    """Whether the judged picture passes its category's test (see the module docstring)."""
    detected = verdict.detected
    want = sample.objects[0]
    if category == "single_object":
        return verdict.overall
    if category == "two_objects":
        return not Counter(obj.shape for obj in sample.objects) - Counter(obj.shape for obj in detected)
    if category == "counting":
        return sum(obj.shape == want.shape for obj in detected) == len(sample.objects)
    if category == "colours":
        same_shape = [obj for obj in detected if obj.shape == want.shape]
        return bool(same_shape) and all(want.colour in obj.colours for obj in same_shape)
    if category == "position":  # by shape alone: two of one shape may stand either way round
        first, second = sample.objects
        return any(a is not b and a.shape == first.shape and b.shape == second.shape
                   and relation_seen(a, sample.relation, b) for a in detected for b in detected)
    if category == "colour_binding":
        return bool(verdict.binding_ok)
    raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")


def score_images(suite: Sequence[tuple[str, ShapesSample]],
                 images: Sequence[Image.Image | torch.Tensor | np.ndarray] | torch.Tensor,
                 config: SegmentConfig = SegmentConfig()) -> dict[str, float]:
    """{category: fraction correct} for one picture per suite entry (PIL, or (3, H, W) in [-1, 1])."""
    if len(images) != len(suite):
        raise ValueError(f"{len(images)} images for {len(suite)} prompts")
    hits, totals = Counter(), Counter()
    for (category, sample), image in zip(suite, images):
        totals[category] += 1
        hits[category] += category_correct(category, sample, judge_image(image, sample, config=config))
    return {category: hits[category] / totals[category] for category in CATEGORIES if totals[category]}
