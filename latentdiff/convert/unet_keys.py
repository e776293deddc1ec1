"""The UNet between our layout (ldm's openaimodel names, also the original SD checkpoints' layout under
`model.diffusion_model.`) and diffusers' UNet2DConditionModel: key names and config fields.

    ours                                   diffusers
    time_embed.0 / .2                      time_embedding.linear_1 / linear_2
    input_blocks.0.0                       conv_in
    input_blocks.i.0   (i = 1 + L(n+1) + r) down_blocks.L.resnets.r        (r < n)
    input_blocks.i.1                       down_blocks.L.attentions.r
    input_blocks.i.0.op (r = n)            down_blocks.L.downsamplers.0.conv
    middle_block.0 / .1 / .2               mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.i.0  (i = b(n+1) + r)    up_blocks.b.resnets.r           (b = 0 is the deepest level)
    output_blocks.i.1                      up_blocks.b.attentions.r        (levels with attention)
    output_blocks.i.{1|2}.conv  (r = n)    up_blocks.b.upsamplers.0.conv
    out.0 / out.2                          conv_norm_out / conv_out

Inside a ResBlock in_layers.0/.2, emb_layers.1, out_layers.0/.3, skip_connection are norm1/conv1,
time_emb_proj, norm2/conv2, conv_shortcut; the spatial transformers have the same names on both sides.
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..models.unet import UNet, UNetConfig
from .mapping import as_int_or_tuple, check_fixed, per_level, rename, require

_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|middle_block\.(\d+)\.(.+)")


def _resnet_tail(tail: str) -> str:
    for ours, theirs in _RESNET.items():
        if tail.startswith(ours + "."):
            return theirs + tail[len(ours):]
    raise KeyError(tail)


def diffusers_unet_key(key: str, cfg: UNetConfig) -> str:
    """The diffusers name of our UNet parameter `key`."""
    for ours, theirs in _FIXED.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    m = _BLOCK.fullmatch(key)
    if m is None:
        raise KeyError(key)
    n, last = cfg.num_res_blocks, len(cfg.channel_mult) - 1
    if m.group(5) is not None:  # middle_block.j
        j, tail = int(m.group(5)), m.group(6)
        return f"mid_block.attentions.0.{tail}" if j == 1 else f"mid_block.resnets.{j // 2}.{_resnet_tail(tail)}"
    path, i, j, tail = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if path == "input_blocks":
        level, r = divmod(i - 1, n + 1)
        if r == n:
            return f"down_blocks.{level}.downsamplers.0.{tail.replace('op.', 'conv.', 1)}"
        return (f"down_blocks.{level}.resnets.{r}.{_resnet_tail(tail)}" if j == 0
                else f"down_blocks.{level}.attentions.{r}.{tail}")
    block, r = divmod(i, n + 1)
    if j == 0:
        return f"up_blocks.{block}.resnets.{r}.{_resnet_tail(tail)}"
    if j == 1 and (last - block) in cfg.attention_levels:
        return f"up_blocks.{block}.attentions.{r}.{tail}"
    return f"up_blocks.{block}.upsamplers.0.{tail}"


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """{our key: diffusers key} for every parameter of the UNet built from `cfg` (built on the meta device)."""
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    return {key: diffusers_unet_key(key, cfg) for key in keys}



def unet_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict in diffusers' names (the shapes are the same)."""
    return rename(state, unet_key_map(cfg), "unet")


def unet_from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig, where: str) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in our names; keys with no place here are an error."""
    return rename(state, {theirs: ours for ours, theirs in unet_key_map(cfg).items()}, where)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

# UNet2DConditionModel fields that change the architecture, and the one value of each that SD uses
_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1.0, "act_fn": "silu",
    "norm_eps": 1e-5, "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": (None, False), "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def unet_config_from_diffusers(config: dict, where: str) -> tuple[UNetConfig, int]:
    """(our UNetConfig, sample_size in latent pixels) of a UNet2DConditionModel config.json."""
    check_fixed(config, _DIFFUSERS_FIXED, where)
    down, up = list(require(config, "down_block_types", where)), list(require(config, "up_block_types", where))
    unknown = sorted({t for t in down if t not in _DOWN} | {t for t in up if t not in _UP})
    if unknown:
        raise CheckpointError(f"{where}: unsupported block types {unknown}")
    attention = [_DOWN[t] for t in down]
    if [_UP[t] for t in reversed(up)] != attention:
        raise CheckpointError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    widths = list(require(config, "block_out_channels", where))
    base = widths[0]
    if len(widths) != len(down) or any(w % base for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} must be one multiple of the first per block")
    levels = len(widths)
    if not isinstance(config.get("cross_attention_dim", 1280), int):
        raise CheckpointError(f"{where}: a cross_attention_dim per block is not supported")
    if not isinstance(config.get("layers_per_block", 2), int):
        raise CheckpointError(f"{where}: a layers_per_block per block is not supported")
    # diffusers' `attention_head_dim` is, for these UNets, the number of heads (a historical misnomer);
    # `num_attention_heads`, when set, says the same thing under the right name.
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    cfg = UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        model_channels=base, channel_mult=tuple(w // base for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        attention_levels=tuple(level for level in range(levels) if attention[level]),
        num_heads=as_int_or_tuple(per_level(heads, levels, "attention_head_dim", where)), head_dim=0,
        transformer_depth=as_int_or_tuple(per_level(config.get("transformer_layers_per_block", 1), levels,
                                                    "transformer_layers_per_block", where)),
        context_dim=config.get("cross_attention_dim", 1280),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        dropout=float(config.get("dropout", 0.0)), norm_groups=config.get("norm_num_groups", 32),
        upcast_attention=bool(config.get("upcast_attention", False)))
    return cfg, int(config.get("sample_size") or 0)


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict:
    """The UNet2DConditionModel config.json fields for our UNetConfig (sample_size in latent pixels)."""
    levels = range(len(cfg.channel_mult))
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if lvl in cfg.attention_levels else "DownBlock2D"
                             for lvl in levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if lvl in cfg.attention_levels else "UpBlock2D"
                           for lvl in reversed(levels)],
        "block_out_channels": [cfg.width(lvl) for lvl in levels],
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": as_int_or_tuple(tuple(max(cfg.heads(lvl), 1) for lvl in levels)),  # heads, see above
        "transformer_layers_per_block": as_int_or_tuple(tuple(cfg.depth(lvl) for lvl in levels)),
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }

