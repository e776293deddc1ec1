"""Original Stable Diffusion single-file checkpoints (the CompVis / ldm key layout), read and written.

    model.diffusion_model.*          the UNet, in our own key names (ldm's openaimodel)
    first_stage_model.*              the autoencoder, in our own key names (CompVis)
    cond_stage_model.transformer.*   SD 1.x text encoder: a transformers CLIPTextModel (text_model.* inside)
    cond_stage_model.model.*         SD 2.x text encoder: an OpenCLIP text tower
    betas, alphas_cumprod, ...       the noise schedule's buffers, checked against the schedule used

The architecture comes, first found first used, from a diffusers config folder (`config=`), from the
latentdiff metadata that our own exports carry, or from the weights' shapes and the SD table
(sd_variants.py). Tensors that have no place are an error naming them; two groups are skipped on purpose,
with a warning: the EMA copy (`model_ema.*`, a second UNet) and the autoencoder's training loss networks.

The tokenizer of an SD 1.x file (transformers layout) is, first found first used, `tokenizer=` (a local
folder), the config folder's tokenizer/, or CLIP's BPE vocabulary as open_clip ships it (the same
vocabulary as SD's tokenizers). SD 2.x files use open_clip's bundled tokenizer, as SD 2.x does.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..checkpoint import load_state_dict_strict, read_json, read_weights, save_tensors
from ..config import from_dict, to_dict
from ..diffusion import NoiseSchedule
from ..diffusion.schedules import ScheduleConfig
from ..errors import CheckpointError, ConfigError, short_list
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL
from ..models.text_encoder import TextEncoder, TextEncoderConfig
from ..models.text_encoder_hf import HFCLIPTextEncoder
from ..models.text_encoder_openclip import CLIP_VOCAB_SIZE, OpenCLIPTextEncoder
from ..models.unet import UNet, UNetConfig
from ..pipeline import Text2ImagePipeline
from ..samplers import SamplingConfig
from .assemble import assemble_pipeline, refuse_if_not_sd, warn_if_masked
from .diffusers_format import read_architecture
from .mapping import require, split_prefix
from .sd_variants import (
    context_dim_of,
    infer_autoencoder_config,
    infer_open_clip_text_config,
    infer_transformers_text_config,
    infer_unet_config,
    open_clip_text_config,
    pick_variant,
)
from .text_encoder_keys import (
    PAD_TOKENS,
    bundled_clip_tokenizer,
    default_logit_scale,
    identity_block,
    local_clip_tokenizer,
    open_clip_activation,
    transformers_to_open_clip,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"transformers": "cond_stage_model.transformer.", "open_clip": "cond_stage_model.model."}
HF_TEXT_MODEL = "text_model."  # inside cond_stage_model.transformer. (older transformers saved without it)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")
SKIPPED = {"model_ema.": "the EMA copy of the UNet", "first_stage_model.loss.": "the autoencoder's training losses"}
METADATA_KEY = "latentdiff"
METADATA_VERSION = 1


class SkippedWeightsWarning(UserWarning):
    """Tensors of a checkpoint that are not part of the pipeline (EMA copy, training losses) were not loaded."""


@dataclass(frozen=True)
class Architecture:
    """Everything a single file needs besides its tensors (written as JSON metadata by save_single_file)."""
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    text_layout: str                  # "transformers" or "open_clip"
    text: dict                        # transformers: CLIPTextConfig.to_dict(); open_clip: our TextEncoderConfig
    output_layer: str                 # the transformers encoder's ("last" or "penultimate"); open_clip's is in `text`
    pad_token: str                    # the tokenizer's padding token (transformers layout)
    schedule: ScheduleConfig
    prediction: str
    sampling: SamplingConfig
    image_size: int
    context_mask: bool = False        # padding hidden from the UNet (latentdiff-trained pipelines; SD: no)


@dataclass
class Parts:
    """A single file's tensors, split by stage, prefixes removed."""
    unet: dict
    autoencoder: dict
    text: dict
    text_layout: str | None
    schedule: dict


