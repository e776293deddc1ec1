"""The Stable Diffusion releases an original single-file checkpoint can hold, and the architecture read
off its weights.

A CompVis checkpoint stores weights only. Most of the architecture follows from the tensors' names and
shapes (levels, widths, blocks, attention placement, context width, linear or conv projections); what
does not — attention heads, GroupNorm groups, the text encoder's output layer and activation, latent
scale, schedule and prediction type — comes from the table below. The text encoder's layout picks the
family (SD 1.x: transformers CLIP under cond_stage_model.transformer., SD 2.x: OpenCLIP under
cond_stage_model.model.), and the context width picks it where there is no text encoder. SD 2.x comes
as 768-v (v-prediction, the default here) and 512-base (ε-prediction): name "sd2-base" for the latter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import CLIPTextConfig

from ..diffusion.schedules import ScheduleConfig
from ..errors import CheckpointError
from ..models.autoencoder import AutoencoderConfig
from ..models.text_encoder import TextEncoderConfig
from ..models.unet import UNetConfig
from ..samplers import SamplingConfig
from .scheduler_config import SD_GUIDANCE_SCALE, SD_STEPS
from .vae_keys import SD_LATENT_SCALE


@dataclass(frozen=True)
class SDVariant:
    description: str
    text_layout: str                  # "transformers" (SD 1.x) or "open_clip" (SD 2.x)
    context_dim: int                  # text-token width the UNet cross-attends to
    unet_num_heads: int               # attention heads per level (0: use unet_head_dim)
    unet_head_dim: int                # attention head width (0: use unet_num_heads)
    upcast_attention: bool            # attention in fp32 under fp16 (SD 2.1's 768-v needs it)
    text_activation: str              # the CLIP MLP activation, transformers' name
    output_layer: str                 # text states from the "last" or "penultimate" block
    pad_token: str                    # "eos" (SD 1.x) or "zero" (open_clip, SD 2.x): see text_encoder_keys.PAD_TOKENS
    prediction: str                   # "eps" or "v"
    image_size: int                   # the resolution it was trained at
    text_head_width: int = 64         # CLIP text heads are 64 wide in every SD release
    norm_groups: int = 32             # GroupNorm groups in the UNet and the autoencoder
    latent_scale: float = SD_LATENT_SCALE  # the SD autoencoder's latent scale (about 1 / latent std)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # scaled-linear β 0.00085..0.012, T = 1000
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        steps=SD_STEPS, guidance_scale=SD_GUIDANCE_SCALE, spacing="leading", steps_offset=1))


SD_VARIANTS: dict[str, SDVariant] = {
    "sd1": SDVariant("Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, 512 px, ε-prediction)", "transformers",
                     768, 8, 0, False, "quick_gelu", "last", "eos", "eps", 512),
    "sd2": SDVariant("Stable Diffusion 2.x 768-v (OpenCLIP ViT-H/14 text encoder, 768 px, v-prediction)",
                     "open_clip", 1024, 0, 64, True, "gelu", "penultimate", "zero", "v", 768),
    "sd2-base": SDVariant("Stable Diffusion 2.x 512-base (OpenCLIP ViT-H/14 text encoder, 512 px, ε-prediction)",
                          "open_clip", 1024, 0, 64, False, "gelu", "penultimate", "zero", "eps", 512),
}
FAMILY_BY_LAYOUT = {"transformers": "sd1", "open_clip": "sd2"}
FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2"}


def pick_variant(name: str | None, text_layout: str | None, context_dim: int) -> SDVariant:
    """The named variant, else the family of the text encoder's layout, else of the context width."""
    if name is not None:
        if name not in SD_VARIANTS:
            raise CheckpointError(f"unknown SD variant {name!r} (known: {', '.join(SD_VARIANTS)})")
        if text_layout not in (None, SD_VARIANTS[name].text_layout):
            raise CheckpointError(f"variant {name!r} has a {SD_VARIANTS[name].text_layout} text encoder, the "
                                  f"checkpoint a {text_layout} one")
        return SD_VARIANTS[name]
    family = FAMILY_BY_LAYOUT.get(text_layout) if text_layout else FAMILY_BY_CONTEXT.get(context_dim)
    if family is None:
        raise CheckpointError(f"cannot tell the SD version of a checkpoint without a text encoder and with context "
                              f"width {context_dim}; pass a diffusers config folder (--config)")
    return SD_VARIANTS[family]


def _indices(state: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.match, state) if m})


def _shape(state: dict, key: str, where: str) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{where}: no '{key}'; not a Stable Diffusion layout")
    return state[key].shape


def context_dim_of(unet_state: dict, where: str) -> int:
    for key, value in unet_state.items():
        if key.endswith("attn2.to_k.weight"):
            return value.shape[1]
    raise CheckpointError(f"{where}: no cross-attention weights (attn2.to_k) in the UNet")


