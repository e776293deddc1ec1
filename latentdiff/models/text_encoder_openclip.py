"""The open_clip backend: a CLIP model (text + image towers) with open_clip's bundled BPE tokenizer.

Two ways in:
  * built from a TextEncoderConfig (a small model trained here on captioned images), saved as a
    latentdiff folder (the whole CLIP: the image tower is the CLIP-score judge);
  * an OpenCLIP checkpoint file plus the name of its open_clip architecture, e.g. the ViT-H-14 text
    tower that SD 2.x conditions on (with output_layer="penultimate", as SD 2.x does); a pickled one
    (.bin / .pt) only with allow_pickle=True.

The weights keep open_clip's own key names, so a latentdiff folder's model.safetensors is also a
plain OpenCLIP state dict. A file without `visual.*` keys (a text tower alone) loads text-only.

`config.causal=False` (a tower trained here) drops CLIP's causal mask in `encode_tokens` and masks only the
padding keys; an OpenCLIP file always loads causal, as it was trained. open_clip's own `clip.encode_text`
ignores the switch: latentdiff reads the text tower through `encode_tokens` only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from ..checkpoint import StageIdentity, load_model_files, load_state_dict_strict, read_weights, save_model_files
from ..config import apply_overrides
from ..errors import CheckpointError
from .text_encoder import TextEncoder, TextEncoderConfig, TextEncoding, TokenizedPrompts, as_prompt_list, pad_tokens

CHECKPOINT_KIND = "text_encoder"
# The keys of the SD 2.x text tower inside an original (CompVis layout) Stable Diffusion checkpoint.
SD2_TEXT_PREFIX = "cond_stage_model.model."
CLIP_VOCAB_SIZE = 49408  # open_clip's bundled BPE: 512 byte tokens + 48,894 merges + start/end


def build_clip(config: TextEncoderConfig) -> open_clip.CLIP:
    """A randomly initialised open_clip CLIP: a named open_clip architecture, or the sizes in `config`."""
    if config.open_clip_model:
        cfg = open_clip.get_model_config(config.open_clip_model)
        if cfg is None:
            raise CheckpointError(f"unknown open_clip architecture {config.open_clip_model!r} "
                                  f"(known: {', '.join(n for n in open_clip.list_models() if n.startswith('ViT-H'))}, ...; "
                                  f"see open_clip.list_models())")
        unsupported = [k for k in ("custom_text", "multimodal_cfg") if cfg.get(k)]
        unsupported += [k for k in ("hf_model_name", "hf_tokenizer_name") if cfg["text_cfg"].get(k)]
        if unsupported:
            raise CheckpointError(f"open_clip architecture {config.open_clip_model!r} has a non-standard text tower "
                                  f"({', '.join(unsupported)}); only the standard CLIP text transformer is supported")
        return open_clip.CLIP(**cfg)
    vision = open_clip.CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width,
                                     head_width=config.vision_head_width, mlp_ratio=config.mlp_ratio,
                                     patch_size=config.patch_size, image_size=config.image_size)
    text = open_clip.CLIPTextCfg(context_length=config.context_length, vocab_size=CLIP_VOCAB_SIZE,
                                 width=config.width, heads=config.heads, layers=config.layers,
                                 mlp_ratio=config.mlp_ratio)
    return open_clip.CLIP(config.embed_dim, vision, text, init_logit_scale=config.init_logit_scale)


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """An OpenCLIP checkpoint file's tensors, open_clip key names (a pickled file only with allow_pickle)."""
    tensors = read_weights(path, allow_pickle=allow_pickle)[0]
    if any(k.startswith(SD2_TEXT_PREFIX) for k in tensors):  # a whole SD 2.x checkpoint: take its text tower
        tensors = {k[len(SD2_TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(SD2_TEXT_PREFIX)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


class OpenCLIPTextEncoder(TextEncoder):
    """TextEncoder over an open_clip `CLIP` (kept as `self.clip`, open_clip's own module)."""

    def __init__(self, config: TextEncoderConfig, clip: open_clip.CLIP | None = None):
        super().__init__()
        self.clip = build_clip(config) if clip is None else clip
        if config.open_clip_model:  # a named architecture brings its own context length (SD: 77)
            config = dataclasses.replace(config, context_length=self.clip.context_length)
            self.image_mean, self.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        # else: our own models see the [-1, 1] images as they are (mean = std = 0.5 on [0, 1])
        self.config = config
        self.tokenizer = open_clip.SimpleTokenizer(context_length=config.context_length)
        self.context_length = config.context_length
        self.width = self.clip.transformer.width
        self.output_layer = config.output_layer
        projection = self.clip.text_projection
        self.pooled_dim = (projection.out_features if isinstance(projection, nn.Linear)
                           else projection.shape[1] if projection is not None else self.width)
        self.image_size = self._visual_size()

    def _visual_size(self) -> int:
        visual = getattr(self.clip, "visual", None)
        if visual is None:
            return 0
        size = visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def drop_image_tower(self) -> None:
        """Free the image tower (text-only use); image_embedding then raises."""
        if getattr(self.clip, "visual", None) is not None:
            del self.clip.visual
        self.image_size = 0

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, prompts) -> TokenizedPrompts:
        """open_clip's tokenization (start, BPE, end, zero padding), with a warning when cut short."""
        prompts = as_prompt_list(prompts)
        start, end = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        tokens = [[start, *self.tokenizer.encode(prompt), end] for prompt in prompts]
        return pad_tokens(prompts, tokens, self.context_length, end=end, pad=0)

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
        # pooled: the end-of-text token of the last block, projected into the shared space (as encode_text)
        pooled = text_global_pool(last, ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection  # (B, P)
        return TextEncoding(states, pooled, mask)

    # -- images and training --------------------------------------------------------------------

    def _image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: [-1, 1] images (B, 3, H, W) and tokens -> (unit image features (B, P), unit text
        features (B, P), logit scale), as CLIP.forward.

        The text is cut to the batch's longest prompt first: padding never changes the tokens before it
        (under the causal mask it comes after them; bidirectional, it is masked out as a key), so the
        pooled end-of-text state is the same, at less cost.
        """
        used = int(mask.sum(1).max())
        text = self.encode_tokens(ids[:, :used], mask[:, :used]).pooled
        image = self.clip.encode_image(self.preprocess_images(pixels))  # what image_embedding sees, too
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1), self.clip.logit_scale.exp()

    # -- files ----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        """A latentdiff folder: the whole CLIP's weights (open_clip key names) + this config."""
        save_model_files(folder, kind=CHECKPOINT_KIND, config=self.config, state_dict=self.clip.state_dict(),
                         metadata=metadata)

    @classmethod
    def from_latentdiff_folder(cls, folder: str | Path, *, output_layer: str | None = None,
                               image_tower: bool = True) -> "OpenCLIPTextEncoder":
        config, state_dict, metadata = load_model_files(folder, kind=CHECKPOINT_KIND, config_class=TextEncoderConfig)
        if output_layer is not None:
            config = _with_output_layer(config, output_layer)
        encoder = cls._load(config, state_dict, folder, image_tower)
        encoder.identity = StageIdentity(metadata=metadata)
        return encoder

    @classmethod
    def from_open_clip_file(cls, path: str | Path, open_clip_model: str | None, *, output_layer: str | None = None,
                            image_tower: bool = True, allow_pickle: bool = False) -> "OpenCLIPTextEncoder":
        path = Path(path)
        if not open_clip_model:
            raise CheckpointError(f"{path}: an OpenCLIP weights file; name its architecture with "
                                  f"open_clip_model=NAME (e.g. 'ViT-H-14' for SD 2.x)")
        config = _with_output_layer(TextEncoderConfig(open_clip_model=open_clip_model), output_layer or "last")
        encoder = cls._load(config, read_state_dict(path, allow_pickle=allow_pickle), path, image_tower)
        encoder.identity = StageIdentity(metadata={"source": str(path)})
        return encoder

    @classmethod
    def _load(cls, config: TextEncoderConfig, state_dict: dict, where, image_tower: bool) -> "OpenCLIPTextEncoder":
        """Build from `config` and load `state_dict` strictly (without visual.* keys: text-only)."""
        encoder = cls(config)
        if not image_tower or not any(k.startswith("visual.") for k in state_dict):
            encoder.drop_image_tower()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("visual.")}
        load_state_dict_strict(encoder.clip, state_dict, where)
        return encoder.eval()


def padding_attn_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L) 1/0 token mask -> (B * heads, L, L) additive attention mask, -inf on the padding keys: the
    bidirectional text transformer's only mask (every query sees every prompt token, start to end)."""
    batch, length = mask.shape
    blocked = torch.zeros(batch, 1, 1, length, device=mask.device).masked_fill(mask[:, None, None, :] == 0,
                                                                               float("-inf"))
    return blocked.expand(batch, heads, length, length).reshape(batch * heads, length, length)


def _with_output_layer(config: TextEncoderConfig, output_layer: str) -> TextEncoderConfig:
    return apply_overrides(config, {"output_layer": output_layer})  # validates the choice
