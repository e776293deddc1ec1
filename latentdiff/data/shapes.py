"""The built-in `shapes` dataset: captioned pictures of 1-3 flat-coloured shapes on white.

Sample i is a pure function of (seed, split, i, image size): nothing is stored, every image is
rendered on the fly (about a millisecond at 32x32) and keeps its ground truth (`ShapesSample`), so
evaluation can check what a generated image should contain.

A scene is laid out in unit coordinates (the image side is 1), turned into pixel boxes at the
rendered size, drawn 4x larger with PIL and box-filtered down, so edges are anti-aliased.

Held-out split: the colour x shape pairs in HELDOUT_COLOUR_SHAPES and the spatial relations in
HELDOUT_RELATIONS never appear in split="train" (not in captions, not in pixels); every sample of
split="heldout" contains at least one of them. A model trained on "train" and prompted with
"heldout" captions therefore measures compositional generalisation.

Two levers for compositions (issue 15), both off by default: `multi_object_weight` multiplies the odds
of the multi-object kinds (counts and pairs) against single objects, and `paraphrase` says a share of
the pairs the other way round ("A left of B" as "B right of A"), drawn from a random stream of its own
so that the pictures stay the same.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .images import pil_to_tensor
from .shapes_captions import REVERSED_RELATION, caption_sample
from .shapes_captions import paraphrase as paraphrase_caption

# Saturated colours, pairwise at least ~95 apart in RGB and none near the white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (245, 120, 0),
    "yellow": (235, 215, 0),
    "green": (30, 160, 50),
    "cyan": (0, 190, 210),
    "blue": (35, 70, 225),
    "purple": (130, 40, 200),
    "pink": (240, 85, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: dict[str, float] = {"small": 0.28, "large": 0.44}  # side of the object's box / image side
REGIONS = ("top left", "top", "top right",
           "left", "center", "right",
           "bottom left", "bottom", "bottom right")  # index = row * 3 + column
RELATIONS = ("above", "below", "left of", "right of")  # objects[0] <relation> objects[1]
KINDS: dict[str, float] = {"single": 0.45, "count": 0.2, "pair": 0.35}  # probability of each kind
SPLITS = ("train", "heldout")
BACKGROUND = (255, 255, 255)

# Never in split="train". Relations are canonical (only "above" and "left of"): "a square below a
# circle" is the same picture as "a circle above a square", so both are held out.
HELDOUT_COLOUR_SHAPES: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("green", "star"), ("yellow", "square"),
})
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "above", "square"), ("triangle", "left of", "star"), ("diamond", "above", "cross"),
})

P_PAIR_RELATION = 0.75  # pairs with a stated relation; the rest are "a X and a Y"
GAP = 0.04              # least empty space between two objects (unit coordinates)
CELL_MARGIN = 0.03      # object centres stay this far inside their grid cell, so regions are clear
SUPERSAMPLE = 4         # draw this many times larger, then box-filter down (anti-aliasing)
_TRIES = 30             # rejection-sampling attempts per object (and per generated sample)
_RESTARTS = 10          # fresh starts of a layout whose later objects found no room


@dataclass(frozen=True)
class ShapeObject:
    shape: str                          # one of SHAPES
    colour: str                         # one of COLOURS
    rgb: tuple[int, int, int]
    size: str                           # "small" or "large"
    region: str                         # one of REGIONS: the 3x3 cell holding the box centre
    box: tuple[int, int, int, int]      # (x0, y0, x1, y1) pixels at the sample's image_size, x1/y1 exclusive


@dataclass(frozen=True)
class ShapesSample:
    kind: str                           # "single", "count" or "pair"
    caption: str
    objects: tuple[ShapeObject, ...]    # in the order the caption names them
    relation: str | None = None         # pair only: objects[0] <relation> objects[1]; None for "X and Y"
    image_size: int = 32                # the boxes are in pixels of this size


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw, before layout: `make_sample` chooses where."""
    colour: str
    shape: str
    size: str = "large"
    region: str | None = None           # None: anywhere (ignored for pairs with a relation)


# ---------------------------------------------------------------------------------------------
# Ground-truth predicates
# ---------------------------------------------------------------------------------------------

