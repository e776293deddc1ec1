"""The transformers backend: CLIPTextModel (+ CLIPTokenizer) from a local folder — the SD 1.x text encoder.

A folder whose config.json has model_type "clip_text_model" loads as CLIPTextModel (or
CLIPTextModelWithProjection when its `architectures` says so); model_type "clip" loads the whole
CLIPModel, whose image tower then serves CLIP score. The tokenizer files sit in the same folder or,
in a diffusers pipeline layout, in the sibling folder `tokenizer/`. Only local files are read, and the
weights through checkpoint.read_model_weights: model.safetensors (or its shards), or pytorch_model.bin
only with allow_pickle=True.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..checkpoint import StageIdentity, atomic_directory, read_json, read_model_weights
from ..errors import CheckpointError, short_list
from .text_encoder import OUTPUT_LAYERS, TextEncoder, TextEncoding, TokenizedPrompts, as_prompt_list, pad_tokens

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# CLIP's image normalisation, used when the folder has no preprocessor_config.json
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _find_tokenizer_folder(folder: Path) -> Path:
    for candidate in (folder, folder.parent / "tokenizer"):
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    raise CheckpointError(f"{folder}: no CLIP tokenizer files ({' or '.join(TOKENIZER_FILES)}) here "
                          f"or in {folder.parent / 'tokenizer'}")


def _image_normalisation(folder: Path) -> tuple[tuple, tuple]:
    for candidate in (folder / "preprocessor_config.json", folder.parent / "feature_extractor" / "preprocessor_config.json"):
        if candidate.is_file():
            info = json.loads(candidate.read_text())
            if "image_mean" in info and "image_std" in info:
                return tuple(info["image_mean"]), tuple(info["image_std"])
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class HFCLIPTextEncoder(TextEncoder):
    """TextEncoder over a transformers CLIP model (kept as `self.model`) and its tokenizer."""

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection | CLIPModel, tokenizer: CLIPTokenizer,
                 output_layer: str = "last", image_mean: tuple = OPENAI_CLIP_MEAN, image_std: tuple = OPENAI_CLIP_STD):
        super().__init__()
        if output_layer not in OUTPUT_LAYERS:
            raise CheckpointError(f"output_layer: {output_layer!r} is not one of {', '.join(map(repr, OUTPUT_LAYERS))}")
        self.model, self.tokenizer, self.output_layer = model, tokenizer, output_layer
        text_config = model.config.text_config if isinstance(model, CLIPModel) else model.config
        self.context_length = min(text_config.max_position_embeddings, tokenizer.model_max_length)
        self.width = text_config.hidden_size
        self.pooled_dim = self.projection.out_features if self.projection is not None else self.width
        if isinstance(model, CLIPModel):
            self.image_size = model.config.vision_config.image_size
            self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @property
    def projection(self) -> torch.nn.Linear | None:
        """CLIPModel and CLIPTextModelWithProjection map the pooled state into CLIP space; CLIPTextModel does not."""
        return getattr(self.model, "text_projection", None)

    @classmethod
    def from_folder(cls, folder: str | Path, *, output_layer: str = "last", image_tower: bool = True,
                    allow_pickle: bool = False) -> "HFCLIPTextEncoder":
        folder = Path(folder)
        info = read_json(folder / "config.json")
        if info.get("model_type") == "clip":
            model_class = CLIPModel
        elif "CLIPTextModelWithProjection" in (info.get("architectures") or ()):
            model_class = CLIPTextModelWithProjection
        else:
            model_class = CLIPTextModel
        tokenizer_folder = _find_tokenizer_folder(folder)
        # our reader opens the weights file; transformers only builds the model and renames legacy keys
        state = read_model_weights(folder, "model", pickled="pytorch_model.bin", allow_pickle=allow_pickle)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
            config = model_class.config_class.from_pretrained(str(folder), local_files_only=True)
            model, report = model_class.from_pretrained(None, config=config, state_dict=state,
                                                        output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{folder}: cannot load the transformers CLIP model "
                                  f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        bad = {k: report[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if report[k]}
        if bad:  # transformers would randomly initialise what is missing; a text encoder must load whole
            raise CheckpointError(f"{folder}: weights do not fit its config.json: "
                                  + "; ".join(f"{k.replace('_', ' ')} {short_list(v)}" for k, v in bad.items()))
        mean, std = _image_normalisation(folder)
        encoder = cls(model.eval(), tokenizer, output_layer, mean, std)
        if not image_tower:
            encoder.drop_image_tower()
        encoder.identity = StageIdentity(metadata={"source": str(folder)})
        return encoder.eval()

    def drop_image_tower(self) -> None:
        if isinstance(self.model, CLIPModel):
            self.model.vision_model = None
            self.model.visual_projection = None
        self.image_size = 0

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, prompts) -> TokenizedPrompts:
        """The CLIPTokenizer's ids (start, BPE, end, its pad token), cut to the context length with a warning."""
        prompts = as_prompt_list(prompts)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        tokens = self.tokenizer(prompts, verbose=False)["input_ids"]
        return pad_tokens(prompts, tokens, self.context_length, end=eos, pad=pad)

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        """Causal mask only, no padding mask — as Stable Diffusion calls the text model."""
        text_model = getattr(self.model, "text_model", self.model)  # transformers 5: CLIPTextModel is the transformer
        penultimate = self.output_layer == "penultimate"
        out = text_model(input_ids=ids, output_hidden_states=penultimate)
        # hidden_states[-2] is the output of the second-to-last block, before the final LayerNorm
        states = text_model.final_layer_norm(out.hidden_states[-2]) if penultimate else out.last_hidden_state
        pooled = out.pooler_output  # (B, D): the end-of-text token of the last block
        if self.projection is not None:
            pooled = self.projection(pooled)  # (B, P)
        return TextEncoding(states, pooled, mask)

    def _image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        """A transformers folder (model + tokenizer), loadable again with TextEncoder.from_pretrained."""
        with atomic_directory(folder) as tmp:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
