"""The shapes data levers of issue 15: paraphrased pair captions, oversampled multi-object scenes, and the
word spans the grounding loss reads. Off by default, where the data is what it always was."""
import hashlib
import re

import pytest
import torch

from latentdiff.data import ShapesDataset, build_dataset
from latentdiff.data.shapes import (
    KINDS,
    generate_sample,
    is_heldout,
    relation_holds,
    render_sample,
)
from latentdiff.data.shapes_captions import (
    COLOUR_WORDS,
    RELATION_WORDS,
    REVERSED_RELATION,
    SHAPE_WORDS,
    object_word_spans,
)
from latentdiff.data.sources import DataConfig
from latentdiff.errors import ConfigError
from latentdiff.eval.judge import judge_image

# repr() of samples 0..199 of seed 0 at 32 px, as generated before the levers existed
DIGESTS = {"train": "ee40bdb98942ff65", "heldout": "41f46c227afb7d6a"}


def digest(samples) -> str:
    h = hashlib.sha256()
    for sample in samples:
        h.update(repr(sample).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_defaults_leave_every_sample_as_it_was(split):
    assert digest(generate_sample(0, split, i, 32) for i in range(200)) == DIGESTS[split]
    dataset = build_dataset(DataConfig(), split)
    assert digest(dataset.sample(i) for i in range(200)) == DIGESTS[split]


def test_paraphrase_says_the_same_pair_the_other_way_round():
    plain, said = ShapesDataset(size=32), ShapesDataset(size=32, paraphrase=1.0)
    pairs = 0
    for i in range(120):
        a, b = plain.sample(i), said.sample(i)
        if a.kind != "pair":
            assert b == a  # singles and counts have no exact paraphrase: unchanged
            continue
        pairs += 1
        assert b.objects == a.objects[::-1] and b.caption != a.caption
        if a.relation is None:
            assert b.relation is None and " and " in b.caption
        else:
            assert b.relation == REVERSED_RELATION[a.relation]
            assert relation_holds(b.objects[0], b.relation, b.objects[1])
            assert any(f" {w} " in b.caption for w in RELATION_WORDS[b.relation])
        # the caption names the first object first
        spans = object_word_spans(b)
        assert spans[0][1][1] <= spans[1][0][0]
        # the same picture, and the judge finds everything the new caption says in it
        assert torch.equal(plain[i]["image"], said[i]["image"])
        if pairs <= 25:
            assert judge_image(render_sample(b), b, strict=True).overall, b.caption
    assert pairs > 25


def test_paraphrase_share_and_determinism():
    said = ShapesDataset(size=32, paraphrase=0.5, length=1000)
    again = ShapesDataset(size=32, paraphrase=0.5, length=1000)
    pairs = [i for i in range(600) if generate_sample(0, "train", i).kind == "pair"]
    changed = [generate_sample(0, "train", i).caption != said.sample(i).caption for i in pairs]
    assert sum(changed) / len(changed) == pytest.approx(0.5, abs=0.1)
    assert all(said.sample(i) == again.sample(i) for i in pairs[:50])
    heldout = ShapesDataset(size=32, split="heldout", paraphrase=1.0)
    assert all(is_heldout(heldout.sample(i)) for i in range(50))  # a reversed held-out relation is still one


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_multi_object_weight_sets_the_share_of_multi_object_scenes(weight):
    dataset = ShapesDataset(size=32, multi_object_weight=weight, length=2000)
    multi = sum(dataset.sample(i).kind != "single" for i in range(1200)) / 1200
    odds = (1 - KINDS["single"]) * weight
    assert multi == pytest.approx(odds / (KINDS["single"] + odds), abs=0.05)


def test_levers_are_config_switches_for_the_train_split():
    cfg = DataConfig(paraphrase=1.0, multi_object_weight=4.0)
    assert build_dataset(cfg, "train").levers == {"paraphrase": 1.0, "multi_object_weight": 4.0}
    assert digest(build_dataset(cfg, "heldout").sample(i) for i in range(200)) == DIGESTS["heldout"]
    for bad in ({"paraphrase": 1.5}, {"multi_object_weight": 0.0}, {"source": "photos/", "paraphrase": 0.5}):
        with pytest.raises(ConfigError):
            DataConfig(**bad)


def test_word_spans_name_each_object():
    dataset = ShapesDataset(size=32, paraphrase=0.5)
    for i in range(400):
        sample = dataset.sample(i)
        spans = object_word_spans(sample)
        named = sample.objects[:1] if sample.kind == "count" else sample.objects
        assert len(spans) == len(named)
        for obj, ((c0, c1), (s0, s1)) in zip(named, spans):
            assert sample.caption[c0:c1] in COLOUR_WORDS[obj.colour]
            assert sample.caption[s0:s1] in {w for forms in SHAPE_WORDS[obj.shape] for w in forms}
            assert c1 < s0 and re.fullmatch(r"[a-z ]*", sample.caption[c1:s0])  # colour, then its shape
