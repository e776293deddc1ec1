"""Does a CLIP text encoder read word order and binding, or only the bag of words?

    python scripts/text_twins.py --text-encoder DIR [--split heldout] [--samples 400]

For each shapes picture, its embedding meets its own canonical caption and, for every kind of hard
negative (data/hard_negatives.py), one twin caption exactly one attribute away: colours swapped between
the two objects, the relation reversed ("a circle above a square" -> "a circle below a square", the
picture of the two named the other way round), the count, the region mirrored, one colour changed. The
score per kind is the share of pictures whose embedding is closer to their own caption (ties count
against); 0.5 is chance. A bag-of-words encoder ties on the colour swap, however well it retrieves.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

from ..data.hard_negatives import HARD_NEGATIVE_KINDS, hard_negatives
from ..data.shapes import SPLITS, ShapesDataset
from ..data.shapes_captions import caption_sample
from ..eval_mode import in_eval_mode


@torch.no_grad()
def twin_preference(encoder, dataset: ShapesDataset, samples: int = 400, batch_size: int = 64) -> dict:
    """{kind: share of the first `samples` pictures closer to their own caption than to that kind's twin}
    over the kinds some picture has a twin of, and {"pictures": {kind: count}}."""
    wins, totals = Counter(), Counter()
    count = min(samples, len(dataset))
    with in_eval_mode(encoder):
        for start in range(0, count, batch_size):
            for kind, won in _batch_outcomes(encoder, dataset, range(start, min(count, start + batch_size))):
                totals[kind] += 1
                wins[kind] += won
    kinds = [kind for kind in HARD_NEGATIVE_KINDS if totals[kind]]
    return {**{kind: wins[kind] / totals[kind] for kind in kinds}, "pictures": {kind: totals[kind] for kind in kinds}}


def _batch_outcomes(encoder, dataset: ShapesDataset, indices: range) -> list[tuple[str, bool]]:
    """(kind, own caption strictly closer than the twin) for every twin of the pictures at `indices`."""
    truths = [dataset.sample(i) for i in indices]
    # the first twin of each kind (canonical wording, as the caption itself)
    twins = [{n.kind: n.sample.caption for n in reversed(hard_negatives(truth, allow_heldout=True))}
             for truth in truths]
    captions = [caption_sample(truth) for truth in truths]
    flat = [(row, kind, caption) for row, found in enumerate(twins) for kind, caption in found.items()]
    # unit vectors, as the encoder returns them: a dot product is the cosine
    images = encoder.image_embedding(torch.stack([dataset[i]["image"] for i in indices]))  # (N, P)
    texts = encoder.text_embedding(captions + [caption for _, _, caption in flat])        # (N + T, P)
    own = (images * texts[:len(captions)]).sum(-1)                                             # (N,)
    return [(kind, bool((images[row] * text).sum() < own[row]))
            for (row, kind, _), text in zip(flat, texts[len(captions):])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-encoder", required=True, help="trained text-encoder folder (with its image tower)")
    parser.add_argument("--split", default="heldout", choices=SPLITS)
    parser.add_argument("--samples", type=int, default=400, help="pictures of the split, in order")
    parser.add_argument("--seed", type=int, default=0, help="the shapes data seed")
    parser.add_argument("--size", type=int, default=32, help="the pictures' side, pixels (the tower resizes them)")
    args = parser.parse_args(argv)
    from ..models.text_encoder import TextEncoder  # torch models: not for --help

    encoder = TextEncoder.from_pretrained(args.text_encoder)
    if not encoder.has_image_tower:
        print(f"{args.text_encoder}: no image tower to compare captions with", file=sys.stderr)
        return 2
    dataset = ShapesDataset(size=args.size, length=args.samples, seed=args.seed, split=args.split)
    scores = twin_preference(encoder, dataset, args.samples)
    print(f"| twin ({args.split}, {args.samples} pictures) | own caption closer | pictures |\n|---|---|---|")
    for kind, n in scores["pictures"].items():
        print(f"| {kind} | {scores[kind]:.3f} | {n} |")
    return 0