def split_checkpoint(state: dict[str, torch.Tensor], where: str) -> Parts:
    """Sort every tensor into a stage, the schedule buffers, or a deliberately skipped group; the rest is an error."""
    skipped = {prefix: [k for k in state if k.startswith(prefix)] for prefix in SKIPPED}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(SKIPPED))}
    layouts = [name for name, prefix in TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in state)]
    if len(layouts) > 1:
        raise CheckpointError(f"{where}: holds both an SD 1.x and an SD 2.x text encoder")
    known = (UNET_PREFIX, VAE_PREFIX, *TEXT_PREFIXES.values())
    unknown = [k for k in state if k not in SCHEDULE_BUFFERS and not k.startswith(known)]
    if unknown:
        raise CheckpointError(f"{where}: tensors that belong to no Stable Diffusion stage: {short_list(unknown)}")
    layout = layouts[0] if layouts else None
    parts = Parts(split_prefix(state, UNET_PREFIX), split_prefix(state, VAE_PREFIX),
                  split_prefix(state, TEXT_PREFIXES[layout]) if layout else {}, layout,
                  {k: state[k] for k in SCHEDULE_BUFFERS if k in state})
    for name, tensors in (("UNet", parts.unet), ("autoencoder", parts.autoencoder), ("text encoder", parts.text)):
        if not tensors:
            raise CheckpointError(f"{where}: no {name} tensors; not an original Stable Diffusion checkpoint")
    for prefix, keys in skipped.items():
        if keys:
            warnings.warn(f"{where}: skipped {len(keys)} tensors of {SKIPPED[prefix]} ({prefix}*)",
                          SkippedWeightsWarning, stacklevel=3)
    if layout == "transformers":
        parts.text = _transformers_text_state(parts.text, where)
    return parts


def _transformers_text_state(state: dict, where: str) -> dict:
    """A CLIPTextModel state dict: text_model. removed, and the position_ids buffer (older transformers saved
    it; today's computes it) checked and dropped."""
    if any(k.startswith(HF_TEXT_MODEL) for k in state):
        state = {k[len(HF_TEXT_MODEL):] if k.startswith(HF_TEXT_MODEL) else k: v for k, v in state.items()}
    ids = state.pop("embeddings.position_ids", None)
    if ids is not None and not torch.equal(ids.reshape(-1).double().round(), torch.arange(ids.numel()).double()):
        warnings.warn(f"{where}: its text encoder position_ids are not 0, 1, 2, ... (a known defect of some merged "
                      f"checkpoints); they are not used: positions are always 0, 1, 2, ...", SkippedWeightsWarning,
                      stacklevel=4)
    return state


# ---------------------------------------------------------------------------------------------
# The architecture: config folder, our metadata, or the SD table
# ---------------------------------------------------------------------------------------------

def architecture_from_config(folder: Path, parts: Parts, where: str) -> Architecture:
    """The configs of a diffusers folder (its weights are not read) for the tensors of a single file."""
    arch = read_architecture(folder)
    text_config = read_json(folder / "text_encoder" / "config.json")
    if parts.text_layout == "transformers":
        text, output_layer = text_config, "last"
    else:  # diffusers drops SD 2.x's last text block: one block more here means the penultimate layer is read
        layers = len({k.split(".")[2] for k in parts.text if k.startswith("transformer.resblocks.")})
        hidden = require(text_config, "num_hidden_layers", f"{folder}/text_encoder")
        if layers not in (hidden, hidden + 1):
            raise CheckpointError(f"{where}: {layers} text blocks do not fit {folder}/text_encoder ({hidden} layers)")
        output_layer = "penultimate" if layers == hidden + 1 else "last"
        text = to_dict(open_clip_text_config(parts.text, text_config["num_attention_heads"], output_layer, where))
    pad = PAD_TOKENS["eos" if parts.text_layout == "transformers" else "zero"]  # the SD tokenizers'
    return Architecture(arch.unet, arch.autoencoder, parts.text_layout, text, output_layer, pad,
                        arch.schedule, arch.prediction, arch.sampling, arch.image_size)


def architecture_from_metadata(metadata: dict[str, str], where: str) -> Architecture | None:
    """The architecture a latentdiff export recorded, or None for files written elsewhere."""
    if METADATA_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[METADATA_KEY])
        if data.pop("version", 0) > METADATA_VERSION:
            raise CheckpointError(f"{where}: written by a newer latentdiff; upgrade to read it")
        configs = {"unet": UNetConfig, "autoencoder": AutoencoderConfig, "schedule": ScheduleConfig,
                   "sampling": SamplingConfig}
        return Architecture(**{**data, **{k: from_dict(cls, data[k], k) for k, cls in configs.items()}})
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{where}: unreadable latentdiff metadata ({type(err).__name__}: {err})") from None


