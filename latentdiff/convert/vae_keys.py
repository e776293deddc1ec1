"""The autoencoder between our layout (the original CompVis names, also the SD checkpoints' layout under
`first_stage_model.`) and diffusers' AutoencoderKL: key names, tensor shapes and config fields.

    ours                                  diffusers
    encoder.down.i.block.j                encoder.down_blocks.i.resnets.j      (nin_shortcut -> conv_shortcut)
    encoder.down.i.downsample.conv        encoder.down_blocks.i.downsamplers.0.conv
    decoder.up.i.block.j                  decoder.up_blocks.(L-1-i).resnets.j  (diffusers counts from the bottom)
    decoder.up.i.upsample.conv            decoder.up_blocks.(L-1-i).upsamplers.0.conv
    *.mid.block_1 / block_2               *.mid_block.resnets.0 / resnets.1
    *.mid.attn_1.norm / q / k / v / proj_out   *.mid_block.attentions.0.group_norm / to_q / to_k / to_v / to_out.0
    *.norm_out                            *.conv_norm_out

The attention projections are 1x1 convs here, (C, C, 1, 1), and Linear layers there, (C, C).
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..models.autoencoder import AutoencoderConfig, AutoencoderKL
from .mapping import check_fixed, rename, require

_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# names of the mid-block attention in diffusers releases before 0.14, still found in older folders
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEVEL = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)")
_MID = re.compile(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(.+)")


def _resnet_tail(tail: str) -> str:
    return tail.replace("nin_shortcut.", "conv_shortcut.", 1) if tail.startswith("nin_shortcut.") else tail


def diffusers_vae_key(key: str, levels: int) -> str:
    """The diffusers name of our autoencoder parameter `key` (`levels` = len(ch_mult))."""
    m = _LEVEL.fullmatch(key)
    if m:
        path, i, part, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        side, blocks = path.split(".")[0], "down_blocks" if path == "encoder.down" else "up_blocks"
        index = i if side == "encoder" else levels - 1 - i
        if j is not None:
            return f"{side}.{blocks}.{index}.resnets.{j}.{_resnet_tail(tail)}"
        return f"{side}.{blocks}.{index}.{part}rs.0.{tail}"  # downsample -> downsamplers.0
    m = _MID.fullmatch(key)
    if m:
        side, part, name, tail = m.groups()
        if part == "attn_1":
            return f"{side}.mid_block.attentions.0.{_ATTENTION[name]}.{tail}"
        return f"{side}.mid_block.resnets.{int(part[-1]) - 1}.{_resnet_tail(name + '.' + tail)}"
    return key.replace(".norm_out.", ".conv_norm_out.")  # conv_in, conv_out, quant_conv, post_quant_conv, norm_out


def vae_key_map(cfg: AutoencoderConfig) -> dict[str, str]:
    """{our key: diffusers key} for every parameter of the autoencoder built from `cfg`."""
    with torch.device("meta"):
        keys = list(AutoencoderKL(cfg).state_dict())
    return {key: diffusers_vae_key(key, len(cfg.ch_mult)) for key in keys}


def _is_projection(our_key: str) -> bool:
    """The mid-block attention's q / k / v / proj_out weights: (C, C, 1, 1) here, (C, C) in diffusers."""
    return ".attn_1." in our_key and our_key.endswith(".weight") and ".attn_1.norm." not in our_key


def vae_to_diffusers(state: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Our autoencoder state dict in diffusers' names and shapes."""
    squeezed = {k: (v.reshape(v.shape[:2]) if _is_projection(k) else v) for k, v in state.items()}
    return rename(squeezed, vae_key_map(cfg), "autoencoder")


def vae_from_diffusers(state: dict[str, torch.Tensor], cfg: AutoencoderConfig, where: str) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in our names and shapes; keys with no place here are an error."""
    inverse = {theirs: ours for ours, theirs in vae_key_map(cfg).items()}
    renamed = rename({_current_name(k): v for k, v in state.items()}, inverse, where)
    return {ours: (value.reshape(*value.shape, 1, 1) if _is_projection(ours) else value)
            for ours, value in renamed.items()}


def _current_name(key: str) -> str:
    for old, new in _OLD_ATTENTION.items():
        key = key.replace(f".mid_block.attentions.0.{old}.", f".mid_block.attentions.0.{new}.")
    return key


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

_DIFFUSERS_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                    "use_quant_conv": True, "use_post_quant_conv": True,
                    "down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
SD_LATENT_SCALE = 0.18215  # SD's autoencoder latent scale; diffusers' default for configs without scaling_factor


def vae_config_from_diffusers(config: dict, where: str) -> AutoencoderConfig:
    """Our AutoencoderConfig (scale_factor included) of a diffusers AutoencoderKL config.json."""
    check_fixed(config, _DIFFUSERS_FIXED, where)
    widths = list(require(config, "block_out_channels", where))
    base = widths[0]
    if any(w % base for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} must be multiples of the first")
    if len(config.get("down_block_types", widths)) != len(widths):
        raise CheckpointError(f"{where}: {len(config['down_block_types'])} down blocks for {len(widths)} widths")
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3), ch=base,
        ch_mult=tuple(w // base for w in widths), num_res_blocks=config.get("layers_per_block", 1),
        attn_resolutions=(), mid_attention=bool(config.get("mid_block_add_attention", True)),
        z_channels=config.get("latent_channels", 4), norm_groups=config.get("norm_num_groups", 32),
        resolution=config.get("sample_size", 32),
        scale_factor=float(config.get("scaling_factor", SD_LATENT_SCALE)))


def vae_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    if cfg.attn_resolutions:
        raise CheckpointError(f"autoencoder: attention inside the levels (attn_resolutions={cfg.attn_resolutions}) "
                              f"has no diffusers AutoencoderKL equivalent")
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.resolution,
        "scaling_factor": cfg.scale_factor,
        "mid_block_add_attention": cfg.mid_attention,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }
