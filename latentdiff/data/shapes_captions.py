"""Captions for the `shapes` dataset: word tables (synonyms) and templates.

Captions vary in wording so a text encoder learns the meaning, not one fixed sentence: each
attribute has a few synonyms and each kind of sample a few templates. Only unambiguous synonyms
are used ("disk" for circle is fine, "light blue" for cyan is not). The first entry of every table
is the canonical word, which `caption_sample(sample)` without an rng always uses.

Two training levers (issue 15) read the same tables: `paraphrase` says a pair the other way round
("a red circle left of a blue square" -> "a blue square right of a red circle"), and
`object_word_spans` finds each named object's colour and shape words, for the grounding loss.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: shapes.py imports this module
    from .shapes import ShapeObject, ShapesSample

# Colour name -> words for it.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "cyan": ("cyan",),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
}

# Shape name -> (singular, plural) words for it.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disk", "disks")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "star": (("star", "stars"),),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "large": ("large", "big"),
}

# Region of the 3x3 grid -> (preposition, words). "in the top left", "at the top", "on the left".
REGION_WORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "top left": ("in the", ("top left", "upper left")),
    "top": ("at the", ("top",)),
    "top right": ("in the", ("top right", "upper right")),
    "left": ("on the", ("left",)),
    "center": ("in the", ("center", "middle")),
    "right": ("on the", ("right",)),
    "bottom left": ("in the", ("bottom left", "lower left")),
    "bottom": ("at the", ("bottom",)),
    "bottom right": ("in the", ("bottom right", "lower right")),
}

# Relation between the first and second object named in a pair caption.
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
# The same relation seen from the other object: "a above b" is "b below a".
REVERSED_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}

COUNT_WORDS: dict[int, tuple[str, ...]] = {
    2: ("two", "a pair of"),
    3: ("three",),
}

# How often optional parts appear in a sampled caption.
P_SINGLE_POSITION = 0.75   # single objects: name the region
P_SINGLE_SIZE = 0.35       # single objects: name the size
P_SHORT_FORM = 0.25        # single objects with a region: "red circle, upper left"
P_COUNT_SIZE = 0.2         # counts: "three small red circles"


def caption_sample(sample: ShapesSample, rng: random.Random | int | None = None) -> str:
    """A caption for `sample`; with rng=None the canonical one, else a template drawn from rng.

    Canonical captions: "a red circle in the top left", "two red circles",
    "a red circle above a green triangle", "a red circle and a green triangle".
    """
    if isinstance(rng, int):
        rng = random.Random(rng)
    if sample.kind == "single":
        return _caption_single(sample.objects[0], rng)
    if sample.kind == "count":
        return _caption_count(sample.objects, rng)
    if sample.kind == "pair":
        first, second = (_noun_phrase(obj, rng) for obj in sample.objects)
        if sample.relation is None:
            return f"{first} and {second}"
        return f"{first} {_pick(RELATION_WORDS[sample.relation], rng)} {second}"
    raise ValueError(f"unknown sample kind {sample.kind!r}")


def _pick(options: tuple, rng: random.Random | None):
    return options[0] if rng is None else rng.choice(options)


def _chance(p: float, rng: random.Random | None, canonical: bool) -> bool:
    return canonical if rng is None else rng.random() < p


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: ShapeObject, rng: random.Random | None, size: bool = False) -> str:
    """'a red circle', or 'a small red circle' when size is asked for."""
    words = [_pick(COLOUR_WORDS[obj.colour], rng), _pick(SHAPE_WORDS[obj.shape], rng)[0]]
    if size:
        words.insert(0, _pick(SIZE_WORDS[obj.size], rng))
    return with_article(" ".join(words))


def _caption_single(obj: ShapeObject, rng: random.Random | None) -> str:
    with_size = _chance(P_SINGLE_SIZE, rng, canonical=False)
    phrase = _noun_phrase(obj, rng, size=with_size)
    if not _chance(P_SINGLE_POSITION, rng, canonical=True):
        return phrase
    preposition, names = REGION_WORDS[obj.region]
    region = _pick(names, rng)
    if _chance(P_SHORT_FORM, rng, canonical=False):
        return f"{phrase.split(' ', 1)[1]}, {region}"  # "red circle, upper left": no article
    return f"{phrase} {preposition} {region}"


def _caption_count(objects: tuple[ShapeObject, ...], rng: random.Random | None) -> str:
    obj = objects[0]
    words = [_pick(COUNT_WORDS[len(objects)], rng)]
    if _chance(P_COUNT_SIZE, rng, canonical=False):
        words.append(_pick(SIZE_WORDS[obj.size], rng))
    words += [_pick(COLOUR_WORDS[obj.colour], rng), _pick(SHAPE_WORDS[obj.shape], rng)[1]]
    return " ".join(words)


def paraphrase(sample: ShapesSample, rng: random.Random) -> ShapesSample:
    """The same scene, its caption said another way that states exactly as much: a pair names its
    objects the other way round (a stated relation reversed, "X and Y" as "Y and X"), with words
    drawn afresh from rng. Singles and counts come back unchanged: a fresh draw of their templates
    could drop or add a region or a size, which is not the same statement."""
    if sample.kind != "pair":
        return sample
    relation = None if sample.relation is None else REVERSED_RELATION[sample.relation]
    swapped = replace(sample, objects=sample.objects[::-1], relation=relation)
    return replace(swapped, caption=caption_sample(swapped, rng))


def object_word_spans(sample: ShapesSample) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) character spans of the colour word and the shape word of each object the caption
    names, in order (a count's objects are named once). Every template says colour, then shape, object
    by object, so each is the first of its words after the previous object's."""
    named = sample.objects[:1] if sample.kind == "count" else sample.objects
    spans, cursor = [], 0
    for obj in named:
        colour = _find_word(sample.caption, COLOUR_WORDS[obj.colour], cursor)
        shape = _find_word(sample.caption, [w for forms in SHAPE_WORDS[obj.shape] for w in forms], colour[1])
        spans.append((colour, shape))
        cursor = shape[1]
    return spans


def _find_word(text: str, words, start: int) -> tuple[int, int]:
    found = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b").search(text, start)
    if found is None:
        raise ValueError(f"none of {list(words)} after character {start} of {text!r}")
    return found.span()