def relation_holds(a: ShapeObject, relation: str, b: ShapeObject) -> bool:
    """Whether box a is wholly above / below / left of / right of box b."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return {"above": ay1 <= by0, "below": ay0 >= by1, "left of": ax1 <= bx0, "right of": ax0 >= bx1}[relation]


def canonical_relation(shape_a: str, relation: str, shape_b: str) -> tuple[str, str, str]:
    """(a below b) -> (b above a), (a right of b) -> (b left of a); others unchanged."""
    if relation == "below":
        return shape_b, "above", shape_a
    if relation == "right of":
        return shape_b, "left of", shape_a
    return shape_a, relation, shape_b


def is_heldout(sample: ShapesSample) -> bool:
    """Whether the sample shows a held-out colour x shape pair or a held-out relation (in pixels)."""
    if any((obj.colour, obj.shape) in HELDOUT_COLOUR_SHAPES for obj in sample.objects):
        return True
    for a in sample.objects:
        for b in sample.objects:
            for shape_a, relation, shape_b in HELDOUT_RELATIONS:
                if a.shape == shape_a and b.shape == shape_b and a is not b and relation_holds(a, relation, b):
                    return True
    return False


# ---------------------------------------------------------------------------------------------
# Layout: unit-coordinate centres -> pixel boxes
# ---------------------------------------------------------------------------------------------

def _pixel_side(size: str, image_size: int) -> int:
    return max(1, round(SIZES[size] * image_size))


def _cell_range(cell: int, half: float) -> tuple[float, float]:
    """Where a centre may go along one axis so it lies in grid cell `cell` and the box in the image."""
    return max(cell / 3 + CELL_MARGIN, half), min((cell + 1) / 3 - CELL_MARGIN, 1 - half)


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Boxes (cx, cy, half) separated by at least GAP along x or y."""
    reach = a[2] + b[2] + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _place_free(halves: list[float], regions: list[str | None], rng: random.Random):
    """Non-overlapping centres, each in its given region or a random one; None if none found.

    An early object can block the rest (three large shapes only fit in corners), so a failed
    layout is started over a few times before giving up.
    """
    for _ in range(_RESTARTS):
        placed: list[tuple[float, float, float]] = []
        for half, region in zip(halves, regions):
            for _ in range(_TRIES):
                row, col = divmod(REGIONS.index(region) if region else rng.randrange(9), 3)
                box = (rng.uniform(*_cell_range(col, half)), rng.uniform(*_cell_range(row, half)), half)
                if all(_apart(box, other) for other in placed):
                    placed.append(box)
                    break
            else:
                break
        if len(placed) == len(halves):
            return placed
    return None


def _place_related(half_a: float, relation: str, half_b: float, rng: random.Random):
    """Centres for a and b with a <relation> b, the relation's axis clearly dominant."""
    forward = relation in ("above", "left of")  # a comes first along the axis
    h1, h2 = (half_a, half_b) if forward else (half_b, half_a)
    need = h1 + h2 + GAP
    p = rng.uniform(h1, 1 - h2 - need)   # the earlier object along the axis
    q = rng.uniform(p + need, 1 - h2)    # the later one
    # Across the axis: offset less than the distance along it, so "above" does not look "left of".
    u = rng.uniform(h1, 1 - h1)
    v = min(max(u + rng.uniform(-0.7, 0.7) * (q - p), h2), 1 - h2)
    if relation in ("above", "below"):  # the axis is y: (x, y) = (across, along)
        first, second = (u, p), (v, q)
    else:
        first, second = (p, u), (q, v)
    a, b = (first, second) if forward else (second, first)
    return [(a[0], a[1], half_a), (b[0], b[1], half_b)]


def _to_object(spec: ObjectSpec, centre: tuple[float, float, float], image_size: int) -> ShapeObject:
    side = _pixel_side(spec.size, image_size)
    x0 = min(max(round(centre[0] * image_size - side / 2), 0), image_size - side)
    y0 = min(max(round(centre[1] * image_size - side / 2), 0), image_size - side)
    # The region is read back from the pixel box, so it is exactly what the image shows.
    col = min(2, int((x0 + side / 2) * 3 / image_size))
    row = min(2, int((y0 + side / 2) * 3 / image_size))
    return ShapeObject(spec.shape, spec.colour, COLOURS[spec.colour], spec.size, REGIONS[row * 3 + col],
                       (x0, y0, x0 + side, y0 + side))


