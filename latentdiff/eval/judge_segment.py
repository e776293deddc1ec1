"""Finding the objects in a `shapes` picture: ink pixels -> components -> objects -> colour and shape.

A rendered pixel is a blend of one palette colour c and the white background, p = a*c + (1-a)*white,
where a is the fraction of the pixel the shape covers (renders are box-filtered from a 4x canvas).
So `white - p` points from white toward c: its direction names the colour (by angle, which holds
even for faint anti-aliased edge pixels) and its length along `white - c` is the coverage a.

Components are the 8-connected regions of inked pixels (coverage >= 0.45 toward some palette
colour: high enough that a blurred one-pixel gap still parts two objects), whatever their hue, since
a generated object often mixes two colours and the pixels where they blend are of neither. Each
component is then explained as one object or several touching ones: cut whole, by colour, or along
its valleys (faint seams, narrow necks), every part is given its best template (judge_shapes) and
the cut whose templates redraw the component's coverage best wins, each extra object charged a
little (`split_cost`): two touching objects pay for themselves, a blotch inside one does not.

An object's colour is the coverage-weighted majority of its pixels clearly of one palette colour.
It also answers to the neighbouring hue it shades into when it sits midway between the two (amber,
between orange and yellow, which readers call either), and to no colour when a distant hue holds a
large share of it (a green square half pink). A tinted picture is first white-balanced on its
background.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data.shapes import BACKGROUND, COLOURS, REGIONS, SIZES
from .judge_shapes import name_shape, shape_template

_NAMES = tuple(COLOURS)
_WHITE = np.array(BACKGROUND, dtype=np.float64)
_INKS = np.array([_WHITE - np.array(rgb) for rgb in COLOURS.values()])  # (8, 3): white -> each colour
_INK_NORMS = np.linalg.norm(_INKS, axis=1)                                 # (8,)
# Boxes at least this large (fraction of the image side) are "large": halfway between the two sizes.
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
_MIN_BACKGROUND = 160.0  # white balance only when the background is at least this light in every channel
_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
# Palette neighbours around the hue circle: a generated object often shades from one into the other
# (a "yellow" drawn amber, between yellow and orange); any other second colour is a blotch.
_HUE_NEIGHBOURS = {frozenset(pair) for pair in (("red", "orange"), ("orange", "yellow"), ("cyan", "blue"),
                                                 ("blue", "purple"), ("purple", "pink"), ("pink", "red"))}


@dataclass(frozen=True)
class SegmentConfig:
    ink_threshold: float = 0.45   # least coverage (toward the pixel's palette colour) for a pixel to be ink
    min_cos: float = 0.96         # least cosine of a pixel's ink with its colour's to count for the colour (grey: 0.95)
    min_area: float = 0.008       # least total coverage of an object, as a fraction of the image area
    split_share: float = 0.15     # a second colour holding this share of a component offers a cut by colour
    side_slack: int = 2           # template sides tried: bounding-box side - 1 ... + side_slack
    rim: int = 2                  # pixels around an object's ink whose faint coverage still counts as its own
    blurs: tuple[float, ...] = (0.0, 0.6, 1.2)  # Gaussian blurs (sigma, pixels) of the templates tried
    split_cost: float = 0.01      # what one more object must save in redrawing error, as a share of the image
    core_levels: tuple[float, ...] = (0.7, 0.85)  # coverage levels whose cores may part touching objects
    core_erosions: tuple[int, ...] = (1, 2)       # erosions (pixels) whose cores may part them
    min_core: int = 4             # least pixels of a core
    blotch_share: float = 0.35    # an object this much of a distant hue (not a neighbour) has no one colour
    shade_band: float = 0.08      # an object this close to midway between two neighbouring hues is either


@dataclass(frozen=True)
class DetectedObject:
    shape: str                          # one of SHAPES: the best-matching template (judge_shapes)
    colour: str                         # one of COLOURS: the coverage-weighted majority
    colours: tuple[str, ...]            # the names it answers to: its colour, and a palette neighbour
                                        # when it is shaded midway between the two (amber: orange or
                                        # yellow); none when blotched with a distant hue
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


def _colour_split(points: np.ndarray, label: np.ndarray, amount: np.ndarray, cos: np.ndarray,
                  config: SegmentConfig, min_area: float) -> list[np.ndarray] | None:
    """A component split by colour: each pixel to the nearest colour holding a real share, then each
    colour's pixels re-split by connectivity (two same-coloured pieces on either side of another object
    stay apart). None when one colour holds it all."""
    ys, xs = points[:, 0], points[:, 1]
    votes = np.bincount(label[ys, xs], weights=amount[ys, xs], minlength=len(_NAMES))  # (8,)
    major = [k for k in np.argsort(-votes) if votes[k] >= max(min_area, config.split_share * votes.sum())]
    if len(major) <= 1:
        return None
    owner = np.array(major)[cos[ys, xs][:, major].argmax(-1)]
    return [part for k in major for part in _pieces(points[owner == k], amount.shape)]


def _pieces(points: np.ndarray, shape: tuple[int, int]) -> list[np.ndarray]:
    """The connected pieces of a set of (y, x) points in an image of `shape`."""
    return connected_components(_mask(points, shape))


def _mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True at the (N, 2) (y, x) points."""
    mask = np.zeros(shape, dtype=bool)
    mask[points[:, 0], points[:, 1]] = True
    return mask


