"""Finding the objects in a `shapes` picture: ink pixels -> palette colour -> components -> shape.

A rendered pixel is a blend of one palette colour c and the white background, p = a*c + (1-a)*white,
where a is the fraction of the pixel the shape covers (renders are box-filtered from a 4x canvas).
So `white - p` points from white toward c: its direction names the colour (by angle, which holds
even for faint anti-aliased edge pixels) and its length along `white - c` is the coverage a.

Objects are 8-connected components of ink pixels (coverage >= 0.45: high enough that a blurred
one-pixel gap still parts two objects; the fainter rim is added back to each object's coverage
map). A component is coloured by its coverage-weighted majority colour, so a few off-hue pixels
(edges, generator noise) do not break it apart; only when a second colour holds a real share is it
split, for two differently coloured objects that touch. A tinted picture is first white-balanced
on its background.

The shape is found by template matching: the object's coverage map is compared (soft IoU) with each
shape drawn by the dataset's own renderer, sharp and blurred, at a few box sides and offsets around
the object's half-coverage bounding box. On real renders the right sharp template matches pixel for
pixel; on generated pictures the blurred ones take over and the soft IoU degrades gracefully. The
best template's box gives the object's size and region exactly as the dataset defines them (from
the box, not the centroid, which sits low in a triangle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from ..data.shapes import BACKGROUND, COLOURS, REGIONS, SHAPES, SIZES, ShapeObject, ShapesSample, render_sample

_NAMES = tuple(COLOURS)
_WHITE = np.array(BACKGROUND, dtype=np.float64)
_INKS = np.array([_WHITE - np.array(rgb) for rgb in COLOURS.values()])  # (8, 3): white -> each colour
_INK_NORMS = np.linalg.norm(_INKS, axis=1)                                 # (8,)
# Boxes at least this large (fraction of the image side) are "large": halfway between the two sizes.
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
_MIN_BACKGROUND = 160.0  # white balance only when the background is at least this light in every channel
_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
# Palette neighbours around the hue circle: a generated object often shades from one into the other
# (a "yellow" drawn amber, between yellow and orange), which is one object, not two touching ones.
_HUE_NEIGHBOURS = {frozenset(pair) for pair in (("red", "orange"), ("orange", "yellow"), ("cyan", "blue"),
                                                 ("blue", "purple"), ("purple", "pink"), ("pink", "red"))}


@dataclass(frozen=True)
class SegmentConfig:
    ink_threshold: float = 0.45   # least coverage (toward the pixel's palette colour) for a pixel to be ink
    min_cos: float = 0.96         # least cosine of a pixel's ink with its colour's (mid grey is 0.95 from green)
    min_area: float = 0.008       # least total coverage of an object, as a fraction of the image area
    split_share: float = 0.15     # a second colour holding this share of a component makes it two objects
    side_slack: int = 2           # template sides tried: bounding-box side - 1 ... + side_slack
    rim: int = 2                  # pixels around an object's ink whose faint coverage still counts as its own
    blurs: tuple[float, ...] = (0.0, 0.6, 1.2)  # Gaussian blurs (sigma, pixels) of the templates tried


@dataclass(frozen=True)
class DetectedObject:
    shape: str                          # one of SHAPES: the best-matching template
    colour: str                         # one of COLOURS: the coverage-weighted majority
    size: str                           # "small" or "large", from the template's side
    region: str                         # one of REGIONS: the 3x3 cell holding the template box's centre
    box: tuple[int, int, int, int]      # (x0, y0, x1, y1) of the best template, image pixels, x1/y1 exclusive
    area: float                         # total coverage, in pixels
    match: float                        # soft IoU of the object and its template, in [0, 1]


def image_to_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    """PIL image, (3, H, W) tensor in [-1, 1] or (H, W, 3) uint8 array -> (H, W, 3) float64 in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        pixels = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
        return pixels.permute(1, 2, 0).numpy().astype(np.float64)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {pixels.shape}")
    return pixels


def palette_coverage(pixels: np.ndarray, config: SegmentConfig = SegmentConfig()):
    """Per pixel: coverage toward every palette colour (H, W, 8), cosine of its ink with every palette
    colour's (H, W, 8), and the ink mask (H, W) of pixels clearly of their nearest colour by angle."""
    ink = _WHITE - pixels                                                # (H, W, 3)
    dots = ink @ _INKS.T                                                 # (H, W, 8)
    coverage = np.clip(dots / _INK_NORMS**2, 0.0, 1.0)
    cos = dots / (np.linalg.norm(ink, axis=-1, keepdims=True) * _INK_NORMS + 1e-9)
    label = cos.argmax(-1)
    own = np.take_along_axis(coverage, label[..., None], -1)[..., 0]
    best_cos = np.take_along_axis(cos, label[..., None], -1)[..., 0]
    return coverage, cos, (own >= config.ink_threshold) & (best_cos >= config.min_cos)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean (H, W) mask, each as an (N, 2) array of (y, x)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, members = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            members.append((y, x))
            for dy, dx in _NEIGHBOURS_8:
                v, u = y + dy, x + dx
                if 0 <= v < height and 0 <= u < width and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        components.append(np.array(members))
    return components


def _coloured_parts(points: np.ndarray, coverage: np.ndarray, cos: np.ndarray,
                    config: SegmentConfig, min_area: float) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """One component -> [(colour indices, points)]: one part, or one per colour holding a real share, or
    one object shaded between two neighbouring hues (its colour first: the one with more coverage)."""
    ys, xs = points[:, 0], points[:, 1]
    labels = cos[ys, xs].argmax(-1)
    weights = coverage[ys, xs, labels]
    votes = np.bincount(labels, weights=weights, minlength=len(_NAMES))  # (8,)
    major = [k for k in np.argsort(-votes)
             if votes[k] >= max(min_area, config.split_share * votes.sum())]
    if len(major) <= 1:
        return [((int(votes.argmax()),), points)]
    # Two colours touching: give each pixel to the nearest major colour by angle, then re-split by
    # connectivity, so two same-coloured pieces on either side of the other object stay apart.
    owner = np.array(major)[cos[ys, xs][:, major].argmax(-1)]
    parts = []
    for k in major:
        mine = points[owner == k]
        mask = np.zeros(cos.shape[:2], dtype=bool)
        mask[mine[:, 0], mine[:, 1]] = True
        parts += [(int(k), part) for part in connected_components(mask)]
    if _one_shaded_object(points, parts, major, coverage, config):
        return [(tuple(int(k) for k in major), points)]  # major is sorted by coverage, the larger first
    return [((k,), part) for k, part in parts]


def _own_match(points: np.ndarray, cover_of: np.ndarray, config: SegmentConfig) -> float:
    """Template IoU of the object made of `points` alone, with per-pixel coverage `cover_of` (H, W)."""
    cover = np.zeros(cover_of.shape)
    cover[points[:, 0], points[:, 1]] = cover_of[points[:, 0], points[:, 1]]
    box = (int(points[:, 1].min()), int(points[:, 0].min()), int(points[:, 1].max()) + 1, int(points[:, 0].max()) + 1)
    return _best_template(cover, box, config.side_slack, config.blurs)[0]


def _one_shaded_object(points: np.ndarray, parts: list[tuple[int, np.ndarray]], major: list[int],
                       coverage: np.ndarray, config: SegmentConfig) -> bool:
    """Whether a component split by colour is one object shaded between two neighbouring hues: the whole
    matches a shape at least as well as its colour parts do (two touching objects are two good shapes and
    a poor whole; a shaded one is a good whole of poor pieces)."""
    if len(major) != 2 or frozenset(_NAMES[k] for k in major) not in _HUE_NEIGHBOURS:
        return False
    whole = _own_match(points, coverage[..., major].max(-1), config)
    sizes = np.array([len(part) for _, part in parts], dtype=np.float64)
    pieces = np.array([_own_match(part, coverage[..., k], config) for k, part in parts])
    return whole >= float((pieces * sizes).sum() / sizes.sum())


@lru_cache(maxsize=2048)
def shape_template(shape: str, side: int, blur: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1] of `shape` filling a side-pixel box, drawn by the dataset's renderer:
    (side, side), or blurred by a Gaussian of `blur` pixels and padded by its reach on every side."""
    obj = ShapeObject(shape, "red", (0, 0, 0), "large", "center", (0, 0, side, side))
    drawn = np.asarray(render_sample(ShapesSample("single", "", (obj,), None, side)), dtype=np.float64)
    template = 1.0 - drawn.mean(-1) / 255.0
    if blur == 0:
        return template
    reach = math.ceil(2 * blur)
    kernel = np.exp(-0.5 * (np.arange(-reach, reach + 1) / blur) ** 2)
    kernel /= kernel.sum()
    template = np.pad(template, reach)
    template = np.apply_along_axis(np.convolve, 0, template, kernel, "same")
    return np.apply_along_axis(np.convolve, 1, template, kernel, "same")


@lru_cache(maxsize=2048)
def _template_stack(side: int, blur: float) -> tuple[np.ndarray, np.ndarray]:
    """Every shape's template at one side and blur, stacked (S, t + 2r, t + 2r), and their sums (S,)."""
    templates = np.stack([shape_template(shape, side, blur) for shape in SHAPES])
    return templates, templates.sum((-1, -2))


