"""The grounding loss (issue 15): an auxiliary training loss that pulls each object word's cross-attention
map onto that object's mask, after the attention-alignment losses of TokenCompose (Wang et al. 2024) and
Attend-and-Excite (Chefer et al. 2023, there at sampling time).

A UNet that follows single-object prompts but fails two-object ones often lets both objects' words attend
everywhere, so that colours and shapes bleed between objects. The shapes generator knows where each
object it names lies; this loss asks that a word's attention go there. Training only: sampling never
records attention (models/attention.py), so the sampled images' path is unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-8


def grounding_loss(maps: list[torch.Tensor], tokens: torch.Tensor, masks: torch.Tensor,
                   min_size: int = 1) -> torch.Tensor:
    """1 - the share of each object token's attention that lies inside its object's mask, averaged.

    maps: cross-attention probabilities (B, heads, N, L), one per layer, N = h'·w' of that layer's feature map;
    tokens (B, L, G) bool: token l names object g; masks (B, G, h, w) bool: where object g lies at latent size
    h x w (a layer with smaller maps sees max-pooled masks: the cells an object touches). A token's map is
    averaged over heads and normalised over pixels. Layers whose map is smaller than min_size on a side are
    left out. 0 when every such map lies within its mask, and when there is nothing to ground.
    """
    h, w = masks.shape[-2:]
    named = tokens.float()  # (B, L, G)
    total, count = masks.new_zeros((), dtype=torch.float32), 0
    for probs in maps:
        stride = math.isqrt(h * w // probs.shape[2])
        size = (h // stride, w // stride)
        if size[0] * size[1] != probs.shape[2]:
            raise ValueError(f"a {probs.shape[2]}-pixel attention map does not tile the {h}x{w} latent")
        if min(size) < min_size:
            continue
        inside_mask = F.adaptive_max_pool2d(masks.float(), size).flatten(2)  # (B, G, N)
        attention = probs.float().mean(1)  # (B, N, L)
        attention = attention / attention.sum(1, keepdim=True).clamp_min(EPS)  # each token's map sums to 1
        inside = torch.einsum("bnl,bgn->blg", attention, inside_mask)  # (B, L, G) share inside g's mask
        total = total + ((1 - inside) * named).sum()
        count += 1
    pairs = named.sum() * count  # (token, object) pairs over the layers used
    return total / pairs if pairs > 0 else total
