"""Hard-negative captions (issue 15's first text-encoder lever): the scenes, the loss term, a tiny run."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from test_train_text_encoder import tiny_config
from torch.utils.data import DataLoader

from latentdiff.config import ConfigError, apply_overrides
from latentdiff.data.hard_negatives import (CHANGED_ATTRIBUTE, HARD_NEGATIVE_KINDS, HardNegativeShapes,
                                            changed_attributes, choose_hard_negatives, hard_negatives)
from latentdiff.data.shapes import (HELDOUT_COLOUR_SHAPES, HELDOUT_RELATIONS, ObjectSpec, ShapesDataset,
                                    canonical_relation, make_sample)
from latentdiff.data.shapes_captions import caption_sample
from latentdiff.data.shapes_fit import shapes_caption_fits, stated_checks
from latentdiff.train.contrastive import HardNegativeClipLoss, batch_hard_negatives
from latentdiff.train.text_encoder import TextEncoderTrainingConfig, train_text_encoder


def negatives_by_kind(sample) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for negative in hard_negatives(sample, allow_heldout=True):  # canonical wording
        out.setdefault(negative.kind, []).append(negative.sample.caption)
    return out


# -- the scenes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_each_hard_negative_differs_in_exactly_one_attribute(split):
    dataset, seen = ShapesDataset(split=split), set()
    for index in range(300):
        sample = dataset.sample(index)
        for kind, negative in hard_negatives(sample, random.Random(index), allow_heldout=split == "heldout"):
            seen.add(kind)
            assert changed_attributes(sample, negative) == {CHANGED_ATTRIBUTE[kind]}, (sample, negative)
            assert negative.caption != sample.caption
            assert caption_sample(negative) != caption_sample(sample)  # canonical wordings differ too
            assert not shapes_caption_fits(negative, sample), (sample.caption, negative.caption)  # never true
            if split == "train":  # as no train caption does, no negative names a held-out combination
                assert not any((o.colour, o.shape) in HELDOUT_COLOUR_SHAPES for o in negative.objects)
                if negative.relation:
                    a, b = negative.objects
                    assert canonical_relation(a.shape, negative.relation, b.shape) not in HELDOUT_RELATIONS
    assert seen == set(HARD_NEGATIVE_KINDS)


def test_each_kind_of_change_by_example():
    red_circle, blue_square = ObjectSpec("red", "circle"), ObjectSpec("blue", "square")
    pair = negatives_by_kind(make_sample("pair", [red_circle, blue_square], "above"))
    assert pair["colour_swap"] == ["a blue circle above a red square"]
    assert pair["relation_swap"] == ["a red circle below a blue square"]
    assert "a red circle above a green square" in pair["colour"] and "count" not in pair
    small = ObjectSpec("red", "circle", "small")
    assert negatives_by_kind(make_sample("count", [small] * 2))["count"] == ["three red circles"]
    assert negatives_by_kind(make_sample("count", [small] * 3))["count"] == ["two red circles"]
    corner = ObjectSpec("red", "circle", region="top left")
    assert negatives_by_kind(make_sample("single", [corner]))["mirror"] == ["a red circle in the top right"]
    top = ObjectSpec("red", "circle", region="top")
    assert negatives_by_kind(make_sample("single", [top]))["mirror"] == ["a red circle at the bottom"]
    assert "mirror" not in negatives_by_kind(make_sample("single", [ObjectSpec("red", "circle", region="center")]))


def test_a_negative_the_picture_still_fits_is_reworded_or_dropped():
    # "a blue circle and a red circle" is the same picture as "a red circle and a blue circle"
    circles = make_sample("pair", [ObjectSpec("red", "circle"), ObjectSpec("blue", "circle")])
    assert "colour_swap" not in negatives_by_kind(circles)
    # a mirrored single is only wrong where its caption says where: a random wording that does not is replaced
    single = make_sample("single", [ObjectSpec("red", "circle", region="left")])
    for seed in range(40):
        mirror = [n.sample for n in hard_negatives(single, random.Random(seed)) if n.kind == "mirror"]
        assert len(mirror) == 1 and stated_checks(mirror[0])[0], mirror[0].caption


def test_dataset_items_and_batches():
    shapes = ShapesDataset(length=16)
    dataset = HardNegativeShapes(shapes, 2)
    item = dataset[3]
    assert item["caption"] == shapes[3]["caption"] and torch.equal(item["image"], shapes[3]["image"])
    assert len(item["hard_negatives"]) == 2 and all(item["hard_negatives"])
    assert HardNegativeShapes(ShapesDataset(length=16), 2)[3]["hard_negatives"] == item["hard_negatives"]  # index alone
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    captions, valid = batch_hard_negatives(batch)
    assert captions[:2] == dataset[0]["hard_negatives"] and captions[6:] == dataset[3]["hard_negatives"]
    assert valid.shape == (4, 2) and valid.all()
    # more than a sample has: padded with "", which the loss leaves out
    many = next(iter(DataLoader(HardNegativeShapes(shapes, 60), batch_size=2)))
    captions, valid = batch_hard_negatives(many)
    assert valid.shape == (2, 60) and not valid.all() and valid[:, 0].all()
    assert all((c != "") == v for c, v in zip(captions, valid.flatten().tolist()))
    assert batch_hard_negatives({"caption": ["a", "b"]})[1].shape == (2, 0)


def test_few_negatives_go_to_the_structural_kinds():
    pair = make_sample("pair", [ObjectSpec("red", "circle"), ObjectSpec("blue", "square")], relation="above")
    negatives = hard_negatives(pair, random.Random(0), allow_heldout=True)  # every kind a pair has
    for seed in range(20):
        two = choose_hard_negatives(negatives, 2, random.Random(seed))
        assert sorted(n.kind for n in two) == ["colour_swap", "relation_swap"]
        four = choose_hard_negatives(negatives, 4, random.Random(seed))  # every kind, then more colour changes
        assert sorted(n.kind for n in four) == ["colour", "colour", "colour_swap", "relation_swap"]


# -- the loss -------------------------------------------------------------------------------------

def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


IMAGES = unit([1, 0, 0, 0], [0, 1, 0, 0])
TEXTS = unit([0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0])
SCALE = torch.tensor(10.0)


def test_hard_negative_term_grows_when_a_negative_looks_like_the_positive():
    loss = HardNegativeClipLoss()
    plain = ClipLoss()(IMAGES, TEXTS, SCALE)
    assert torch.allclose(loss(IMAGES, TEXTS, SCALE), plain)  # no negatives: CLIP's loss
    far = unit([0, 0, 1, 0], [0, 0, 0, 1]).unsqueeze(1)  # (B, K=1, P): nothing like either image
    same = torch.stack([TEXTS[0], far[1, 0]]).unsqueeze(1)  # image 0's negative equals its positive caption
    with_far, with_same = loss(IMAGES, TEXTS, SCALE, far), loss(IMAGES, TEXTS, SCALE, same)
    assert plain < with_far < with_same
    # a positive tied with its negative: image 0's row has one more column of the positive's value
    logits = SCALE * IMAGES @ TEXTS.T
    row0 = F.cross_entropy(torch.cat([logits[0], logits[0, :1]]), torch.tensor(0))
    row1 = F.cross_entropy(torch.cat([logits[1], (SCALE * IMAGES[1] @ far[1, 0]).view(1)]), torch.tensor(1))
    text_to_image = F.cross_entropy(logits.T, torch.arange(2))  # unchanged by the negatives
    torch.testing.assert_close(with_same, ((row0 + row1) / 2 + text_to_image) / 2)
    # a missing negative (valid False) is left out of the softmax
    valid = torch.tensor([[False], [False]])
    torch.testing.assert_close(loss(IMAGES, TEXTS, SCALE, same, valid), plain)


def test_under_two_processes_each_image_keeps_its_own_negatives(monkeypatch):
    """Two processes' local losses (features gathered, negatives local) average to one process's loss."""
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    negatives = F.normalize(torch.randn(4, 3, 8), dim=-1)
    valid = torch.tensor([[True, True, False]] * 4)
    whole = HardNegativeClipLoss()(images, texts, SCALE, negatives, valid)
    monkeypatch.setattr("open_clip.loss.gather_features", lambda *args, **kwargs: (images, texts))  # all processes'
    parts = [HardNegativeClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=2)(
        images[2 * rank:2 * rank + 2], texts[2 * rank:2 * rank + 2], SCALE,
        negatives[2 * rank:2 * rank + 2], valid[2 * rank:2 * rank + 2]) for rank in (0, 1)]
    torch.testing.assert_close(sum(parts) / 2, whole)


# -- training -------------------------------------------------------------------------------------

def test_training_with_hard_negatives_runs(tmp_path, monkeypatch):
    seen = []
    forward = HardNegativeClipLoss.forward

    def spy(self, image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
        seen.append((tuple(text_features.shape), tuple(negative_features.shape), negative_valid.sum().item()))
        return forward(self, image_features, text_features, logit_scale, negative_features, negative_valid)

    monkeypatch.setattr(HardNegativeClipLoss, "forward", spy)
    cfg = tiny_config("hard_negatives=2", "train.steps=2", "train.checkpoint_every=2", "train.sample_every=2")
    results = train_text_encoder(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file() and "t2i_top1" in results
    assert seen == [((8, 16), (8, 2, 16), 16)] * 2  # batch 8, embed_dim 16: two negatives per image, each step


def test_hard_negatives_need_the_shapes_data(tmp_path):
    with pytest.raises(ConfigError, match="hard_negatives"):
        apply_overrides(TextEncoderTrainingConfig(), {"data.source": str(tmp_path), "hard_negatives": 2})
    with pytest.raises(ConfigError, match="hard_negatives"):
        apply_overrides(TextEncoderTrainingConfig(), {"hard_negatives": -1})
