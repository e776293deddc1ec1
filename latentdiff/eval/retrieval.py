"""Image<->text retrieval accuracy of a CLIP model over batches of distinct captions.

In a batch of N (image, caption) pairs with N different captions, image->text top-k asks whether an
image's own caption is among the k captions most similar to it (and text->image the other way).
Ties count against the model, so a collapsed model scores 0, not 1.

Different captions can still describe the same picture: on the shapes held-out split about 18% of
the captions in a batch of 64 also fit another picture in it ("a green star" next to "a green star
on the left"), so even a perfect model scores about 0.9 top-1 there (`retrieval_ceiling` computes
it exactly: 0.898 text->image on the default held-out batches). Unambiguous batches (shapes only:
the ground truth decides) leave such pairs out, and measure the model rather than the batch.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from ..data.shapes import ShapesDataset
from ..data.shapes_fit import shapes_caption_fits
from ..data.sources import iter_in_order
from ..errors import DataError
from ..eval_mode import in_eval_mode
from ..models.text_encoder import TextEncoder


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies of matched (N, P) image and text embeddings (row i of each is pair i)."""
    sim = image_emb.float() @ text_emb.float().T  # (N, N): images x texts
    true = sim.diagonal()
    others = ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    # rank of the true match = how many other candidates score at least as high
    i2t_rank = ((sim >= true[:, None]) & others).sum(1)  # over the captions, per image
    t2i_rank = ((sim >= true[None, :]) & others).sum(0)  # over the images, per caption
    metrics = {}
    for k in ks:
        metrics[f"i2t_top{k}"] = (i2t_rank < k).float().mean().item()
        metrics[f"t2i_top{k}"] = (t2i_rank < k).float().mean().item()
    return metrics


def distinct_caption_batches(samples: Iterable[dict], batch_size: int, batches: int,
                             conflict: Callable[[dict, dict], bool] | None = None) -> list[list[dict]]:
    """Up to `batches` batches of samples in which no caption repeats, filled greedily in order.

    With `conflict`, a sample also stays out of a batch holding one it conflicts with.
    """
    out, current, seen, read = [], [], set(), 0
    for sample in samples:
        read += 1
        if sample["caption"] in seen or (conflict and any(conflict(sample, other) for other in current)):
            continue
        current.append(sample)
        seen.add(sample["caption"])
        if len(current) == batch_size:
            out.append(current)
            current, seen = [], set()
            if len(out) == batches:
                break
    if not out:
        raise DataError(f"retrieval: fewer than {batch_size} distinct captions in {read} held-out samples")
    return out


def shapes_captions_conflict(a: dict, b: dict) -> bool:
    """Two shapes samples whose captions cannot tell their pictures apart (either fits the other)."""
    return shapes_caption_fits(a["truth"], b["truth"]) or shapes_caption_fits(b["truth"], a["truth"])


def _shapes_samples(dataset: ShapesDataset, with_images: bool):
    for i in range(len(dataset)):
        truth = dataset.sample(i)
        yield {**dataset[i], "truth": truth} if with_images else {"caption": truth.caption, "truth": truth}


def retrieval_ceiling(dataset: ShapesDataset, batch_size: int = 64, batches: int = 8) -> dict[str, float]:
    """Top-1 accuracies a perfect model expects on `heldout_retrieval`'s distinct-caption batches.

    A caption that fits k pictures of its batch (by the ground truth) can only be matched by chance
    among them: 1/k. Averaged over the batches' captions (text->image) and pictures (image->text).
    """
    sample_batches = distinct_caption_batches(_shapes_samples(dataset, with_images=False), batch_size, batches)
    t2i = [1 / sum(shapes_caption_fits(s["truth"], o["truth"]) for o in batch)
           for batch in sample_batches for s in batch]
    i2t = [1 / sum(shapes_caption_fits(o["truth"], s["truth"]) for o in batch)
           for batch in sample_batches for s in batch]
    return {"i2t_top1": sum(i2t) / len(i2t), "t2i_top1": sum(t2i) / len(t2i)}


@torch.no_grad()
def heldout_retrieval(encoder: TextEncoder, dataset, batch_size: int = 64, batches: int = 8,
                      ks: Sequence[int] = (1, 5), unambiguous: bool = False) -> dict[str, float]:
    """Retrieval accuracies averaged over `batches` batches of `batch_size` distinct captions of `dataset`.

    `dataset[i]` is {"image": (3, H, W) in [-1, 1], "caption": str}. Samples are read in order, so
    the same dataset gives the same batches every time. Distinct captions can still describe the
    same picture ("a green star", "a green star on the left"), which caps top-1 below 1 (about 0.9
    on the shapes held-out split); `unambiguous=True` (a ShapesDataset only) also keeps such pairs
    apart, using the ground truth.
    """
    if unambiguous and not isinstance(dataset, ShapesDataset):
        raise DataError("unambiguous retrieval needs the shapes ground truth (data.source: shapes)")

    samples = _shapes_samples(dataset, with_images=True) if unambiguous else iter_in_order(dataset)
    sample_batches = distinct_caption_batches(samples, batch_size, batches,
                                              shapes_captions_conflict if unambiguous else None)
    totals: dict[str, float] = {}
    with in_eval_mode(encoder):
        for batch in sample_batches:
            images = torch.stack([s["image"] for s in batch])  # (N, 3, H, W)
            captions = [s["caption"] for s in batch]
            scores = retrieval_accuracy(encoder.image_embedding(images), encoder.text_embedding(captions), ks)
            for name, value in scores.items():
                totals[name] = totals.get(name, 0.0) + value / len(sample_batches)
    return totals
