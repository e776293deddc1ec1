"""What a `shapes` caption states, and which pictures it fits: facts about the captions and the ground
truth, read by the judge (eval/judge.py), the retrieval measure (eval/retrieval.py) and the hard
negatives (data/hard_negatives.py), which must never be a caption that also fits the picture."""
from __future__ import annotations

import itertools
import re

from .shapes import ShapesSample, relation_holds
from .shapes_captions import REGION_WORDS, SIZE_WORDS


def _mentions(caption: str, words) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", caption) for word in words)


def stated_checks(sample: ShapesSample) -> tuple[bool, bool]:
    """(position stated, size stated) by the sample's caption. Only single-object captions name a
    region; a caption built by hand with no text states everything."""
    if not sample.caption:
        return sample.kind == "single", True
    obj = sample.objects[0]
    position = sample.kind == "single" and _mentions(sample.caption, REGION_WORDS[obj.region][1])
    return position, _mentions(sample.caption, SIZE_WORDS[obj.size])


def shapes_caption_fits(described: ShapesSample, other: ShapesSample) -> bool:
    """Whether `other`'s picture shows all that `described`'s caption says (by both ground truths).

    "a green star" fits every picture of one green star; "a red circle above a blue square" fits
    "a blue square below a red circle"; "a yellow square on the left" fits a large or a small one.
    """
    if described.kind != other.kind or len(described.objects) != len(other.objects):
        return False
    position_stated, size_stated = stated_checks(described)
    if described.kind == "pair":
        named = [(o.colour, o.shape) for o in described.objects]
        if described.relation is None:
            return sorted(named) == sorted((o.colour, o.shape) for o in other.objects)
        return any([(a.colour, a.shape), (b.colour, b.shape)] == named and relation_holds(a, described.relation, b)
                   for a, b in itertools.permutations(other.objects))
    want, got = described.objects[0], other.objects[0]  # singles, and counts of identical objects
    return ((want.colour, want.shape) == (got.colour, got.shape) and (not size_stated or want.size == got.size)
            and (not position_stated or want.region == got.region))