def _best_template(cover: np.ndarray, box: tuple[int, int, int, int], slack: int, blurs: tuple[float, ...]):
    """Best (IoU, shape, template box) for the object coverage map `cover` (H, W) with bounding box `box`.

    Tries every shape at sides from the box's longer side - 1 to + slack, each sharp and blurred, at
    every offset where the template box contains the bounding box give or take a pixel. Soft IoU =
    sum(min) / sum(max), computed as I / (|A| + |T| - I) with I taken only under the template.
    """
    x0, y0, x1, y1 = box
    longest = max(x1 - x0, y1 - y0)
    pad = longest + slack + 2 + max(math.ceil(2 * blur) for blur in blurs)
    padded = np.pad(cover, pad)
    total = cover.sum()
    best = (-1.0, SHAPES[0], box)
    for side in range(max(1, longest - 1), longest + slack + 1):
        # Template box origins (ox, oy): ox <= x0 + 1 and ox + side >= x1 - 1, likewise for y.
        oxs = np.arange(x1 - 1 - side, x0 + 2)
        oys = np.arange(y1 - 1 - side, y0 + 2)
        for blur in blurs:
            templates, sums = _template_stack(side, blur)                          # (S, t + 2r, t + 2r), (S,)
            reach = (templates.shape[-1] - side) // 2                              # r: the blur's margin
            windows = np.lib.stride_tricks.sliding_window_view(padded, templates.shape[1:])
            top, left = oys[0] + pad - reach, oxs[0] + pad - reach
            windows = windows[top: top + len(oys), left: left + len(oxs)]          # (Y, X, t + 2r, t + 2r)
            inter = np.minimum(windows[None], templates[:, None, None]).sum((-1, -2))  # (S, Y, X)
            iou = inter / (total + sums[:, None, None] - inter + 1e-9)
            s, iy, ix = np.unravel_index(iou.argmax(), iou.shape)
            if iou[s, iy, ix] > best[0] + 1e-9:  # ties keep what was found first: smaller, sharper
                ox, oy = int(oxs[ix]), int(oys[iy])
                best = (float(iou[s, iy, ix]), SHAPES[s], (ox, oy, ox + side, oy + side))
    return best


def _region(box: tuple[int, int, int, int], height: int, width: int) -> str:
    col = min(2, max(0, int((box[0] + box[2]) / 2 * 3 / width)))
    row = min(2, max(0, int((box[1] + box[3]) / 2 * 3 / height)))
    return REGIONS[row * 3 + col]


def white_balance(pixels: np.ndarray) -> np.ndarray:
    """Scale each channel so the background (median of the brightest fifth of the pixels) is white.

    Renders are untouched; a generator that tints the whole picture gets its palette back.
    """
    brightness = pixels.sum(-1)  # objects may cover more than half the picture, not the brightest fifth
    background = np.median(pixels[brightness >= np.percentile(brightness, 80)], axis=0)  # (3,)
    if background.min() < _MIN_BACKGROUND:  # no light background to go by: leave the picture be
        return pixels
    return np.clip(pixels * (_WHITE / np.maximum(background, 1.0)), 0.0, 255.0)


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask grown by `steps` pixels (8-neighbourhood)."""
    height, width = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = np.any([padded[1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0)
    return mask


def detect_objects(image: Image.Image | torch.Tensor | np.ndarray,
                   config: SegmentConfig = SegmentConfig()) -> list[DetectedObject]:
    """The objects in a shapes picture, largest first."""
    pixels = white_balance(image_to_array(image))
    height, width = pixels.shape[:2]
    coverage, cos, ink = palette_coverage(pixels, config)
    min_area = config.min_area * height * width
    parts = []
    for component in connected_components(ink):
        parts += [(hues, points) for hues, points in _coloured_parts(component, coverage, cos, config, min_area)
                  if coverage[points[:, 0], points[:, 1], hues[0]].sum() >= min_area / 2]

    owner = np.full((height, width), -1)  # which part each ink pixel belongs to
    for i, (_, points) in enumerate(parts):
        owner[points[:, 0], points[:, 1]] = i
    objects = []
    for i, (hues, points) in enumerate(parts):
        k = hues[0]
        # The object's coverage map: its own pixels and the faint rim around them (edge pixels below
        # the ink threshold, or blurred), but never pixels that belong to another object.
        mine = owner == i
        keep = mine | (_grow(mine, config.rim) & (owner == -1))
        cover = np.where(keep, coverage[..., list(hues)].max(-1), 0.0)  # one hue, or a shaded object's two
        if cover.sum() < min_area:
            continue
        # Half coverage marks a shape's edge whether sharp or blurred (a blur moves the faint rim outward).
        ys, xs = np.nonzero(cover >= 0.5) if (cover >= 0.5).any() else (points[:, 0], points[:, 1])
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        match, shape, tbox = _best_template(cover, box, config.side_slack, config.blurs)
        side = tbox[2] - tbox[0]
        objects.append(DetectedObject(
            shape=shape, colour=_NAMES[k], size="large" if side >= _SIZE_SPLIT * width else "small",
            region=_region(tbox, height, width), box=tbox, area=float(cover.sum()), match=match))
    return sorted(objects, key=lambda obj: -obj.area)
