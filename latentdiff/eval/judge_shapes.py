"""Naming an object's shape: its coverage map against each shape drawn by the dataset's own renderer.

`best_template` compares the map (soft IoU) with every shape, sharp and blurred, at a few box sides
and offsets around the object's half-coverage bounding box. On real renders the right sharp template
matches pixel for pixel; on generated pictures the blurred ones take over and the IoU degrades
gracefully. The best template's box gives the object's size and region exactly as the dataset
defines them (from the box, not the centroid, which sits low in a triangle).

Area overlap barely separates two pairs of shapes once generated pictures round them off: a cross
with lobes for arms against a diamond, a rounded square against a circle. Readers tell those apart
by the outline between the four tips, which `diagonal_reach` measures (how far the object reaches
along its diagonals over how far along its axes: cross < diamond < circle < square), so
`name_shape` lets it choose within each pair, against the reach of the two templates at the
object's own side and blur (on real renders the two agree).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..data.shapes import SHAPES, ShapeObject, ShapesSample, render_sample

# Pairs of shapes told apart by their diagonal reach rather than by area (see the module doc).
REACH_PAIRS = (("cross", "diamond"), ("circle", "square"))


def name_shape(cover: np.ndarray, box: tuple[int, int, int, int], slack: int, blurs: tuple[float, ...]):
    """(IoU, shape, template box, blur) for the object coverage map `cover` (H, W) with half-coverage
    bounding box `box`: the best template, its shape settled by diagonal reach within a REACH_PAIRS pair."""
    match, shape, tbox, blur = best_template(cover, box, slack, blurs)
    for pair in REACH_PAIRS:
        if shape in pair:
            reach, side = diagonal_reach(cover), tbox[2] - tbox[0]
            shape = min(pair, key=lambda other: abs(_template_reach(other, side, blur) - reach))
    return match, shape, tbox, blur


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


def best_template(cover: np.ndarray, box: tuple[int, int, int, int], slack: int, blurs: tuple[float, ...]):
    """Best (IoU, shape, template box, blur) for the object coverage map `cover` (H, W) with bounding box `box`.

    Tries every shape at sides from the box's longer side - 1 to + slack, each sharp and blurred, at
    every offset where the template box contains the bounding box give or take a pixel. Soft IoU =
    sum(min) / sum(max), computed as I / (|A| + |T| - I) with I taken only under the template.
    """
    x0, y0, x1, y1 = box
    longest = max(x1 - x0, y1 - y0)
    pad = longest + slack + 2 + max(math.ceil(2 * blur) for blur in blurs)
    padded = np.pad(cover, pad)
    total = cover.sum()
    best = (-1.0, SHAPES[0], box, 0.0)
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
                best = (float(iou[s, iy, ix]), SHAPES[s], (ox, oy, ox + side, oy + side), blur)
    return best


@lru_cache(maxsize=512)
def _template_reach(shape: str, side: int, blur: float) -> float:
    return diagonal_reach(np.pad(shape_template(shape, side, blur), 2))


def diagonal_reach(cover: np.ndarray) -> float:
    """How far an object reaches along the diagonals from its centre of coverage, over how far along the
    axes (each the coverage summed along the ray): about 0.77 for a diamond, 0.6 for a cross, 1 for a
    circle, drawn sharp at 32 px (more when blurred)."""
    ys, xs = np.indices(cover.shape)
    total = cover.sum()
    cy, cx = (cover * ys).sum() / total, (cover * xs).sum() / total
    step = 0.25  # pixels between samples along a ray
    steps = np.arange(0.0, float(max(cover.shape)), step)

    def reach(dy: float, dx: float) -> float:
        y, x = cy + dy * steps, cx + dx * steps
        inside = (y >= 0) & (x >= 0) & (y <= cover.shape[0] - 1) & (x <= cover.shape[1] - 1)
        y, x = y[inside], x[inside]
        y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
        y1, x1 = np.minimum(y0 + 1, cover.shape[0] - 1), np.minimum(x0 + 1, cover.shape[1] - 1)
        fy, fx = y - y0, x - x0
        values = (cover[y0, x0] * (1 - fy) * (1 - fx) + cover[y0, x1] * (1 - fy) * fx
                  + cover[y1, x0] * fy * (1 - fx) + cover[y1, x1] * fy * fx)
        return float(values.sum() * step)

    diagonal = np.mean([reach(dy / math.sqrt(2), dx / math.sqrt(2)) for dy in (-1, 1) for dx in (-1, 1)])
    axis = np.mean([reach(dy, dx) for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))])
    return diagonal / max(axis, 1e-9)