def architecture_from_weights(parts: Parts, variant_name: str | None, where: str) -> Architecture:
    variant = pick_variant(variant_name, parts.text_layout, context_dim_of(parts.unet, where))
    try:
        if parts.text_layout == "transformers":
            text = infer_transformers_text_config(parts.text, variant, where).to_dict()
        else:
            text = to_dict(infer_open_clip_text_config(parts.text, variant, where))
        unet = infer_unet_config(parts.unet, variant, where)
        autoencoder = infer_autoencoder_config(parts.autoencoder, variant, where)
    except ConfigError as err:  # the shapes break one of SD's rules (head width, GroupNorm groups, ...)
        raise CheckpointError(f"{where}: not a {variant.description} ({err}); describe it with --config") from None
    return Architecture(unet, autoencoder, parts.text_layout, text, variant.output_layer,
                        PAD_TOKENS[variant.pad_token], variant.schedule, variant.prediction, variant.sampling,
                        variant.image_size)


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

def load_single_file(path: str | Path, *, config: str | Path | None = None, variant: str | None = None,
                     prediction: str | None = None, tokenizer: str | Path | None = None,
                     allow_pickle: bool = False) -> Text2ImagePipeline:
    """A Text2ImagePipeline from an original SD checkpoint file (.safetensors; .ckpt with allow_pickle).

    config      a diffusers folder whose configs describe the architecture (its weights are not read)
    variant     an SD_VARIANTS name ("sd1", "sd2", "sd2-base"): read the architecture off the weights with it
    prediction  "eps" / "v" / "x0", overriding the detected or configured prediction type
    tokenizer   a local CLIPTokenizer folder for an SD 1.x text encoder
    """
    path = Path(path)
    where = str(path)
    state, metadata = read_weights(path, allow_pickle=allow_pickle)
    parts = split_checkpoint(state, where)
    if config is not None and variant is not None:
        raise CheckpointError(f"{where}: give a config folder or an SD variant, not both")
    if config is not None:
        arch = architecture_from_config(Path(config), parts, where)
    elif variant is not None:
        arch = architecture_from_weights(parts, variant, where)
    else:
        arch = architecture_from_metadata(metadata, where) or architecture_from_weights(parts, None, where)
    if arch.text_layout != parts.text_layout:
        raise CheckpointError(f"{where}: holds a {parts.text_layout} text encoder, its architecture says "
                              f"{arch.text_layout}")
    if prediction is not None:
        arch = dataclasses.replace(arch, prediction=prediction)
    check_schedule(parts.schedule, arch.schedule, where)

    unet = UNet(arch.unet)
    load_state_dict_strict(unet, parts.unet, f"{where} ({UNET_PREFIX}*)")
    autoencoder = AutoencoderKL(arch.autoencoder)
    load_state_dict_strict(autoencoder, parts.autoencoder, f"{where} ({VAE_PREFIX}*)")
    text_encoder = build_text_encoder(arch, parts.text, where, tokenizer, config)
    return assemble_pipeline(autoencoder, text_encoder, unet, prediction=arch.prediction, schedule=arch.schedule,
                             sampling=arch.sampling, image_size=arch.image_size, source=path,
                             context_mask=arch.context_mask)


def build_text_encoder(arch: Architecture, state: dict, where: str, tokenizer: str | Path | None,
                       config: str | Path | None) -> TextEncoder:
    location = f"{where} ({TEXT_PREFIXES[arch.text_layout]}*)"
    if arch.text_layout == "open_clip":
        if tokenizer is not None:
            raise CheckpointError(f"{where}: an SD 2.x (OpenCLIP) text encoder uses open_clip's tokenizer; "
                                  f"--tokenizer is for SD 1.x checkpoints")
        encoder = OpenCLIPTextEncoder(from_dict(TextEncoderConfig, arch.text, "text"))
        encoder.drop_image_tower()
        load_state_dict_strict(encoder.clip, state, location)
        return encoder
    model = CLIPTextModel(CLIPTextConfig.from_dict(arch.text))
    load_state_dict_strict(model, state, location)
    if tokenizer is not None:
        clip_tokenizer = local_clip_tokenizer(tokenizer)
    elif config is not None and (Path(config) / "tokenizer").is_dir():
        clip_tokenizer = local_clip_tokenizer(Path(config) / "tokenizer")
    else:
        clip_tokenizer = bundled_clip_tokenizer(model.config.max_position_embeddings, arch.pad_token)
    return HFCLIPTextEncoder(model.eval(), clip_tokenizer, arch.output_layer)


