"""Hard-negative captions for the shapes data: scenes exactly one attribute away from a sample.

Lever (issue 15; `hard_negatives=K` in the text-encoder training config, off by default): trained only
against the other captions of its batch, a CLIP text encoder can match "a red circle and a blue square"
by its bag of words -- in a batch of 64 random captions, "a blue circle and a red square" almost never
stands beside it -- so its token states need not bind 'red' to 'circle', and the UNet that
cross-attends to them fails colour binding, relations and counts. Here every training image also meets
K captions of scenes that the generator makes exactly and that differ from its own in one attribute; the
image->text side of the contrastive loss must rank its own caption above them (train/contrastive.py).

Kinds of change (HARD_NEGATIVE_KINDS; CHANGED_ATTRIBUTE names what each changes in `scene_attributes`):
    colour_swap     a pair's two colours exchanged   "a red circle above a blue square" -> "a blue circle above a red square"
    relation_swap   above <-> below, left of <-> right of, same objects
    count           two <-> three
    mirror          a single object's region mirrored left-right (top-bottom in the middle column)
    colour          one object's colour (a count's shared colour) changed to another

A negative is a ShapesSample for its caption, not for rendering: its boxes are the original's (mirrored
for `mirror`, the last repeated for a larger count). Its caption comes from the generator's own
`caption_sample`, worded at random as the dataset words captions (so wording cannot tell a negative from
a positive). A negative whose caption the original picture still fits ("a red circle" without its region,
for a mirrored single; "a blue circle and a red circle" for a swapped pair of circles) is reworded
canonically or dropped: a hard negative is never a true caption. On the train split no negative names a
held-out colour x shape pair or relation, just as no train caption does.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import NamedTuple

from torch.utils.data import Dataset

from .shapes import (COLOURS, HELDOUT_COLOUR_SHAPES, HELDOUT_RELATIONS, REGIONS, ShapeObject, ShapesDataset,
                     ShapesSample, canonical_relation)
from .shapes_captions import COUNT_WORDS, caption_sample
from .shapes_fit import shapes_caption_fits

HARD_NEGATIVE_KINDS = ("colour_swap", "relation_swap", "count", "mirror", "colour")
CHANGED_ATTRIBUTE = {"colour_swap": "colour", "relation_swap": "relation", "count": "count", "mirror": "region",
                     "colour": "colour"}
OPPOSITE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


class HardNegative(NamedTuple):
    kind: str             # one of HARD_NEGATIVE_KINDS
    sample: ShapesSample  # the changed scene, with its caption


def scene_attributes(sample: ShapesSample) -> dict[str, object]:
    """What a caption of `sample` can state, one entry per attribute a hard negative may change.

    Per-object attributes are tuples in caption order (a count's identical objects are named once);
    the region is stated by single-object captions only.
    """
    named = sample.objects[:1] if sample.kind == "count" else sample.objects
    return {"count": len(sample.objects), "colour": tuple(o.colour for o in named),
            "shape": tuple(o.shape for o in named), "size": tuple(o.size for o in named),
            "region": sample.objects[0].region if sample.kind == "single" else None, "relation": sample.relation}


def changed_attributes(a: ShapesSample, b: ShapesSample) -> set[str]:
    """The names of the `scene_attributes` in which two samples differ."""
    first, second = scene_attributes(a), scene_attributes(b)
    return {name for name in first if first[name] != second[name]}


def hard_negatives(sample: ShapesSample, rng: random.Random | None = None, *,
                   allow_heldout: bool = False) -> list[HardNegative]:
    """Every scene one attribute away from `sample` that the generator can state, each with its caption
    (worded from `rng`; canonical when None). allow_heldout=False drops those naming a held-out colour x
    shape pair or relation (for the train split)."""
    out = []
    for kind, scene in _changed_scenes(sample):
        if not allow_heldout and _names_heldout(scene):
            continue
        for wording in (rng, None):  # a random wording that leaves the change unsaid falls back to the canonical one
            negative = replace(scene, caption=caption_sample(scene, wording))
            if not shapes_caption_fits(negative, sample):
                out.append(HardNegative(kind, negative))
                break
    return out


def choose_hard_negatives(negatives: list[HardNegative], k: int, rng: random.Random) -> list[HardNegative]:
    """Up to k of `negatives`, taking the kinds in turn (in random order, the colour changes last) so that the
    few structural ones (a swap, a count, a mirror) are not crowded out by the many colour changes: a text
    encoder trained without hard negatives already tells a changed colour apart (eval/text_twins.py, 99.8%),
    not swapped colours or a reversed relation, so a small k goes to those."""
    by_kind: dict[str, list[HardNegative]] = {}
    for negative in negatives:
        by_kind.setdefault(negative.kind, []).append(negative)
    kinds = list(by_kind)
    rng.shuffle(kinds)
    kinds.sort(key=lambda kind: kind == "colour")  # stable: the structural kinds keep their random order
    for kind in kinds:
        rng.shuffle(by_kind[kind])
    chosen: list[HardNegative] = []
    while len(chosen) < k and any(by_kind.values()):
        chosen += [by_kind[kind].pop() for kind in kinds if by_kind[kind]][:k - len(chosen)]
    return chosen


class HardNegativeShapes(Dataset):
    """A ShapesDataset whose items also hold "hard_negatives": `k` captions (a list of str; "" where the
    sample has fewer than k), chosen from (seed, split, index) alone, so a resumed or N-process run sees
    the same ones. The default collate turns the lists into k tuples of B captions (see train/contrastive.py)."""

    def __init__(self, shapes: ShapesDataset, k: int):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.shapes, self.k = shapes, k

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        shapes = self.shapes
        rng = random.Random(f"hard-negatives/{shapes.seed}/{shapes.split}/{index}")
        candidates = hard_negatives(shapes.sample(index), rng, allow_heldout=shapes.split != "train")
        captions = [negative.sample.caption for negative in choose_hard_negatives(candidates, self.k, rng)]
        return {**shapes[index], "hard_negatives": captions + [""] * (self.k - len(captions))}


# -- the changes ------------------------------------------------------------------------------------

def _recoloured(obj: ShapeObject, colour: str) -> ShapeObject:
    return replace(obj, colour=colour, rgb=COLOURS[colour])


def _changed_scenes(sample: ShapesSample):
    """(kind, scene) for each change that applies to `sample`; captions are filled in by the caller."""
    objects, kind = sample.objects, sample.kind
    if kind == "pair":
        a, b = objects
        if a.colour != b.colour:
            yield "colour_swap", replace(sample, objects=(_recoloured(a, b.colour), _recoloured(b, a.colour)))
        if sample.relation is not None:
            yield "relation_swap", replace(sample, relation=OPPOSITE_RELATION[sample.relation])
    if kind == "count":
        for n in (len(objects) - 1, len(objects) + 1):
            if n in COUNT_WORDS:
                yield "count", replace(sample, objects=(objects + objects[-1:])[:n])
    if kind == "single" and (mirrored := _mirrored(objects[0], sample.image_size)) is not None:
        yield "mirror", replace(sample, objects=(mirrored,))
    for colour in COLOURS:
        if kind == "pair":
            for i, obj in enumerate(objects):
                other = objects[1 - i]
                if colour != obj.colour and (colour, obj.shape) != (other.colour, other.shape):  # stays a pair
                    changed = list(objects)
                    changed[i] = _recoloured(obj, colour)
                    yield "colour", replace(sample, objects=tuple(changed))
        elif colour != objects[0].colour:
            yield "colour", replace(sample, objects=tuple(_recoloured(o, colour) for o in objects))


def _mirrored(obj: ShapeObject, image_size: int) -> ShapeObject | None:
    """The object mirrored left-right, or top-bottom if it is in the middle column; None in the centre."""
    row, col = divmod(REGIONS.index(obj.region), 3)
    x0, y0, x1, y1 = obj.box
    if col != 1:
        return replace(obj, region=REGIONS[row * 3 + 2 - col], box=(image_size - x1, y0, image_size - x0, y1))
    if row != 1:
        return replace(obj, region=REGIONS[(2 - row) * 3 + col], box=(x0, image_size - y1, x1, image_size - y0))
    return None


def _names_heldout(scene: ShapesSample) -> bool:
    """Whether a caption of `scene` names a held-out colour x shape pair or relation."""
    if any((o.colour, o.shape) in HELDOUT_COLOUR_SHAPES for o in scene.objects):
        return True
    if scene.relation is None:
        return False
    a, b = scene.objects
    return canonical_relation(a.shape, scene.relation, b.shape) in HELDOUT_RELATIONS
