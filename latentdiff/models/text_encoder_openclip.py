"""The open_clip backend: a whole CLIP model (text + image towers), built and loaded with open_clip.

Two ways in:
  * built from a TextEncoderConfig (a small model trained here on captioned images), saved as a
    latentdiff folder (the whole CLIP: the image tower is the CLIP-score judge);
  * an OpenCLIP checkpoint file plus the name of its open_clip architecture, e.g. the ViT-H-14 text
    tower that SD 2.x conditions on (with output_layer="penultimate", as SD 2.x does); a pickled one
    (.bin / .pt) only with allow_pickle=True.

The weights keep open_clip's own key names, so a latentdiff folder's model.safetensors is also a
plain OpenCLIP state dict. A file without `visual.*` keys (a text tower alone) loads text-only.

The text side (tokenizer, `encode_tokens`, the causal / bidirectional switch) is CLIPTowerTextEncoder's
(text_encoder_clip_tower.py), which also loads a latentdiff folder text-only without open_clip.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from ..checkpoint import StageIdentity, load_state_dict_strict, read_weights
from ..errors import CheckpointError
from .clip_bpe import CLIP_VOCAB_SIZE
from .text_encoder import TextEncoderConfig
from .text_encoder_clip_tower import CLIPTowerTextEncoder, load_text_weights, with_output_layer

# The keys of the SD 2.x text tower inside an original (CompVis layout) Stable Diffusion checkpoint.
SD2_TEXT_PREFIX = "cond_stage_model.model."


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
        if cfg["text_cfg"].get("pool_type", "argmax") != "argmax":  # encode_tokens pools at the end-of-text token
            unsupported.append(f"pool_type {cfg['text_cfg']['pool_type']!r}")
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


class OpenCLIPTextEncoder(CLIPTowerTextEncoder):
    """CLIPTowerTextEncoder over an open_clip `CLIP` (kept as `self.clip`, open_clip's own module): adds the
    image tower, the training forward and OpenCLIP files; the text forward and the tokenizer are the parent's."""

    def __init__(self, config: TextEncoderConfig, clip: open_clip.CLIP | None = None):
        clip = build_clip(config) if clip is None else clip
        if config.open_clip_model:  # a named architecture brings its own context length (SD: 77)
            config = dataclasses.replace(config, context_length=clip.context_length)
        super().__init__(config, clip)
        if config.open_clip_model:
            self.image_mean, self.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        # else: our own models see the [-1, 1] images as they are (mean = std = 0.5 on [0, 1])
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

    # -- files (save_pretrained and from_latentdiff_folder: the parent's) ---------------------------

    @classmethod
    def from_latentdiff_folder(cls, folder: str | Path, *, output_layer: str | None = None,
                               image_tower: bool = True) -> "OpenCLIPTextEncoder":
        return super().from_latentdiff_folder(folder, output_layer=output_layer, image_tower=image_tower)

    @classmethod
    def from_open_clip_file(cls, path: str | Path, open_clip_model: str | None, *, output_layer: str | None = None,
                            image_tower: bool = True, allow_pickle: bool = False) -> "OpenCLIPTextEncoder":
        path = Path(path)
        if not open_clip_model:
            raise CheckpointError(f"{path}: an OpenCLIP weights file; name its architecture with "
                                  f"open_clip_model=NAME (e.g. 'ViT-H-14' for SD 2.x)")
        config = with_output_layer(TextEncoderConfig(open_clip_model=open_clip_model), output_layer or "last")
        encoder = cls._from_weights(config, read_state_dict(path, allow_pickle=allow_pickle), path, image_tower)
        encoder.identity = StageIdentity(metadata={"source": str(path)})
        return encoder

    @classmethod
    def _from_weights(cls, config: TextEncoderConfig, state_dict: dict, where, image_tower: bool
                      ) -> "OpenCLIPTextEncoder":
        """Build from `config` and load `state_dict` strictly (without visual.* keys, or without image_tower:
        text-only, as the parent loads)."""
        encoder = cls(config)
        if not image_tower or not any(k.startswith("visual.") for k in state_dict):
            encoder.drop_image_tower()
            load_text_weights(encoder.clip, state_dict, where)
        else:
            load_state_dict_strict(encoder.clip, state_dict, where)
        return encoder.eval()
