"""CLIP's text transformer alone, in plain torch: the text part of an open_clip CLIP, with its key names.

Built from a TextEncoderConfig's sizes (a tower trained here; `open_clip_model` empty), its state_dict has
exactly the keys and shapes of the text part of open_clip's CLIP built from the same config:

    token_embedding.weight                  (V, D)   V = 49408 BPE tokens
    positional_embedding                    (L, D)
    transformer.resblocks.N.ln_1 / ln_2     LayerNorms
    transformer.resblocks.N.attn.*          nn.MultiheadAttention: in_proj_weight (3D, D) packs q, k, v
    transformer.resblocks.N.mlp.c_fc / c_proj
    ln_final                                LayerNorm
    text_projection                         (D, P)   pooled @ text_projection

so it loads the text keys of a latentdiff text-encoder folder without importing open_clip. It has no
forward: CLIPTowerTextEncoder.encode_tokens runs it (as it runs open_clip's CLIP), block by block.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .clip_bpe import CLIP_VOCAB_SIZE
from .text_encoder import TextEncoderConfig


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block (open_clip's, GELU): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); attn_mask: additive, (L, L) or (B * heads, L, L)."""
        h = self.ln_1(x)
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None  # the model's dtype (fp16, ...)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The blocks, under open_clip's names (`transformer.resblocks`, `.width`; batch first)."""

    batch_first = True

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))


class CLIPTextTower(nn.Module):
    """CLIP's text tower from a TextEncoderConfig's sizes, with open_clip's attribute and key names."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.open_clip_model:
            raise ValueError(f"an open_clip architecture ({config.open_clip_model!r}) is built by open_clip "
                             f"(text_encoder_openclip.build_clip), not from sizes")
        length, width = config.context_length, config.width
        self.context_length = length
        self.token_embedding = nn.Embedding(CLIP_VOCAB_SIZE, width)
        self.positional_embedding = nn.Parameter(torch.empty(length, width))
        self.transformer = TextTransformer(width, config.layers, config.heads, config.mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))  # (D, P)
        # (L, L) additive causal mask: -inf above the diagonal, so a token sees itself and the tokens before it
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1), persistent=False)
        # open_clip's initial scales (the blocks keep torch's defaults): only a tower built without weights uses them
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