def _with_rim(mask: np.ndarray, ink: np.ndarray, rim: int) -> np.ndarray:
    """The mask and the faint pixels within `rim` of it that are no one's ink (`ink`: every inked pixel)."""
    return mask | (_grow(mask, rim) & ~ink)


def _geometric_splits(points: np.ndarray, amount: np.ndarray, config: SegmentConfig):
    """Splits of a component into touching objects along its valleys: the cores left when faint pixels
    (coverage below a level) or the outer pixels (erosion) are removed, each grown back over the
    component to the pixels nearest it. Yields each distinct split into two or more parts."""
    mask = _mask(points, amount.shape)
    cores_tried = []
    for level in config.core_levels:
        cores_tried.append(mask & (amount >= level))
    for steps in config.core_erosions:
        cores_tried.append(~_grow(~mask, steps))
    seen = set()
    for core in cores_tried:
        cores = [c for c in connected_components(core) if len(c) >= config.min_core]
        if len(cores) < 2:
            continue
        parts = _grow_back(cores, mask)
        # Cuts whose parts start at the same pixels count as one, the first found kept (levels and
        # erosions mostly find the same cut; telling near-equal cuts apart changed 1 audit verdict in 680).
        key = tuple(sorted(tuple(map(tuple, part[:1])) for part in parts))
        if key not in seen:
            seen.add(key)
            yield parts


