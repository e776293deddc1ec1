"""The one text-encoder interface the rest of latentdiff uses, and the loader that picks a backend.

    encoder = TextEncoder.from_pretrained(path)          # any of the three formats below
    states, pooled, mask = encoder.encode(["a red circle"])
    # states (B, L, D): per-token states the UNet cross-attends to (L = context_length, D = width)
    # pooled (B, P):    the prompt's CLIP embedding (P = pooled_dim)
    # mask   (B, L):    1 for the prompt's tokens (start .. end), 0 for padding

The config of the model trained here (TextEncoderConfig) sits at the top; a checkpoint file from elsewhere
brings its own architecture.

Lever (issue 15): `causal=False` makes the text transformer trained here bidirectional. CLIP's causal mask
lets a token see only the tokens before it, so in "a red circle" the state of 'red' knows nothing of
'circle', and only the states after the noun can carry the binding that the UNet's cross-attention needs;
without the mask every state sees the whole prompt (padding stays masked out). Pretrained towers (OpenCLIP
files, transformers CLIPTextModel) were trained causal and always load causal.

Backends (same interface, same `from_pretrained`):
    CLIPTowerTextEncoder (text_encoder_clip_tower.py) CLIP's text tower in plain torch (clip_text_tower.py)
                         and CLIP's BPE tokenizer (clip_bpe.py): a latentdiff folder loaded with
                         image_tower=False, without importing open_clip (generation: seconds sooner)
    OpenCLIPTextEncoder  (text_encoder_openclip.py) its subclass over an open_clip CLIP model (text + image
                         towers): trained here from a TextEncoderConfig, or loaded from an OpenCLIP
                         checkpoint file (SD 2.x)
    HFCLIPTextEncoder    (text_encoder_hf.py) transformers CLIPTextModel/CLIPModel + CLIPTokenizer
                         from a local folder (SD 1.x)

Nothing here downloads anything: every loader reads local files only, and pickled weights files
(.bin / .pt / .ckpt) only with `allow_pickle=True` (see checkpoint.read_weights).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CONFIG_NAME, PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, StageIdentity, read_json
from ..config import check_choice
from ..errors import CheckpointError, ConfigError

OPEN_CLIP_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
HF_CLIP_MODEL_TYPES = ("clip", "clip_text_model")
OUTPUT_LAYERS = ("last", "penultimate")  # the text blocks whose states `encode` can return


@dataclass(frozen=True)
class TextEncoderConfig:
    open_clip_model: str = ""         # an open_clip architecture (e.g. "ViT-H-14"): replaces every size below, context_length too
    output_layer: str = "last"        # states fed to the UNet: "last" block, or "penultimate" (SD 2.x)
    context_length: int = 24          # tokens per prompt incl. start/end (SD: 77); longer prompts are truncated
    width: int = 256                  # text transformer width D: the UNet cross-attends to (B, L, D)
    layers: int = 3                   # text transformer blocks
    heads: int = 4                    # text attention heads
    mlp_ratio: float = 4.0            # feed-forward width / width (text, and a ViT image tower)
    embed_dim: int = 256              # shared image-text embedding (pooled outputs, CLIP score)
    image_size: int = 32              # the image tower's input size (images are resized to it)
    vision_layers: int | tuple[int, ...] = (1, 1, 1, 1)  # image tower: 4 ints = ResNet blocks per stage
    #                                   (open_clip's ModifiedResNet: a conv net learns shapes from few samples),
    #                                   one int = ViT blocks
    vision_width: int = 32            # ResNet stem width (the last stage has 32x as many channels), or ViT width
    vision_head_width: int = 32       # head width of the ResNet's attention pool, or of the ViT blocks
    patch_size: int = 4               # ViT only: patch side, (image_size / patch_size)^2 image tokens
    init_logit_scale: float = 2.6593  # log of the initial contrastive temperature 1/0.07
    causal: bool = True               # text attention: True = CLIP's causal mask; False = bidirectional (each token
    #                                   sees the whole prompt, padding masked), for a tower trained here from scratch

    def __post_init__(self):
        check_choice("model.output_layer", self.output_layer, OUTPUT_LAYERS)
        if self.context_length < 3:
            raise ConfigError(f"model.context_length: needs room for start, end and one word, got {self.context_length}")
        if self.open_clip_model:
            return
        if self.layers < 1 or self.width % self.heads:
            raise ConfigError(f"model: needs at least one layer, and width {self.width} must split into {self.heads} heads")
        if self.output_layer == "penultimate" and self.layers < 2:
            raise ConfigError("model.output_layer: 'penultimate' needs at least 2 layers")
        if isinstance(self.vision_layers, tuple):  # ResNet
            if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
                raise ConfigError(f"model.vision_layers: a ResNet needs 4 stages of at least 1 block, "
                                  f"got {list(self.vision_layers)}")
            if self.image_size % 32 or (self.vision_width * 32) % self.vision_head_width:
                raise ConfigError(f"model: a ResNet image tower needs image_size a multiple of 32 (got {self.image_size}) "
                                  f"and vision_width * 32 a multiple of vision_head_width")
        else:  # ViT
            if self.vision_layers < 1 or self.vision_width % self.vision_head_width:
                raise ConfigError(f"model: a ViT image tower needs at least one layer, and vision_width "
                                  f"{self.vision_width} a multiple of vision_head_width={self.vision_head_width}")
            if self.image_size % self.patch_size:
                raise ConfigError(f"model.image_size: {self.image_size} is not a multiple of patch_size={self.patch_size}")


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder's context length; the end was dropped."""


