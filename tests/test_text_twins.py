"""eval/text_twins: a bag-of-words text encoder cannot tell a picture's caption from its colour-swapped twin,
one that reads word order can; every kind of twin is counted."""
import torch

from latentdiff.data.hard_negatives import HARD_NEGATIVE_KINDS
from latentdiff.data.shapes import ShapesDataset
from latentdiff.data.shapes_captions import caption_sample
from latentdiff.eval.text_twins import main, twin_preference

SAMPLES = 120


class CaptionLookupEncoder(torch.nn.Module):
    """Embeds a caption as the normalised sum of its words' random integer vectors, each weighted by its
    place (ordered) or not (a bag of words); embeds a picture as its own canonical caption, looked up by
    its pixels."""

    def __init__(self, dataset: ShapesDataset, ordered: bool):
        super().__init__()
        self.ordered, self.vectors = ordered, {}
        self.captions = {dataset[i]["image"].numpy().tobytes(): caption_sample(dataset.sample(i))
                         for i in range(len(dataset))}

    def word(self, word: str) -> torch.Tensor:
        if word not in self.vectors:
            # integers: sums of the same words in any order are exactly equal
            generator = torch.Generator().manual_seed(len(self.vectors))
            self.vectors[word] = torch.randint(-8, 9, (64,), generator=generator).double()
        return self.vectors[word]

    def text_embedding(self, captions):  # unit vectors, as TextEncoder's
        sums = torch.stack([sum((k + 1 if self.ordered else 1) * self.word(w) for k, w in enumerate(c.split()))
                            for c in captions])
        return torch.nn.functional.normalize(sums, dim=-1)

    def image_embedding(self, images):
        return self.text_embedding([self.captions[image.numpy().tobytes()] for image in images])


def test_bag_of_words_ties_on_colour_swaps_and_word_order_does_not():
    dataset = ShapesDataset(length=SAMPLES, split="heldout")
    bag = twin_preference(CaptionLookupEncoder(dataset, ordered=False), dataset, SAMPLES, batch_size=32)
    assert bag["colour_swap"] == 0.0            # the same words: a tie, counted against
    assert bag["colour"] == 1.0 and bag["count"] == 1.0
    ordered = twin_preference(CaptionLookupEncoder(dataset, ordered=True), dataset, SAMPLES, batch_size=32)
    assert all(ordered[kind] == 1.0 for kind in HARD_NEGATIVE_KINDS)
    assert set(ordered["pictures"]) == set(HARD_NEGATIVE_KINDS)
    assert ordered["pictures"]["colour"] == SAMPLES  # every picture has a colour-changed twin


def test_script_refuses_a_text_encoder_without_image_tower(tmp_path, capsys, monkeypatch):
    class TextOnly:
        has_image_tower = False

    monkeypatch.setattr("latentdiff.models.text_encoder.TextEncoder.from_pretrained", lambda path: TextOnly())
    assert main(["--text-encoder", str(tmp_path)]) == 2
    assert "no image tower" in capsys.readouterr().err