def check_schedule(buffers: dict[str, torch.Tensor], schedule: ScheduleConfig, where: str) -> None:
    """The checkpoint's own alphas_cumprod (when it has one) must be the schedule we will sample with."""
    stored = buffers.get("alphas_cumprod")
    if stored is None:
        return
    ours = NoiseSchedule.from_config(schedule).alphas_cumprod
    if stored.shape != ours.shape or not torch.allclose(stored.double(), ours, rtol=1e-4, atol=1e-7):
        raise CheckpointError(f"{where}: its noise schedule (alphas_cumprod) is not {schedule}; describe the model "
                              f"with --config (a diffusers folder whose scheduler config matches)")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def text_encoder_for_single_file(encoder: TextEncoder) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors with their cond_stage_model prefix, the Architecture fields of the text encoder).

    SD 2.x-style encoders (open_clip, or transformers with GELU and id-0 padding) are written in the
    OpenCLIP layout, which SD 2.x readers take the penultimate block of: a "last"-layer encoder gets an
    identity block appended so that their penultimate block is its last one. Others use SD 1.x's layout.
    """
    if isinstance(encoder, HFCLIPTextEncoder):
        text_model = getattr(encoder.model, "text_model", encoder.model)
        config = text_model.config
        pad = encoder.tokenizer.pad_token
        if not (config.hidden_act == "gelu" and pad == PAD_TOKENS["zero"] and config.vocab_size == CLIP_VOCAB_SIZE):
            prefix = TEXT_PREFIXES["transformers"] + HF_TEXT_MODEL
            return ({prefix + k: v for k, v in text_model.state_dict().items()},
                    dict(text_layout="transformers", text=config.to_dict(), output_layer=encoder.output_layer,
                         pad_token=pad))
        state = transformers_to_open_clip(text_model.state_dict())
        like = state["positional_embedding"]
        projection = encoder.projection
        state["text_projection"] = (projection.weight.T.contiguous() if projection is not None
                                    else torch.eye(config.hidden_size, dtype=like.dtype))  # CLIPTextModel: unprojected
        state["logit_scale"] = getattr(encoder.model, "logit_scale", default_logit_scale(like)).detach().clone()
        heads = config.num_attention_heads
    elif isinstance(encoder, OpenCLIPTextEncoder):
        if open_clip_activation(encoder.clip) != "gelu":
            raise CheckpointError("an open_clip text tower with QuickGELU has no SD 2.x single-file layout")
        state = {k: v for k, v in encoder.clip.state_dict().items() if not k.startswith("visual.")}
        heads = encoder.clip.transformer.resblocks[0].attn.num_heads
    else:
        raise CheckpointError(f"cannot write a {type(encoder).__name__} text encoder to a single file")
    if encoder.output_layer == "last":
        width = state["positional_embedding"].shape[1]
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        state.update(identity_block(width, state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], layers,
                                    state["positional_embedding"]))
    text = open_clip_text_config(state, heads, "penultimate", "text encoder")
    return ({TEXT_PREFIXES["open_clip"] + k: v for k, v in state.items()},
            dict(text_layout="open_clip", text=to_dict(text), output_layer="penultimate", pad_token=PAD_TOKENS["zero"]))


def save_single_file(pipe: Text2ImagePipeline, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write `pipe` as an original SD checkpoint (.safetensors, CompVis layout, latentdiff metadata)."""
    refuse_if_not_sd(pipe, "single-file")
    warn_if_masked(pipe, "single-file")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: single-file checkpoints are written as .safetensors")
    text_state, text_arch = text_encoder_for_single_file(pipe.text_encoder)
    record = pipe.record
    arch = Architecture(unet=pipe.unet.config, autoencoder=pipe.autoencoder.config, schedule=record.schedule,
                        prediction=record.prediction, sampling=record.sampling,
                        image_size=record.image_size or 8 * pipe.size_multiple, context_mask=record.context_mask,
                        **text_arch)
    schedule = NoiseSchedule.from_config(record.schedule)
    state = {**{UNET_PREFIX + k: v for k, v in pipe.unet.state_dict().items()},
             **{VAE_PREFIX + k: v for k, v in pipe.autoencoder.state_dict().items()}, **text_state,
             "betas": schedule.betas.float(), "alphas_cumprod": schedule.alphas_cumprod.float()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(state, path, metadata={"format": "pt",
                                        METADATA_KEY: json.dumps({"version": METADATA_VERSION, **to_dict(arch)})})
