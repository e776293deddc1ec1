"""Tiny random stages saved to disk, shared by the diffusion-training and pipeline tests (not a test file)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from latentdiff.config import apply_overrides
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.text_encoder import TextEncoderConfig
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.stages import UNetRecord
from latentdiff.train.diffusion import DiffusionTrainingConfig

# 16x16 images, f = 2: 8x8x4 latents; the text encoder's states are 32 wide.
TINY_AE = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=16, scale_factor=0.8)
TINY_TEXT = TextEncoderConfig(context_length=16, width=32, layers=2, heads=2, embed_dim=24, image_size=16,
                              patch_size=8, vision_width=32, vision_layers=1, vision_head_width=16)
TINY_UNET = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
             "model.attention_levels=[1]", "model.num_heads=2", "model.norm_groups=8", "model.context_dim=32"]
TINY_TRAINING = TINY_UNET + [
    "data.size=16", "data.length=24", "train.batch_size=4", "train.steps=6", "train.checkpoint_every=2",
    "train.log_every=1", "train.sample_every=3", "train.warmup_steps=2", "preview_prompts=[a red circle,a blue square]",
    "preview_images=2", "sampling.steps=3"]


def save_autoencoder(folder: Path, seed: int = 0, **changes) -> Path:
    torch.manual_seed(seed)
    AutoencoderKL(dataclasses.replace(TINY_AE, **changes)).save_pretrained(folder, metadata={"step": 0})
    return folder


def save_text_encoder(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    OpenCLIPTextEncoder(TINY_TEXT).save_pretrained(folder)
    return folder


def tiny_training_config(autoencoder: Path, text_encoder: Path, *extra: str) -> DiffusionTrainingConfig:
    return apply_overrides(DiffusionTrainingConfig(), TINY_TRAINING + [f"autoencoder={autoencoder}",
                                                                      f"text_encoder={text_encoder}", *extra])


def save_unet(folder: Path, autoencoder: Path, text_encoder: Path, seed: int = 0) -> Path:
    """A random UNet recording the two stages, as training would; no layer is zero-initialised, so that it
    reads its input and the prompt."""
    cfg = tiny_training_config(autoencoder, text_encoder)
    torch.manual_seed(seed)
    unet = UNet(cfg.model)
    for param in unet.parameters():  # zero-initialised outputs (UNet.out, attention proj_out) would ignore the input
        if param.ndim > 1 and not param.any():
            torch.nn.init.normal_(param, std=0.05)
    record = UNetRecord.for_stages(AutoencoderKL.from_pretrained(autoencoder), autoencoder,
                                   OpenCLIPTextEncoder.from_latentdiff_folder(text_encoder), text_encoder, folder,
                                   prediction=cfg.objective.prediction, schedule=cfg.schedule, sampling=cfg.sampling,
                                   image_size=cfg.data.size)
    unet.save_pretrained(folder, metadata=record.to_metadata(step=0))
    return folder


def save_stages(root: Path) -> dict[str, Path]:
    """autoencoder/, text_encoder/ and diffusion/ (a run folder holding only the exported UNet) under root."""
    ae = save_autoencoder(root / "autoencoder")
    te = save_text_encoder(root / "text_encoder")
    return {"autoencoder": ae, "text_encoder": te, "unet": save_unet(root / "diffusion", ae, te)}


def unet_config(**changes) -> UNetConfig:
    return dataclasses.replace(apply_overrides(DiffusionTrainingConfig(), TINY_UNET).model, **changes)


def register_open_clip(folder: Path, name: str, text_width: int = 32, text_layers: int = 3) -> None:
    """Register a tiny OpenCLIP architecture under `name` (its JSON written into `folder`), as a user
    registers a custom model."""
    import json

    import open_clip

    path = folder / f"{name}.json"
    path.write_text(json.dumps({
        "embed_dim": 24,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": text_width, "heads": 2,
                     "layers": text_layers},
    }))
    open_clip.add_model_config(path)