def _check_spec(spec: ObjectSpec) -> None:
    for value, choices in ((spec.colour, tuple(COLOURS)), (spec.shape, SHAPES), (spec.size, tuple(SIZES))):
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    if spec.region is not None and spec.region not in REGIONS:
        raise ValueError(f"{spec.region!r} is not one of {', '.join(REGIONS)}")


def make_sample(kind: str, specs: Sequence[ObjectSpec], relation: str | None = None, *,
                image_size: int = 32, rng: random.Random | int | None = None) -> ShapesSample:
    """Lay out the given objects (in regions where given), then caption them.

    kind "single" takes 1 spec, "count" 2-3 identical specs, "pair" 2 different specs and an
    optional relation (objects[0] <relation> objects[1]). rng: a random.Random, an int seed, or
    None for seed 0 with the canonical caption.
    """
    specs = list(specs)
    for spec in specs:
        _check_spec(spec)
    counts = {"single": (1,), "count": (2, 3), "pair": (2,)}
    if kind not in counts or len(specs) not in counts[kind]:
        raise ValueError(f"kind {kind!r} cannot hold {len(specs)} objects")
    if kind == "count" and len({(s.colour, s.shape, s.size) for s in specs}) != 1:
        raise ValueError("a count sample needs identical objects")
    if kind == "pair" and (specs[0].colour, specs[0].shape) == (specs[1].colour, specs[1].shape):
        raise ValueError("a pair needs two different objects (that is a count)")
    if relation is not None and (kind != "pair" or relation not in RELATIONS):
        raise ValueError(f"relation {relation!r} needs kind 'pair' and one of {', '.join(RELATIONS)}")
    caption_rng = None if rng is None else rng
    layout_rng = rng if isinstance(rng, random.Random) else random.Random(rng or 0)

    halves = [_pixel_side(s.size, image_size) / (2 * image_size) for s in specs]
    if relation is not None:
        centres = _place_related(halves[0], relation, halves[1], layout_rng)
    else:
        centres = _place_free(halves, [s.region for s in specs], layout_rng)
    if centres is None:
        raise ValueError(f"cannot place {specs} without overlap")
    objects = tuple(_to_object(s, c, image_size) for s, c in zip(specs, centres))
    sample = ShapesSample(kind, "", objects, relation, image_size)
    return replace(sample, caption=caption_sample(sample, caption_rng))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def _star_points(x0: float, y0: float, x1: float, y1: float, inner: float = 0.48) -> list[tuple[float, float]]:
    """A five-pointed star, point up, as large as fits the box and centred in it."""
    radius = min((x1 - x0) / (2 * math.sin(math.radians(72))), (y1 - y0) / (1 + math.cos(math.radians(36))))
    cx = (x0 + x1) / 2
    cy = y0 + ((y1 - y0) - radius * (1 + math.cos(math.radians(36)))) / 2 + radius
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * inner
        angle = math.radians(-90 + 36 * k)
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                rgb: tuple[int, int, int]) -> None:
    """Fill `shape` into the inclusive pixel box (x0, y0, x1, y1) of the supersampled canvas."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif shape == "cross":
        arm = 0.18 * (x1 - x0)  # half the arm width: arms are 36% of the side, thick enough at 9 px
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=rgb)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=rgb)
    elif shape == "star":
        draw.polygon(_star_points(x0, y0, x1, y1), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_sample(sample: ShapesSample, size: int | None = None) -> Image.Image:
    """The sample as an RGB image, size x size (default: the sample's own image_size)."""
    size = size or sample.image_size
    scale = SUPERSAMPLE * size / sample.image_size
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in sample.objects:
        x0, y0, x1, y1 = (v * scale for v in obj.box)
        _draw_shape(draw, obj.shape, (x0, y0, x1 - 1, y1 - 1), obj.rgb)  # PIL boxes are inclusive
    return canvas.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Random samples and the dataset
# ---------------------------------------------------------------------------------------------

def _draw_colour_shape(rng: random.Random, allow_heldout: bool) -> tuple[str, str]:
    while True:
        pair = (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        if allow_heldout or pair not in HELDOUT_COLOUR_SHAPES:
            return pair


def _draw_specs(rng: random.Random, split: str, multi_object_weight: float = 1.0
                ) -> tuple[str, list[ObjectSpec], str | None]:
    """Random (kind, specs, relation). For "heldout", half the samples are pairs stating a held-out
    relation, the other half put a held-out colour x shape pair in the first object."""
    train = split == "train"
    heldout_relation = None if train or rng.random() < 0.5 else rng.choice(sorted(HELDOUT_RELATIONS))
    weights = tuple(p if kind == "single" else p * multi_object_weight for kind, p in KINDS.items())
    kind = "pair" if heldout_relation else rng.choices(tuple(KINDS), weights=weights)[0]
    if train or heldout_relation:
        first = _draw_colour_shape(rng, allow_heldout=not train)
    else:
        first = rng.choice(sorted(HELDOUT_COLOUR_SHAPES))
    size = rng.choice(tuple(SIZES))
    if kind == "single":
        return kind, [ObjectSpec(*first, size)], None
    if kind == "count":
        return kind, [ObjectSpec(*first, size)] * rng.choice((2, 3)), None

    second = _draw_colour_shape(rng, allow_heldout=not train)
    relation = rng.choice(RELATIONS) if rng.random() < P_PAIR_RELATION else None
    if heldout_relation:
        shape_a, relation, shape_b = heldout_relation
        if rng.random() < 0.5:  # say it either way round: "a square below a circle" is held out too
            shape_a, relation, shape_b = shape_b, REVERSED_RELATION[relation], shape_a
        first, second = (first[0], shape_a), (second[0], shape_b)  # held-out triples have two shapes
    while second == first:
        second = _draw_colour_shape(rng, allow_heldout=not train)
    return kind, [ObjectSpec(*first, size), ObjectSpec(*second, rng.choice(tuple(SIZES)))], relation


def generate_sample(seed: int, split: str, index: int, image_size: int = 32, *, paraphrase: float = 0.0,
                    multi_object_weight: float = 1.0) -> ShapesSample:
    """Sample `index` of the random stream (seed, split), laid out at image_size pixels; with probability
    `paraphrase` its caption is said another way (shapes_captions.paraphrase), and multi-object kinds
    are `multi_object_weight` times as likely against single objects as in KINDS."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rng = random.Random(f"shapes/{seed}/{split}/{index}")  # str seeds hash the same in every process
    for _ in range(_TRIES):
        kind, specs, relation = _draw_specs(rng, split, multi_object_weight)
        try:
            sample = make_sample(kind, specs, relation, image_size=image_size, rng=rng)
        except ValueError:  # no room for these objects: draw again
            continue
        if is_heldout(sample) == (split == "heldout"):
            if paraphrase > 0:  # a stream of its own: the layout and the default captions stay as they were
                said = random.Random(f"shapes/{seed}/{split}/{index}/paraphrase")
                if said.random() < paraphrase:
                    sample = paraphrase_caption(sample, said)
            return sample
    raise RuntimeError(f"no {split} sample found for index {index}")  # a bug, not bad input


class ShapesDataset(Dataset):
    """Captioned shapes, rendered on the fly: item i is {"image": (3, H, W) in [-1, 1], "caption": str}.
    paraphrase, multi_object_weight: the levers of `generate_sample` (off by default)."""

    def __init__(self, size: int = 32, length: int = 50_000, seed: int = 0, split: str = "train", *,
                 paraphrase: float = 0.0, multi_object_weight: float = 1.0):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.size, self.length, self.seed, self.split = size, length, seed, split
        self.levers = {"paraphrase": paraphrase, "multi_object_weight": multi_object_weight}

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> ShapesSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return generate_sample(self.seed, self.split, index % self.length, self.size, **self.levers)

    def render(self, index: int) -> Image.Image:
        return render_sample(self.sample(index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.sample(index)
        return {"image": pil_to_tensor(render_sample(sample)), "caption": sample.caption}