class TokenizedPrompts(NamedTuple):
    ids: torch.Tensor   # (B, L) token ids: start, prompt, end, padding
    mask: torch.Tensor  # (B, L) 1 for start .. end, 0 for padding (long)


class TextEncoding(NamedTuple):
    states: torch.Tensor  # (B, L, D) per-token states from the configured layer (final LayerNorm applied)
    pooled: torch.Tensor  # (B, P) the prompt's embedding in CLIP space (projected where the model has a projection)
    mask: torch.Tensor    # (B, L) 1 for the prompt's tokens, 0 for padding


def pad_tokens(prompts: list[str], token_lists: Sequence[Sequence[int]], length: int, *, end: int,
               pad: int) -> TokenizedPrompts:
    """(B, L) ids and mask from each prompt's tokens (start .. end), padded with `pad`; a prompt longer than L
    keeps its first L - 1 tokens and the end token, with a PromptTruncatedWarning."""
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, (prompt, tokens) in enumerate(zip(prompts, token_lists)):
        tokens = list(tokens)
        if len(tokens) > length:
            dropped = len(tokens) - length
            warnings.warn(f"prompt truncated to the context length {length}: {dropped} token"
                          f"{'s' if dropped != 1 else ''} dropped from {prompt[:60]!r}"
                          f"{'...' if len(prompt) > 60 else ''}", PromptTruncatedWarning, stacklevel=3)
            tokens = tokens[:length - 1] + [end]
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, :len(tokens)] = 1
    return TokenizedPrompts(ids, mask)


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    return prompts


