"""CLIP's contrastive loss, with optional hard-negative captions on the image->text side.

Lever (issue 15; `hard_negatives=K`, data/hard_negatives.py makes the captions): each image's row of
image->text logits gets K more columns, its similarities to K captions of scenes one attribute away from
its own (swapped colours, relation, count, ...), so the loss only falls once the text states tell those
apart. The text->image side is CLIP's as it is: a hard negative is no image's caption, so it has no row.

Under N processes open_clip's local loss is kept: each process scores its own images against the
gathered captions, and its hard negatives only against their own image (a row stays local), so
N processes x B images give the same loss as 1 x N*B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import ClipLoss


class HardNegativeClipLoss(ClipLoss):
    """open_clip's ClipLoss; `negative_features` (B, K, P), if given, extend each image's row of logits."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                negative_features: torch.Tensor | None = None, negative_valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        """image_features, text_features (B, P) unit vectors of this process's pairs; negative_features
        (B, K, P) unit vectors of each image's hard-negative captions, negative_valid (B, K) bool (False:
        a missing negative, left out of the softmax)."""
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        if negative_features is not None:
            hard = logit_scale * torch.einsum("bp,bkp->bk", image_features, negative_features)  # (B, K)
            if negative_valid is not None:
                hard = hard.masked_fill(~negative_valid, float("-inf"))  # the positive column keeps rows finite
            logits_per_image = torch.cat([logits_per_image, hard], dim=1)  # (B, B_all + K)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def batch_hard_negatives(batch: dict) -> tuple[list[str], torch.Tensor]:
    """A collated batch's hard-negative captions, image-major (B * K strings: image 0's K, image 1's, ...),
    and (B, K) which of them exist (HardNegativeShapes pads with ""); ([], (B, 0)) for a batch without any."""
    columns = batch.get("hard_negatives")  # default collate: K tuples of B captions
    if not columns:
        return [], torch.zeros(len(batch["caption"]), 0, dtype=torch.bool)
    captions = [caption for row in zip(*columns) for caption in row]
    valid = torch.tensor([caption != "" for caption in captions]).view(len(columns[0]), len(columns))
    return captions, valid