def _grow_back(cores: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    """Every pixel of `mask` given to the core it is nearest to within the mask (8-neighbour steps)."""
    height, width = mask.shape
    owner = np.full((height, width), -1)
    frontier = []
    for i, core in enumerate(cores):
        owner[core[:, 0], core[:, 1]] = i
        frontier += [(int(y), int(x)) for y, x in core]
    while frontier:
        grown = []
        for y, x in frontier:
            for dy, dx in _NEIGHBOURS_8:
                v, u = y + dy, x + dx
                if 0 <= v < height and 0 <= u < width and mask[v, u] and owner[v, u] < 0:
                    owner[v, u] = owner[y, x]
                    grown.append((v, u))
        frontier = grown
    return [np.argwhere(owner == i) for i in range(len(cores))]


@dataclass(frozen=True)
class _Fit:
    points: np.ndarray     # (N, 2) the part's ink pixels
    cover: np.ndarray      # (H, W) its coverage map: its pixels and its faint rim
    match: float
    shape: str
    box: tuple[int, int, int, int]
    blur: float

    def drawn(self, height: int, width: int) -> np.ndarray:
        """The fitted template at its place, (H, W)."""
        side = self.box[2] - self.box[0]
        template = shape_template(self.shape, side, self.blur)  # (t, t): the box and the blur's reach around it
        t = template.shape[0]
        reach = (t - side) // 2
        canvas = np.zeros((height + 2 * t, width + 2 * t))  # a margin of t, so a box partly outside still fits
        top, left = t + self.box[1] - reach, t + self.box[0] - reach
        canvas[top: top + t, left: left + t] = template
        return canvas[t: t + height, t: t + width]


def _fit(points: np.ndarray, others: np.ndarray, amount: np.ndarray, config: SegmentConfig) -> _Fit:
    """The best template for the part made of `points`, its rim the faint pixels around it that are no
    one's ink (`others`: every ink pixel, (H, W) bool)."""
    cover = np.where(_with_rim(_mask(points, amount.shape), others, config.rim), amount, 0.0)
    # Half coverage marks a shape's edge whether sharp or blurred (a blur moves the faint rim outward).
    ys, xs = np.nonzero(cover >= 0.5) if (cover >= 0.5).any() else (points[:, 0], points[:, 1])
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    match, shape, tbox, blur = name_shape(cover, box, config.side_slack, config.blurs)
    return _Fit(points, cover, match, shape, tbox, blur)


def _explain(points: np.ndarray, ink: np.ndarray, amount: np.ndarray, label: np.ndarray, cos: np.ndarray,
             config: SegmentConfig, min_area: float) -> list[_Fit]:
    """The objects one ink component shows: of the ways to cut it (whole, by colour, along its valleys),
    the one whose templates redraw its coverage best, each cut charged `split_cost` of the image area
    (a blotch of another colour inside an object does not pay for itself; two touching objects do)."""
    height, width = amount.shape
    target = np.where(_with_rim(_mask(points, amount.shape), ink, config.rim), amount, 0.0)
    candidates = [[points]]
    by_colour = _colour_split(points, label, amount, cos, config, min_area)
    if by_colour is not None:
        candidates.append(by_colour)
    candidates += list(_geometric_splits(points, amount, config))
    best, best_cost = None, np.inf
    for parts in candidates:
        parts = [part for part in parts if amount[part[:, 0], part[:, 1]].sum() >= min_area / 2]
        if not parts:
            continue
        fits = [_fit(part, ink, amount, config) for part in parts]
        drawn = np.max([fit.drawn(height, width) for fit in fits], axis=0)
        cost = np.abs(drawn - target).sum() + config.split_cost * height * width * (len(fits) - 1)
        if cost < best_cost - 1e-9:
            best, best_cost = fits, cost
    return best or []


def _colour_names(points: np.ndarray, pixels: np.ndarray, label: np.ndarray, clear: np.ndarray,
                  config: SegmentConfig) -> tuple[str, tuple[str, ...]]:
    """An object's colour, the majority of its pixels clearly of one palette colour (`clear`: their
    coverage, 0 elsewhere) weighted by coverage, and the names it answers to: that colour, and the
    palette neighbour it shades into as well when its mean ink lies within `shade_band` of the midpoint
    between the two (by angle); none when a distant hue holds `blotch_share` of it."""
    ys, xs = points[:, 0], points[:, 1]
    weights = clear[ys, xs] if clear[ys, xs].sum() > 0 else np.ones(len(points))
    votes = np.bincount(label[ys, xs], weights=weights, minlength=len(_NAMES))  # (8,)
    major = int(votes.argmax())
    neighbours = [k for k in range(len(_NAMES)) if frozenset((_NAMES[major], _NAMES[k])) in _HUE_NEIGHBOURS]
    foreign = votes.sum() - votes[major] - votes[neighbours].sum()
    if foreign >= config.blotch_share * votes.sum():
        return _NAMES[major], ()
    if not neighbours:
        return _NAMES[major], (_NAMES[major],)
    pair = np.isin(label[ys, xs], (major, *neighbours)) & (weights > 0)
    mean_ink = (weights[pair, None] * (_WHITE - pixels[ys[pair], xs[pair]])).sum(0)
    if not mean_ink.any():
        return _NAMES[major], (_NAMES[major],)
    other = min(neighbours, key=lambda k: _angle(mean_ink, _INKS[k]))
    to_major, to_other = _angle(mean_ink, _INKS[major]), _angle(mean_ink, _INKS[other])
    if to_major < (0.5 - config.shade_band) * (to_major + to_other):
        return _NAMES[major], (_NAMES[major],)
    return _NAMES[major], (_NAMES[major], _NAMES[other])


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0)))


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
    label = cos.argmax(-1)                                               # (H, W) each pixel's colour
    amount = np.take_along_axis(coverage, label[..., None], -1)[..., 0]  # (H, W) its coverage toward it
    min_area = config.min_area * height * width
    # Objects are the components of every inked pixel, whatever its hue (where two colours of one
    # generated object blend, the pixel is of neither), holding enough ink clearly of a palette colour.
    body = coverage.max(-1) >= config.ink_threshold
    clear = np.where(ink, amount, 0.0)  # (H, W) coverage of the pixels clearly of their colour
    objects = []
    for component in connected_components(body):
        if clear[component[:, 0], component[:, 1]].sum() < min_area / 2:
            continue
        for fit in _explain(component, body, amount, label, cos, config, min_area):
            if fit.cover.sum() < min_area:
                continue
            colour, colours = _colour_names(fit.points, pixels, label, clear, config)
            side = fit.box[2] - fit.box[0]
            objects.append(DetectedObject(
                shape=fit.shape, colour=colour, colours=colours,
                size="large" if side >= _SIZE_SPLIT * width else "small",
                region=_region(fit.box, height, width), box=fit.box, area=float(fit.cover.sum()),
                match=fit.match))
    return sorted(objects, key=lambda obj: -obj.area)
