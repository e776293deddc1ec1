"""The built-in shapes dataset: determinism, ground truth, captions, held-out split."""
import itertools
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from latentdiff.data import ShapesDataset, build_dataset
from latentdiff.data.shapes import (
    COLOURS,
    HELDOUT_COLOUR_SHAPES,
    HELDOUT_RELATIONS,
    KINDS,
    REGIONS,
    SHAPES,
    ObjectSpec,
    canonical_relation,
    generate_sample,
    is_heldout,
    make_sample,
    relation_holds,
    render_sample,
)
from latentdiff.data.shapes_captions import (
    COLOUR_WORDS,
    COUNT_WORDS,
    REGION_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    caption_sample,
)
from latentdiff.data.sources import DataConfig


def has_word(caption: str, words) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", caption) for w in words)


def check_ground_truth(sample, image: np.ndarray) -> None:
    """Everything a sample claims is visible in its pixels and said by its caption."""
    size = sample.image_size
    assert image.shape == (size, size, 3)
    caption = sample.caption
    for obj in sample.objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        # The box centre is inside every shape, so its pixel has the object's colour exactly.
        centre = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
        assert np.abs(centre - np.array(obj.rgb)).max() <= 6, (sample, centre)
        col, row = min(2, 3 * (x0 + x1) // (2 * size)), min(2, 3 * (y0 + y1) // (2 * size))
        assert obj.region == REGIONS[row * 3 + col]
        assert has_word(caption, COLOUR_WORDS[obj.colour])
        plural = sample.kind == "count"
        assert has_word(caption, [words[plural] for words in SHAPE_WORDS[obj.shape]]), caption
    for a, b in itertools.combinations(sample.objects, 2):
        assert any(relation_holds(a, rel, b) for rel in ("above", "below", "left of", "right of")), "overlap"

    if sample.kind == "single":
        obj = sample.objects[0]
        preposition, names = REGION_WORDS[obj.region]
        said_region = any(caption.endswith((f" {preposition} {n}", f", {n}")) for n in names)
        said_nothing = any(caption.endswith(words[0]) for words in SHAPE_WORDS[obj.shape])
        assert said_region or said_nothing, caption  # a region, if named, is the right one
    elif sample.kind == "count":
        assert len({(o.colour, o.shape, o.size) for o in sample.objects}) == 1
        assert has_word(caption, COUNT_WORDS[len(sample.objects)])
    else:
        a, b = sample.objects
        assert (a.colour, a.shape) != (b.colour, b.shape)
        if sample.relation is None:
            assert " and " in caption
        else:
            assert relation_holds(a, sample.relation, b)
            assert has_word(caption, RELATION_WORDS[sample.relation])


def test_same_seed_same_samples_other_seed_differs():
    a, b, other = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    for i in range(20):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        assert x["image"].shape == (3, 32, 32) and x["image"].dtype == torch.float32
        assert x["image"].min() >= -1 and x["image"].max() == 1  # white background is exactly 1
    differing = sum(a.sample(i).caption != other.sample(i).caption for i in range(20))
    assert differing >= 15


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ground_truth_in_pixels_and_caption(size):
    dataset = ShapesDataset(size=size, seed=1)
    for i in range(60 if size < 128 else 25):
        sample = dataset.sample(i)
        assert sample.image_size == size
        check_ground_truth(sample, np.asarray(render_sample(sample)))


def test_many_layouts_are_valid_without_rendering():
    """Ground truth over many samples, checked on a cheap image holding just the centre pixels."""
    for i in range(1500):
        sample = generate_sample(0, "train", i)
        image = np.full((32, 32, 3), 255, dtype=np.uint8)
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            image[(y0 + y1) // 2, (x0 + x1) // 2] = obj.rgb
        check_ground_truth(sample, image)


def test_kind_mix_and_caption_variety():
    samples = [generate_sample(0, "train", i) for i in range(2000)]
    kinds = Counter(s.kind for s in samples)
    for kind, p in KINDS.items():
        assert abs(kinds[kind] / len(samples) - p) < 0.06, kinds
    assert {len(s.objects) for s in samples if s.kind == "count"} == {2, 3}
    pairs = [s for s in samples if s.kind == "pair"]
    assert {s.relation for s in pairs} == {None, "above", "below", "left of", "right of"}
    captions = " | ".join(s.caption for s in samples)
    for synonym in ("disk", "violet", "upper left", "middle", "a pair of", "big", "beneath", ", "):
        assert synonym in captions
    assert "an orange" in captions and "a orange" not in captions
    assert len({s.caption for s in samples}) > 1000


def test_heldout_split_is_disjoint_from_train():
    train = [generate_sample(0, "train", i) for i in range(2500)]
    heldout = [generate_sample(0, "heldout", i) for i in range(2500)]
    assert not any(is_heldout(s) for s in train)
    assert all(is_heldout(s) for s in heldout)
    seen = set()
    for s in heldout:
        seen |= {(o.colour, o.shape) for o in s.objects} & HELDOUT_COLOUR_SHAPES
        if s.relation is not None:
            seen |= {canonical_relation(s.objects[0].shape, s.relation, s.objects[1].shape)} & HELDOUT_RELATIONS
    assert seen == HELDOUT_COLOUR_SHAPES | HELDOUT_RELATIONS  # every held-out combination is shown
    train_captions = {s.caption for s in train}
    assert not train_captions & {s.caption for s in heldout}


def test_is_heldout_sees_relations_in_pixels_even_when_unsaid():
    spec_circle, spec_square = ObjectSpec("red", "circle", "small"), ObjectSpec("green", "square", "small")
    said = make_sample("pair", [spec_square, spec_circle], "below")  # == circle above square
    assert is_heldout(said)
    unsaid = make_sample("pair", [ObjectSpec("red", "circle", "small", "top"),
                                  ObjectSpec("green", "square", "small", "bottom")])
    assert unsaid.relation is None and is_heldout(unsaid)
    sideways = make_sample("pair", [ObjectSpec("red", "circle", "small", "left"),
                                    ObjectSpec("green", "square", "small", "right")])
    assert not is_heldout(sideways)


def test_make_sample_with_chosen_attributes():
    single = make_sample("single", [ObjectSpec("red", "circle", "small", "top left")])
    assert single.caption == "a red circle in the top left"  # canonical caption without an rng
    assert single.objects[0].region == "top left" and single.objects[0].size == "small"
    pair = make_sample("pair", [ObjectSpec("yellow", "star"), ObjectSpec("blue", "diamond")], "left of")
    assert pair.caption == "a yellow star to the left of a blue diamond"
    count = make_sample("count", [ObjectSpec("orange", "cross", "small")] * 3, rng=5)
    assert count.caption.endswith(("orange crosses", "orange plus signs")) and len(count.objects) == 3
    assert caption_sample(count) == "three orange crosses"
    for sample in (single, pair, count):
        check_ground_truth(sample, np.asarray(render_sample(sample)))
    # Rendering at another size scales the boxes.
    big = np.asarray(render_sample(single, size=96))
    x0, y0, x1, y1 = (3 * v for v in single.objects[0].box)
    assert np.abs(big[(y0 + y1) // 2, (x0 + x1) // 2].astype(int) - COLOURS["red"]).max() <= 6
    with pytest.raises(ValueError, match="magenta"):
        make_sample("single", [ObjectSpec("magenta", "circle")])
    with pytest.raises(ValueError):
        make_sample("pair", [ObjectSpec("red", "circle")] * 2)


def test_shapes_are_drawn_as_named_and_antialiased():
    # Filled fraction of the box, rendered large: each shape has its own area (triangle and diamond
    # share one, so the triangle's full bottom row tells them apart).
    expected = {"circle": 0.785, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 0.59, "star": 0.39}
    for shape, fraction in expected.items():
        sample = make_sample("single", [ObjectSpec("blue", shape, "large", "center")], image_size=128)
        image = np.asarray(render_sample(sample)).astype(int)
        x0, y0, x1, y1 = sample.objects[0].box
        inside = (np.abs(image - 255).sum(-1) / np.abs(np.array(COLOURS["blue"]) - 255).sum())
        assert abs(inside[y0:y1, x0:x1].mean() - fraction) < 0.05, shape
        assert inside.sum() - inside[y0:y1, x0:x1].sum() < 1e-6  # nothing drawn outside the box
        bottom_row = inside[y1 - 1, x0:x1].mean()
        assert (bottom_row > 0.8) == (shape in ("square", "triangle")), shape
    small = np.asarray(ShapesDataset(size=32).render(0)).reshape(-1, 3)
    palette = {tuple(c) for c in COLOURS.values()} | {(255, 255, 255)}
    assert any(tuple(p) not in palette for p in small)  # edge pixels blend: anti-aliased


def test_colour_table_is_far_apart_and_far_from_white():
    rgb = np.array(list(COLOURS.values()), dtype=float)
    assert len(rgb) >= 8 and len(SHAPES) == 6
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[np.triu_indices(len(rgb), 1)].min() > 90
    assert np.linalg.norm(rgb - 255, axis=-1).min() > 150


def test_dataloader_batches_and_build_dataset():
    dataset = build_dataset(DataConfig(size=32, length=64, seed=2))
    assert isinstance(dataset, ShapesDataset) and len(dataset) == 64
    batch = next(iter(DataLoader(dataset, batch_size=16)))
    assert batch["image"].shape == (16, 3, 32, 32) and len(batch["caption"]) == 16
    heldout = build_dataset(DataConfig(size=32, length=64, seed=2), split="heldout")
    assert heldout.split == "heldout" and len(heldout) == 1000
    assert is_heldout(heldout.sample(0))
    with pytest.raises(IndexError):
        dataset[64]
    assert len(list(dataset)) == 64