class TextEncoder(nn.Module):
    """Prompts -> (per-token states, pooled embedding, mask); also CLIP's image tower where there is one.

    Subclasses set `context_length`, `width`, `pooled_dim`, `output_layer`, `image_size`,
    `image_mean`, `image_std`, and implement `tokenize`, `encode_tokens` and `_image_embedding`.
    """

    context_length: int          # L: prompts are padded / truncated to this many tokens
    width: int                   # D: width of the per-token states
    pooled_dim: int              # P: width of the pooled embedding
    output_layer: str            # "last" or "penultimate": which block's states `encode` returns
    image_size: int = 0          # input size of the image tower (0: no image tower)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # the image tower's input normalisation
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    identity: StageIdentity = StageIdentity()  # set by from_pretrained (and the metadata by the loaders)

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        """Token ids and mask (B, L); prompts longer than L are cut (PromptTruncatedWarning)."""
        raise NotImplementedError

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        """States, pooled embedding and mask of tokenized prompts."""
        raise NotImplementedError

    def encode(self, prompts: str | Sequence[str]) -> TextEncoding:
        ids, mask = self.tokenize(prompts)
        return self.encode_tokens(ids.to(self.device), mask.to(self.device))

    def unconditional(self, batch_size: int = 1) -> TextEncoding:
        """The empty prompt's encoding, repeated: the 'no text' input of classifier-free guidance."""
        states, pooled, mask = self.encode([""])
        return TextEncoding(states.expand(batch_size, -1, -1), pooled.expand(batch_size, -1),
                            mask.expand(batch_size, -1))

    def text_embedding(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, P) unit-length CLIP text embeddings (for CLIP score and retrieval)."""
        return F.normalize(self.encode(prompts).pooled, dim=-1)

    # -- images (CLIP score, retrieval) ---------------------------------------------------------

    @property
    def has_image_tower(self) -> bool:
        return self.image_size > 0

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, P) unit-length CLIP image embeddings."""
        if not self.has_image_tower:
            raise CheckpointError("this text encoder has no image tower (a text-only checkpoint), so it cannot "
                                  "embed images; load a full CLIP checkpoint for CLIP score")
        pixels = self.preprocess_images(images).to(next(self.parameters()).dtype)  # the tower's dtype (bf16, ...)
        return F.normalize(self._image_embedding(pixels), dim=-1)

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the image tower's input: resized (bicubic) to image_size, then normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = (images.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.image_size, self.image_size):
            # resize the short side then centre-crop, as CLIP's own preprocessing does
            h, w = x.shape[-2:]
            scale = self.image_size / min(h, w)
            size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
            x = x[..., top:top + self.image_size, left:left + self.image_size]
        mean = x.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.image_std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def _image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- files ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | Path, *, open_clip_model: str | None = None,
                        output_layer: str | None = None, image_tower: bool = True,
                        allow_pickle: bool = False) -> "TextEncoder":
        """Load a text encoder from local files (see `_load` for the formats); its `identity` carries the
        weights hash that the stages trained on it record."""
        from ..stages import stage_hash

        encoder = cls._load(path, open_clip_model=open_clip_model, output_layer=output_layer,
                            image_tower=image_tower, allow_pickle=allow_pickle)
        encoder.identity = dataclasses.replace(encoder.identity, weights_hash=stage_hash(path))
        return encoder

    @classmethod
    def _load(cls, path: str | Path, *, open_clip_model: str | None = None, output_layer: str | None = None,
              image_tower: bool = True, allow_pickle: bool = False) -> "TextEncoder":
        """Load a text encoder from local files, whichever of the supported formats `path` holds.

        path               a latentdiff text-encoder folder (config.json with kind "text_encoder"),
                           a transformers CLIP folder (config.json with model_type clip / clip_text_model,
                           tokenizer files beside it or in ../tokenizer), a folder holding one of these
                           in text_encoder/, or an OpenCLIP checkpoint file (.safetensors/.bin/.pt/.ckpt)
        open_clip_model    the open_clip architecture of a checkpoint file, e.g. "ViT-H-14"
        output_layer       "last" or "penultimate"; default: the saved config's, else "last"
        image_tower        False: no image tower (saves memory and time; no CLIP score); a latentdiff folder
                           of a tower trained here (no open_clip_model) then loads without open_clip
        allow_pickle       read a pickled weights file (.bin / .pt / .pth / .ckpt, or a transformers folder's
                           pytorch_model.bin) with torch.load(weights_only=True); refused otherwise
        """
        # Backends are imported here so that loading one never imports the other's library.
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"text encoder not found: {path}")
        if path.is_file():
            if path.suffix.lower() not in OPEN_CLIP_SUFFIXES:
                raise CheckpointError(f"{path}: not a text encoder checkpoint (expected a folder, or an OpenCLIP "
                                      f"weights file ending in {', '.join(OPEN_CLIP_SUFFIXES)})")
            from .text_encoder_openclip import OpenCLIPTextEncoder
            return OpenCLIPTextEncoder.from_open_clip_file(path, open_clip_model, output_layer=output_layer,
                                                           image_tower=image_tower, allow_pickle=allow_pickle)
        config = path / CONFIG_NAME
        if not config.is_file():
            if (path / "text_encoder").is_dir():
                return cls._load(path / "text_encoder", open_clip_model=open_clip_model, output_layer=output_layer,
                                 image_tower=image_tower, allow_pickle=allow_pickle)
            raise CheckpointError(f"{path}: no {CONFIG_NAME} here; expected a latentdiff or transformers text "
                                  f"encoder folder, or an OpenCLIP checkpoint file")
        info = read_json(config)
        if "kind" in info:
            saved = info.get("config")
            if not image_tower and isinstance(saved, dict) and not saved.get("open_clip_model"):
                from .text_encoder_clip_tower import CLIPTowerTextEncoder
                return CLIPTowerTextEncoder.from_latentdiff_folder(path, output_layer=output_layer)
            from .text_encoder_openclip import OpenCLIPTextEncoder
            return OpenCLIPTextEncoder.from_latentdiff_folder(path, output_layer=output_layer,
                                                              image_tower=image_tower)
        if isinstance(info, dict) and info.get("model_type") in HF_CLIP_MODEL_TYPES:
            from .text_encoder_hf import HFCLIPTextEncoder
            return HFCLIPTextEncoder.from_folder(path, output_layer=output_layer or "last", image_tower=image_tower,
                                                 allow_pickle=allow_pickle)
        found = info.get("model_type") if isinstance(info, dict) else None
        raise CheckpointError(f"{config}: neither a latentdiff text encoder (no 'kind') nor a transformers CLIP "
                              f"config (model_type {found!r}, expected one of {', '.join(HF_CLIP_MODEL_TYPES)})")
