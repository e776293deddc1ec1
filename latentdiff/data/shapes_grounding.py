"""What the grounding loss of diffusion training needs from the shapes data (issue 15): where each object
the caption names lies in the picture, and which of the caption's tokens name it.

`ShapesGrounding` wraps a ShapesDataset; its items add
    object_masks (G, H, W) float  1 on the pixels of named object g (a count's objects are one), else 0
    object_spans (G, 2, 2) long   (start, end) characters of g's colour word and of its shape word; -1 pads
for G = GROUPS slots, the unused ones empty. `token_groups` turns the character spans into token
positions with the text encoder's own tokenizer; the latent cache stores both (train/latent_cache.py).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import pil_to_tensor
from .shapes import BACKGROUND, ShapeObject, ShapesDataset, ShapesSample, render_sample
from .shapes_captions import object_word_spans

GROUPS = 3  # slots per sample: the most objects a sample holds (a pair names 2, a count 1)


def object_mask(sample: ShapesSample, obj: ShapeObject) -> torch.Tensor:
    """(H, W) bool at the sample's size: the pixels at least half covered by `obj` (drawn alone, as rendered)."""
    pixels = np.asarray(render_sample(replace(sample, objects=(obj,))), dtype=np.int32)  # (H, W, 3)
    away = np.abs(pixels - BACKGROUND).sum(-1)
    full = np.abs(np.array(obj.rgb) - BACKGROUND).sum()
    return torch.from_numpy(away * 2 >= full)


def grounding_targets(sample: ShapesSample) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, H, W) float masks and (G, 2, 2) long spans of the objects `sample.caption` names, in its order."""
    size = sample.image_size
    masks = torch.zeros(GROUPS, size, size)
    spans = torch.full((GROUPS, 2, 2), -1, dtype=torch.long)
    named = object_word_spans(sample)
    for g, words in enumerate(named):
        spans[g] = torch.tensor(words)
    # a count names its objects once: all of them are that one phrase's object
    groups = [sample.objects] if sample.kind == "count" else [(obj,) for obj in sample.objects]
    for g, objects in enumerate(groups):
        for obj in objects:
            masks[g] = torch.maximum(masks[g], object_mask(sample, obj).float())
    return masks, spans


class ShapesGrounding(Dataset):
    """A ShapesDataset whose items also hold `object_masks` and `object_spans` (see the module doc)."""

    def __init__(self, dataset: ShapesDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset.sample(index)
        masks, spans = grounding_targets(sample)
        return {"image": pil_to_tensor(render_sample(sample)), "caption": sample.caption,
                "object_masks": masks, "object_spans": spans}


def token_groups(tokenize, captions: list[str], spans: torch.Tensor) -> torch.Tensor:
    """(B, L, G) bool: which token positions name object g, from (B, G, 2, 2) character spans.

    tokenize: the text encoder's, -> (ids, mask) of shape (B, L), start token first. A word's tokens are
    those that the caption cut after the word has and the caption cut before it lacks; this holds for
    tokenizers that split text into words first (CLIP's BPE), which is checked.
    """
    full_ids, full_mask = tokenize(captions)
    ends = full_mask.sum(1) - 1  # (B,) position of each caption's end token
    cuts, where = [], []
    for b, caption in enumerate(captions):
        for g, word in (spans[b] >= 0).all(-1).nonzero().tolist():
            start, end = spans[b, g, word].tolist()
            cuts += [caption[:start], caption[:end]]
            where.append((b, g))
    out = torch.zeros(*full_ids.shape, spans.shape[1], dtype=torch.bool)
    if not cuts:
        return out
    ids, mask = tokenize(cuts)
    before = mask.sum(1) - 1  # tokens of each cut before its end token, the start token included
    for i, (b, g) in enumerate(where):
        first, stop = int(before[2 * i]), min(int(before[2 * i + 1]), int(ends[b]))
        if not torch.equal(ids[2 * i + 1, 1:stop], full_ids[b, 1:stop]):
            raise ValueError(f"the tokenizer splits {captions[b]!r} differently when cut short; grounding needs "
                             f"word-level tokens")
        out[b, first:stop, g] = True
    return out
