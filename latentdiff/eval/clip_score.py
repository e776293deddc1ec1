"""CLIP score of image-prompt pairs (Hessel et al. 2021, "CLIPScore"): 100 * max(cos(image, text), 0).

The judge is any TextEncoder with an image tower: the CLIP trained here on the shapes data (a latentdiff
text-encoder folder), or pretrained CLIP weights loaded from local files.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..eval_mode import in_eval_mode
from ..models.text_encoder import TextEncoder


def images_to_tensor(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """A (B, 3, H, W) tensor in [-1, 1] as is, or PIL images of one size -> such a tensor."""
    if isinstance(images, torch.Tensor):
        return images
    pixels = [pil_to_tensor(image.convert("RGB")) for image in images]  # (3, H, W) uint8 each
    if len({tuple(p.shape) for p in pixels}) > 1:
        raise ValueError("clip_score: the images differ in size; score each size separately")
    return torch.stack(pixels).float() / 127.5 - 1


@torch.no_grad()
def clip_score(encoder: TextEncoder, images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str],
               batch_size: int = 64) -> torch.Tensor:
    """(N,) CLIP scores of N images (tensor in [-1, 1], or PIL images) against their N prompts."""
    images, prompts = images_to_tensor(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    scores = []
    with in_eval_mode(encoder):
        for start in range(0, len(prompts), batch_size):
            image_emb = encoder.image_embedding(images[start:start + batch_size])   # (b, P), unit length
            text_emb = encoder.text_embedding(prompts[start:start + batch_size])    # (b, P), unit length
            scores.append(100 * (image_emb * text_emb).sum(-1).clamp(min=0))
    return torch.cat(scores).cpu() if scores else torch.zeros(0)