def infer_unet_config(state: dict, variant: SDVariant, where: str) -> UNetConfig:
    """The UNetConfig of a CompVis-layout UNet state dict (`model.diffusion_model.` removed)."""
    blocks = _indices(state, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in state]
    levels = len(downsamplers) + 1
    n, rest = divmod(len(blocks) - 1 - len(downsamplers), levels)
    if rest or n < 1 or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{where}: input_blocks {blocks} do not form an SD UNet")
    base = _shape(state, "input_blocks.0.0.weight", where)
    first = [1 + level * (n + 1) for level in range(levels)]  # the first block of each level
    widths = [_shape(state, f"input_blocks.{i}.0.out_layers.3.weight", where)[0] for i in first]
    attention = [level for level, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in state]
    depth = [len(_indices(state, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) or 1 for i in first]
    depth[-1] = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or depth[-1]
    if any(w % base[0] for w in widths):
        raise CheckpointError(f"{where}: level widths {widths} are not multiples of {base[0]}")
    return UNetConfig(
        in_channels=base[1], out_channels=_shape(state, "out.2.weight", where)[0], model_channels=base[0],
        channel_mult=tuple(w // base[0] for w in widths), num_res_blocks=n, attention_levels=tuple(attention),
        num_heads=variant.unet_num_heads or 8, head_dim=variant.unet_head_dim,
        transformer_depth=depth[0] if len(set(depth)) == 1 else tuple(depth),
        context_dim=context_dim_of(state, where),
        use_linear_projection=len(_shape(state, "middle_block.1.proj_in.weight", where)) == 2,
        norm_groups=variant.norm_groups, upcast_attention=variant.upcast_attention)


def infer_autoencoder_config(state: dict, variant: SDVariant, where: str) -> AutoencoderConfig:
    """The AutoencoderConfig of a CompVis-layout autoencoder state dict (`first_stage_model.` removed)."""
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    if not levels or any(".attn." in k for k in state if k.startswith(("encoder.down.", "decoder.up."))):
        raise CheckpointError(f"{where}: not an SD autoencoder layout (no encoder levels, or attention inside them)")
    conv_in = _shape(state, "encoder.conv_in.weight", where)
    widths = [_shape(state, f"encoder.down.{i}.block.0.conv1.weight", where)[0] for i in levels]
    return AutoencoderConfig(
        in_channels=conv_in[1], out_channels=_shape(state, "decoder.conv_out.weight", where)[0], ch=conv_in[0],
        ch_mult=tuple(w // conv_in[0] for w in widths),
        num_res_blocks=len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\.")), attn_resolutions=(),
        mid_attention="encoder.mid.attn_1.q.weight" in state,
        z_channels=_shape(state, "decoder.conv_in.weight", where)[1], norm_groups=variant.norm_groups,
        resolution=variant.image_size, scale_factor=variant.latent_scale)


def _heads(width: int, variant: SDVariant, where: str) -> int:
    if width % variant.text_head_width:
        raise CheckpointError(f"{where}: text width {width} is not a multiple of SD's head width "
                              f"{variant.text_head_width}; pass a diffusers config folder (--config)")
    return width // variant.text_head_width


def infer_transformers_text_config(state: dict, variant: SDVariant, where: str) -> CLIPTextConfig:
    """The CLIPTextConfig of a CLIPTextModel state dict (SD 1.x's cond_stage_model.transformer.text_model.*)."""
    vocab, width = _shape(state, "embeddings.token_embedding.weight", where)
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_attention_heads=_heads(width, variant, where),
        intermediate_size=_shape(state, "encoder.layers.0.mlp.fc1.weight", where)[0],
        num_hidden_layers=len(_indices(state, r"encoder\.layers\.(\d+)\.")),
        max_position_embeddings=_shape(state, "embeddings.position_embedding.weight", where)[0],
        hidden_act=variant.text_activation, projection_dim=width, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 1 if variant.pad_token == "eos" else 0, architectures=["CLIPTextModel"])


def open_clip_text_config(state: dict, heads: int, output_layer: str, where: str) -> TextEncoderConfig:
    """Our TextEncoderConfig for an open_clip text tower's state dict (SD 2.x's `cond_stage_model.model.` removed).

    Only the text tower is loaded; the image-tower fields keep their (small) defaults and go unused.
    """
    context, width = _shape(state, "positional_embedding", where)
    projection = state.get("text_projection")
    return TextEncoderConfig(
        output_layer=output_layer, context_length=context, width=width, heads=heads,
        layers=len(_indices(state, r"transformer\.resblocks\.(\d+)\.")),
        mlp_ratio=_shape(state, "transformer.resblocks.0.mlp.c_fc.weight", where)[0] / width,
        embed_dim=projection.shape[1] if projection is not None else width)


def infer_open_clip_text_config(state: dict, variant: SDVariant, where: str) -> TextEncoderConfig:
    width = _shape(state, "positional_embedding", where)[1]
    return open_clip_text_config(state, _heads(width, variant, where), variant.output_layer, where)
