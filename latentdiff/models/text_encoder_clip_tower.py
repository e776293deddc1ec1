"""CLIP's text tower as a TextEncoder: the BPE tokenizer and the one text forward (`encode_tokens`) of latentdiff.

It runs any module with open_clip's text attribute names (token_embedding, positional_embedding,
transformer.resblocks, ln_final, text_projection, attn_mask): open_clip's own CLIP in OpenCLIPTextEncoder
(a subclass, which adds the image tower, training and OpenCLIP files), or our CLIPTextTower for a latentdiff
folder loaded text-only (`TextEncoder.from_pretrained(folder, image_tower=False)`), which never imports
open_clip: generation starts seconds sooner.

`config.causal=False` (a tower trained here) drops CLIP's causal mask and masks only the padding keys; an
OpenCLIP file always loads causal, as it was trained. open_clip's own `clip.encode_text` ignores the switch:
latentdiff reads the text tower through `encode_tokens` only.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import StageIdentity, load_model_files, load_state_dict_strict, save_model_files
from ..config import apply_overrides
from ..errors import CheckpointError
from .clip_bpe import CLIPBPE, clip_bpe
from .clip_text_tower import CLIPTextTower
from .text_encoder import TextEncoder, TextEncoderConfig, TextEncoding, TokenizedPrompts, as_prompt_list, pad_tokens

CHECKPOINT_KIND = "text_encoder"


class CLIPTowerTextEncoder(TextEncoder):
    """TextEncoder over a CLIP text tower (`self.clip`): our CLIPTextTower unless a module is given."""

    def __init__(self, config: TextEncoderConfig, clip: nn.Module | None = None):
        super().__init__()
        self.clip = CLIPTextTower(config) if clip is None else clip
        self.config = config
        self.context_length = config.context_length
        self.width = self.clip.transformer.width
        self.output_layer = config.output_layer
        projection = self.clip.text_projection
        self.pooled_dim = (projection.out_features if isinstance(projection, nn.Linear)
                           else projection.shape[1] if projection is not None else self.width)

    @property
    def tokenizer(self) -> CLIPBPE:
        """CLIP's BPE, shared by every encoder (a property, so that copies and pickles of a model leave it out)."""
        return clip_bpe()

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, prompts) -> TokenizedPrompts:
        """CLIP's tokenization (start, BPE, end, zero padding), with a warning when cut short."""
        prompts = as_prompt_list(prompts)
        bpe = self.tokenizer
        tokens = [[bpe.start_id, *bpe.encode(prompt), bpe.end_id] for prompt in prompts]
        return pad_tokens(prompts, tokens, self.context_length, end=bpe.end_id, pad=0)

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        """The CLIP text transformer, keeping the output of the configured block (final LayerNorm applied)."""
        clip = self.clip
        length = ids.shape[1]
        x = clip.token_embedding(ids) + clip.positional_embedding[:length]  # (B, L, D)
        if self.config.causal:
            attn_mask = clip.attn_mask[:length, :length]  # (L, L) additive, -inf above the diagonal
        else:
            attn_mask = padding_attn_mask(mask, clip.transformer.resblocks[0].attn.num_heads)  # (B * heads, L, L)
        batch_first = getattr(clip.transformer, "batch_first", False)  # open_clip < 2.27 ran (L, B, D)
        h = x if batch_first else x.transpose(0, 1)
        blocks = clip.transformer.resblocks
        keep = len(blocks) - (1 if self.output_layer == "penultimate" else 0)
        for i, block in enumerate(blocks):
            h = block(h, attn_mask=attn_mask)
            if i == keep - 1:
                chosen = h
        as_bld = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
        states = clip.ln_final(as_bld(chosen))  # (B, L, D)
        last = states if keep == len(blocks) else clip.ln_final(as_bld(h))
        # pooled: the last block's state at the end-of-text token (the highest id, so the first argmax),
        # projected into the shared image-text space, as CLIP's encode_text
        pooled = last[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]  # (B, D)
        projection = clip.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection  # (B, P)
        return TextEncoding(states, pooled, mask)

    # -- files ----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        """A latentdiff folder: the tower's weights (open_clip key names; a whole CLIP's too) + this config."""
        save_model_files(folder, kind=CHECKPOINT_KIND, config=self.config, state_dict=self.clip.state_dict(),
                         metadata=metadata)

    @classmethod
    def from_latentdiff_folder(cls, folder: str | Path, *, output_layer: str | None = None,
                               image_tower: bool = False) -> "CLIPTowerTextEncoder":
        """A latentdiff text-encoder folder; output_layer replaces the saved one (image_tower: the subclass's)."""
        config, state_dict, metadata = load_model_files(folder, kind=CHECKPOINT_KIND, config_class=TextEncoderConfig)
        if output_layer is not None:
            config = with_output_layer(config, output_layer)
        encoder = cls._from_weights(config, state_dict, folder, image_tower)
        encoder.identity = StageIdentity(metadata=metadata)
        return encoder

    @classmethod
    def _from_weights(cls, config: TextEncoderConfig, state_dict: dict, where, image_tower: bool
                      ) -> "CLIPTowerTextEncoder":
        """Our text tower built from `config`, loaded with the text keys of `state_dict`."""
        if image_tower:
            raise CheckpointError(f"{where}: {cls.__name__} has no image tower; load with image_tower=False")
        if config.open_clip_model:
            raise CheckpointError(f"{where}: an open_clip architecture ({config.open_clip_model!r}) loads "
                                  f"through open_clip (OpenCLIPTextEncoder)")
        encoder = cls(config)
        load_text_weights(encoder.clip, state_dict, where)
        return encoder.eval()


def is_text_key(key: str) -> bool:
    """Whether a CLIP state-dict key belongs to the text tower (not the image tower, visual.*, nor the
    contrastive head, logit_scale / logit_bias)."""
    return not key.startswith("visual.") and key not in ("logit_scale", "logit_bias")


def load_text_weights(module: nn.Module, state_dict: dict, where) -> None:
    """Load `state_dict` into a text tower (a CLIP without its image tower, or CLIPTextTower), strictly over
    the text keys: each must be there with its shape (CheckpointError naming the ones that are not). The
    other keys are taken where both sides have them (a CLIP's logit_scale), and otherwise ignored (the image
    tower's keys) or left as they are (a text-only file has no logit_scale)."""
    own = module.state_dict()
    kept = {k: v for k, v in own.items() if not is_text_key(k)}
    given = {k: v for k, v in state_dict.items() if is_text_key(k) or k in own}
    load_state_dict_strict(module, {**kept, **given}, where)


def padding_attn_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L) 1/0 token mask -> (B * heads, L, L) additive attention mask, -inf on the padding keys: the
    bidirectional text transformer's only mask (every query sees every prompt token, start to end)."""
    batch, length = mask.shape
    blocked = torch.zeros(batch, 1, 1, length, device=mask.device).masked_fill(mask[:, None, None, :] == 0,
                                                                               float("-inf"))
    return blocked.expand(batch, heads, length, length).reshape(batch * heads, length, length)


def with_output_layer(config: TextEncoderConfig, output_layer: str) -> TextEncoderConfig:
    return apply_overrides(config, {"output_layer": output_layer})  # validates the choice
