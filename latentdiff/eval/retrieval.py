"""Image<->text retrieval accuracy of a CLIP model over batches of distinct captions.

In a batch of N (image, caption) pairs with N different captions, image->text top-k asks whether an
image's own caption is among the k captions most similar to it (and text->image the other way).
Ties count against the model, so a collapsed model scores 0, not 1.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..errors import DataError
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


def distinct_caption_batches(samples: Iterable[dict], batch_size: int, batches: int) -> list[list[dict]]:
    """Up to `batches` batches of samples in which no caption repeats, filled greedily in order."""
    out, current, seen, read = [], [], set(), 0
    for sample in samples:
        read += 1
        if sample["caption"] in seen:
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


@torch.no_grad()
def heldout_retrieval(encoder: TextEncoder, dataset, batch_size: int = 64, batches: int = 8,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Retrieval accuracies averaged over `batches` batches of `batch_size` distinct captions of `dataset`.

    `dataset[i]` is {"image": (3, H, W) in [-1, 1], "caption": str}. Samples are read in order, so
    the same dataset gives the same batches every time.
    """
    sample_batches = distinct_caption_batches((dataset[i] for i in range(len(dataset))), batch_size, batches)
    was_training = encoder.training
    encoder.eval()
    totals: dict[str, float] = {}
    for samples in sample_batches:
        images = torch.stack([s["image"] for s in samples])  # (N, 3, H, W)
        captions = [s["caption"] for s in samples]
        batch = retrieval_accuracy(encoder.image_embedding(images), encoder.text_embedding(captions), ks)
        for name, value in batch.items():
            totals[name] = totals.get(name, 0.0) + value / len(sample_batches)
    encoder.train(was_training)
    return totals
