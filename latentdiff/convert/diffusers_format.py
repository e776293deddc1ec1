"""diffusers pipeline folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), read
and written without diffusers: JSON configs and safetensors weights, transformers for the text encoder.

    pipe = load_diffusers("stable-diffusion-v1-5")      # a Text2ImagePipeline
    save_diffusers(pipe, "exported")                    # StableDiffusionPipeline.from_pretrained("exported")

Export writes a CLIPTextModel: an open_clip text tower is converted, CLIP's image tower (CLIP score only)
is left out, and a penultimate-layer encoder loses its unused last block, as diffusers' own SD 2.x
folders do, so that diffusers' default (the last hidden state) is our penultimate one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..checkpoint import (
    atomic_directory,
    atomic_write_json,
    load_state_dict_strict,
    read_json,
    read_model_weights,
    save_tensors,
)
from ..config import from_dict, to_dict
from ..diffusion.schedules import ScheduleConfig
from ..errors import CheckpointError, ConfigError
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL
from ..models.text_encoder import TextEncoder
from ..models.text_encoder_hf import HFCLIPTextEncoder
from ..models.text_encoder_openclip import OpenCLIPTextEncoder
from ..models.unet import UNet, UNetConfig
from ..pipeline import Text2ImagePipeline
from ..samplers import SamplingConfig
from .assemble import assemble_pipeline, refuse_if_not_sd, warn_if_masked
from .scheduler_config import schedule_from_diffusers, schedule_to_diffusers
from .text_encoder_keys import (
    PAD_TOKENS,
    bundled_clip_tokenizer,
    open_clip_to_transformers,
    transformers_config_for_open_clip,
)
from .unet_keys import unet_config_from_diffusers, unet_config_to_diffusers, unet_from_diffusers, unet_to_diffusers
from .vae_keys import vae_config_from_diffusers, vae_config_to_diffusers, vae_from_diffusers, vae_to_diffusers

MODEL_INDEX = "model_index.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
SCHEDULER_CONFIG = "scheduler_config.json"
# What diffusers has no field for (sampling defaults, padding mask), kept beside its files; diffusers ignores it.
EXTRAS_FILE = "latentdiff.json"
DIFFUSERS_VERSION = "0.30.0"  # the diffusers release whose folder format is written (read by every later one)
COMPONENTS = {  # component: (library, accepted classes)
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", None),  # any: only its config is read
}
NOT_NEEDED = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")


def check_model_index(folder: Path) -> None:
    """Refuse pipelines other than Stable Diffusion's (SDXL's second text encoder, an unknown UNet, ...)."""
    index = read_json(folder / MODEL_INDEX)
    problems = []
    for name, (library, classes) in COMPONENTS.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2:
            problems.append(f"no {name}")
        elif classes is not None and (entry[0] != library or entry[1] not in classes):
            problems.append(f"{name} is {entry[0]}.{entry[1]}, expected {library}.{' or '.join(classes)}")
    extra = sorted(k for k, v in index.items()
                   if not k.startswith("_") and k not in COMPONENTS and k not in NOT_NEEDED and v != [None, None])
    if extra:
        problems.append(f"components this pipeline has no place for: {', '.join(extra)}")
    if problems:
        raise CheckpointError(f"{folder}: not a Stable Diffusion pipeline folder ({index.get('_class_name')}): "
                              + "; ".join(problems))


@dataclass(frozen=True)
class DiffusersArchitecture:
    """What a diffusers folder's configs say, in our configs."""
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    schedule: ScheduleConfig
    prediction: str
    sampling: SamplingConfig
    image_size: int                   # pixels (the UNet's sample_size times the autoencoder's factor)


def read_architecture(folder: str | Path) -> DiffusersArchitecture:
    """Our configs for the UNet, autoencoder and schedule of a diffusers folder (its weights are not read)."""
    folder = Path(folder)
    unet, sample_size = unet_config_from_diffusers(read_json(folder / "unet" / "config.json"), f"{folder}/unet")
    autoencoder = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"), f"{folder}/vae")
    schedule, prediction, sampling = schedule_from_diffusers(read_json(folder / "scheduler" / SCHEDULER_CONFIG),
                                                            f"{folder}/scheduler")
    return DiffusersArchitecture(unet, autoencoder, schedule, prediction, sampling,
                                 sample_size * autoencoder.downsample_factor)


def load_diffusers(folder: str | Path, *, allow_pickle: bool = False) -> Text2ImagePipeline:
    """A Text2ImagePipeline from a diffusers Stable Diffusion folder (SD 1.x / 2.x); every tensor must fit."""
    folder = Path(folder)
    check_model_index(folder)
    arch = read_architecture(folder)
    unet = UNet(arch.unet)
    state = read_model_weights(folder / "unet", WEIGHTS_STEM, allow_pickle=allow_pickle)
    load_state_dict_strict(unet, unet_from_diffusers(state, arch.unet, f"{folder}/unet"), f"{folder}/unet")
    autoencoder = AutoencoderKL(arch.autoencoder)
    state = read_model_weights(folder / "vae", WEIGHTS_STEM, allow_pickle=allow_pickle)
    load_state_dict_strict(autoencoder, vae_from_diffusers(state, arch.autoencoder, f"{folder}/vae"), f"{folder}/vae")
    text_folder = folder / "text_encoder"
    text_encoder = HFCLIPTextEncoder.from_folder(text_folder, output_layer="last", image_tower=False,
                                                 allow_pickle=allow_pickle)
    sampling, image_size, context_mask = arch.sampling, arch.image_size, False
    if (folder / EXTRAS_FILE).is_file():  # written by save_diffusers
        extras = read_json(folder / EXTRAS_FILE)
        try:
            sampling = from_dict(SamplingConfig, extras.get("sampling", {}), "sampling")
        except ConfigError as err:
            raise CheckpointError(f"{folder / EXTRAS_FILE}: {err}") from None
        image_size, context_mask = extras.get("image_size", image_size), bool(extras.get("context_mask", False))
    return assemble_pipeline(autoencoder, text_encoder, unet, prediction=arch.prediction, schedule=arch.schedule,
                             sampling=sampling, image_size=image_size, source=folder, context_mask=context_mask)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def clip_text_model_for_diffusers(encoder: TextEncoder) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A transformers CLIPTextModel whose last hidden state is `encoder`'s states, and its tokenizer."""
    drop = 1 if encoder.output_layer == "penultimate" else 0
    if isinstance(encoder, HFCLIPTextEncoder):
        text_model = getattr(encoder.model, "text_model", encoder.model)  # CLIPModel / WithProjection hold one
        config = CLIPTextConfig.from_dict({**text_model.config.to_dict(), "architectures": ["CLIPTextModel"]})
        config.num_hidden_layers -= drop
        state = {k: v for k, v in text_model.state_dict().items()
                 if not k.startswith(f"encoder.layers.{config.num_hidden_layers}.")}
        tokenizer = encoder.tokenizer
    elif isinstance(encoder, OpenCLIPTextEncoder):
        clip = encoder.clip
        layers = len(clip.transformer.resblocks) - drop
        config = transformers_config_for_open_clip(clip, layers, pad_token_id=0)  # open_clip pads with 0
        state = open_clip_to_transformers({k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")},
                                          layers)
        tokenizer = bundled_clip_tokenizer(encoder.context_length, PAD_TOKENS["zero"])
    else:
        raise CheckpointError(f"cannot export a {type(encoder).__name__} text encoder to diffusers")
    model = CLIPTextModel(config)
    load_state_dict_strict(model, state, "text encoder")
    return model.eval(), tokenizer


def _write_model(folder: Path, config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    folder.mkdir(parents=True)
    save_tensors({k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in state.items()},
                 folder / f"{WEIGHTS_STEM}.safetensors", metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", {**config, "_diffusers_version": DIFFUSERS_VERSION})


def save_diffusers(pipe: Text2ImagePipeline, folder: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write `pipe` as a diffusers StableDiffusionPipeline folder (atomically); `dtype` casts the weights."""
    refuse_if_not_sd(pipe, "diffusers")
    warn_if_masked(pipe, "diffusers")
    folder = Path(folder)
    unet_cfg, ae_cfg = pipe.unet.config, pipe.autoencoder.config
    image_size = pipe.record.image_size or 8 * pipe.size_multiple
    text_model, tokenizer = clip_text_model_for_diffusers(pipe.text_encoder)
    scheduler = schedule_to_diffusers(pipe.record.schedule, pipe.record.prediction, pipe.sampling)
    with atomic_directory(folder) as tmp:
        _write_model(tmp / "unet", unet_config_to_diffusers(unet_cfg, image_size // ae_cfg.downsample_factor),
                     unet_to_diffusers(pipe.unet.state_dict(), unet_cfg), dtype)
        _write_model(tmp / "vae", vae_config_to_diffusers(ae_cfg),
                     vae_to_diffusers(pipe.autoencoder.state_dict(), ae_cfg), dtype)
        text_model.to(dtype=dtype).save_pretrained(str(tmp / "text_encoder"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        atomic_write_json(tmp / "scheduler" / SCHEDULER_CONFIG, {**scheduler, "_diffusers_version": DIFFUSERS_VERSION})
        atomic_write_json(tmp / MODEL_INDEX, {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False})
        atomic_write_json(tmp / EXTRAS_FILE, {"sampling": to_dict(pipe.sampling), "image_size": image_size,
                                              "context_mask": pipe.record.context_mask})
