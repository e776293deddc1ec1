"""Configs: one frozen dataclass per component, loaded from YAML and overridden with `a.b=value`.

The dataclass defaults are the CPU presets for the built-in shapes data; the YAML files under
configs/ hold only dataclass fields, and an unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Machinery: dict <-> dataclass, YAML files, dotted overrides
# ---------------------------------------------------------------------------------------------

class ConfigLoader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true / false. YAML 1.1 also reads yes/no/on/off (any case) as
    booleans, which turned `mixed_precision: no` into False."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain JSON/YAML types (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check `value` against the annotation `kind` and convert lists to tuples, ints to floats."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {kind}")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {kind.__name__} fields, got {value!r}")
        return from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            f"unknown config key '{key}' (known keys{' in ' + where if where else ''}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`model.ch_mult=[1,2,4]` -> ("model.ch_mult", [1, 2, 4]); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: T, overrides: dict[str, Any] | list[str]) -> T:
    """A copy of `cfg` with dotted keys replaced; `overrides` is {key: value} or ["key=value", ...]."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key '{'.'.join(parts[:depth + 1])}'")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return from_dict(type(cfg), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """The defaults of `cls`, updated by the YAML file at `path` (if any), then by `overrides`."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        try:
            cfg = from_dict(cls, _merge(to_dict(cfg), data, ""))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def _merge(base: dict, update: dict, where: str) -> dict:
    """Deep-merge `update` into `base`; sections that are mappings merge, everything else replaces."""
    if not isinstance(update, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {update!r}")
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{where}.{key}" if where else key)
        else:
            merged[key] = value
    return merged


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _check_choice(where: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")


# ---------------------------------------------------------------------------------------------
# Shared by every stage: data and the training loop
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"            # "shapes" (built in) or a folder of images with captions
    size: int = 32                    # training images are size x size pixels
    crop: str = "center"              # "center" or "random" crop after resizing the short side
    flip: bool = False                # random horizontal flips (off: captions name left and right)
    length: int = 50_000              # shapes only: samples per epoch (rendered on the fly)
    seed: int = 0                     # shapes: sample i is rendered from (seed, i); folders: crop/flip seed
    background: str = "white"         # colour that transparent pixels are composited onto
    num_workers: int = 0              # DataLoader worker processes

    def __post_init__(self):
        _check_choice("data.crop", self.crop, ("center", "random"))
        if self.size < 8:
            raise ConfigError(f"data.size: {self.size} is too small (at least 8)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000                 # optimizer steps
    batch_size: int = 32              # per process, per accumulation step
    lr: float = 2e-4                  # peak learning rate
    warmup_steps: int = 100           # linear warm-up to lr over this many steps
    lr_schedule: str = "constant"     # after warm-up: "constant", or "cosine" decay to 0 at the last step
    cooldown_fraction: float = 0.0    # this share of the steps, at the end, takes the lr linearly towards 0
    weight_decay: float = 0.0         # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0            # max grad norm (0 = off)
    grad_accum: int = 1               # gradient accumulation steps
    mixed_precision: str = "no"       # "no", "fp16" (accelerate: autocast + loss scaling), "bf16" (autocast), or
                                      # "auto": bf16 where the hardware multiplies bf16 natively (CUDA, a CPU with AMX)
    ema_decay: float = 0.0            # EMA of the weights (0 = off); the EMA weights are what is saved
    seed: int = 0                     # seeds model init and data order
    log_every: int = 25               # steps between metrics rows
    sample_every: int = 500           # steps between preview images
    checkpoint_every: int = 500       # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2         # checkpoints kept on disk (the newest ones)

    def __post_init__(self):
        _check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16", "auto"))
        _check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(f"train.cooldown_fraction: must be between 0 and 1, got {self.cooldown_fraction}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")


# ---------------------------------------------------------------------------------------------
# Stage 1: the KL autoencoder
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3              # image channels
    out_channels: int = 3
    ch: int = 32                      # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2)  # downsampling factor f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1           # ResNet blocks per level (the decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (pixels) that get self-attention
    mid_attention: bool = True        # self-attention in the middle block
    z_channels: int = 4               # latent channels
    dropout: float = 0.0
    norm_groups: int = 8              # GroupNorm groups (SD uses 32)
    resolution: int = 32              # nominal image size, only to place attn_resolutions
    scale_factor: float = 1.0         # latents are multiplied by this for diffusion (set from data, 1/std)

    def __post_init__(self):
        if not self.ch_mult:
            raise ConfigError("model.ch_mult: needs at least one level")
        for width in (self.ch * m for m in self.ch_mult):
            if width % self.norm_groups:
                raise ConfigError(f"model: width {width} is not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class AutoencoderLossConfig:
    recon: str = "l1"                 # pixel reconstruction loss: "l1" or "l2"
    kl_weight: float = 1e-6           # weight of KL(posterior || N(0, I))
    disc_start: int = -1              # step at which the PatchGAN discriminator switches on (-1 = never)
    disc_weight: float = 0.5          # scales the adaptive generator-loss weight
    disc_layers: int = 2              # strided conv layers in the PatchGAN discriminator
    disc_ch: int = 64                 # discriminator base width
    disc_lr: float = 2e-4             # discriminator learning rate
    lpips_weight: float = 0.0         # perceptual loss weight; used only when lpips_weights is set
    lpips_weights: str = ""           # local folder holding LPIPS weights (nothing is downloaded)

    def __post_init__(self):
        _check_choice("loss.recon", self.recon, ("l1", "l2"))


@dataclass(frozen=True)
class AutoencoderTrainingConfig:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The model still improves fast at 2,000 steps (29-32 dB between runs); 3,000 reach 34-35 dB. A linear
    # cooldown over the last quarter settles it, a short EMA (0.99) follows it (0.999 lagged up to 3 dB),
    # and bf16 autocast, where the CPU has AMX, makes a step about a third cheaper at the same PSNR.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=16, lr=1e-3, grad_clip=0.0, ema_decay=0.99, cooldown_fraction=0.25,
        mixed_precision="auto", log_every=50))
    scale_batches: int = 50           # batches of training data used to measure the latent std
    eval_batches: int = 20            # batches of held-out data used to measure PSNR


# ---------------------------------------------------------------------------------------------
# Stage 3: the UNet
# ---------------------------------------------------------------------------------------------

def _at_level(value: int | tuple[int, ...], level: int) -> int:
    """A setting given once for all levels (an int) or per level (a tuple)."""
    return value if isinstance(value, int) else value[level]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4              # latent channels in
    out_channels: int = 4             # predicted channels (eps, v or x0 of the latent)
    model_channels: int = 64          # base width; level i has model_channels * channel_mult[i] channels
    channel_mult: tuple[int, ...] = (1, 2)  # one entry per level; H and W halve between levels
    num_res_blocks: int = 2           # ResBlocks per level on the down path (the up path has one more)
    attention_levels: tuple[int, ...] = (0, 1)  # levels (0 = full size) with transformers; the middle always has one
    num_heads: int | tuple[int, ...] = 4  # attention heads, per level if a tuple (SD 1.x: 8)
    head_dim: int | tuple[int, ...] = 0   # > 0: heads = width // head_dim and num_heads is ignored (SD 2.x: 64)
    transformer_depth: int | tuple[int, ...] = 1  # BasicTransformerBlocks per spatial transformer, per level if a tuple
    context_dim: int = 256            # width of the text tokens that cross-attention reads (SD 1.x 768, 2.x 1024)
    use_linear_projection: bool = False  # transformer proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv (SD 1.x)
    dropout: float = 0.0              # in ResBlocks and transformer feed-forwards
    norm_groups: int = 32             # GroupNorm groups (ResBlocks, spatial transformers, output)
    upcast_attention: bool = False    # compute attention in fp32 when the model runs in fp16/bf16 (SD 2.1 needs it)

    def __post_init__(self):
        levels = len(self.channel_mult)
        if not levels or min(self.channel_mult) < 1:
            raise ConfigError(f"model.channel_mult: needs at least one level, each >= 1, got {self.channel_mult}")
        if self.num_res_blocks < 1:
            raise ConfigError(f"model.num_res_blocks: must be at least 1, got {self.num_res_blocks}")
        if self.context_dim < 1:
            raise ConfigError(f"model.context_dim: must be at least 1, got {self.context_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < levels]
        if bad or len(set(self.attention_levels)) != len(self.attention_levels):
            raise ConfigError(f"model.attention_levels: {self.attention_levels} must be distinct levels "
                              f"in 0..{levels - 1}")
        for name in ("num_heads", "head_dim", "transformer_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != levels:
                raise ConfigError(f"model.{name}: {value} needs one entry per level ({levels})")
        for level in range(levels):
            if self.width(level) % self.norm_groups:
                raise ConfigError(f"model: width {self.width(level)} is not divisible by "
                                  f"norm_groups={self.norm_groups}")
        for level in sorted(set(self.attention_levels) | {levels - 1}):  # the middle block uses the last level's
            width, head_dim = self.width(level), _at_level(self.head_dim, level)
            if head_dim > 0 and width % head_dim:
                raise ConfigError(f"model.head_dim: width {width} at level {level} is not a multiple of {head_dim}")
            if self.heads(level) < 1 or width % self.heads(level):
                raise ConfigError(f"model.num_heads: width {width} at level {level} does not split into "
                                  f"{self.heads(level)} heads")
            if self.depth(level) < 1:
                raise ConfigError(f"model.transformer_depth: must be at least 1 at level {level}")

    def width(self, level: int) -> int:
        """Channels of the feature maps at `level`."""
        return self.model_channels * self.channel_mult[level]

    def heads(self, level: int) -> int:
        """Attention heads of the spatial transformers at `level`."""
        head_dim = _at_level(self.head_dim, level)
        return self.width(level) // head_dim if head_dim > 0 else _at_level(self.num_heads, level)

    def depth(self, level: int) -> int:
        """BasicTransformerBlocks in each spatial transformer at `level`."""
        return _at_level(self.transformer_depth, level)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------
# Stage 2: the text encoder
# ---------------------------------------------------------------------------------------------

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

    def __post_init__(self):
        _check_choice("model.output_layer", self.output_layer, ("last", "penultimate"))
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


@dataclass(frozen=True)
class TextEncoderTrainingConfig:
    model: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=750, batch_size=64, lr=2.5e-4, warmup_steps=50, lr_schedule="cosine", weight_decay=0.1,
        betas=(0.9, 0.98),
        log_every=25, sample_every=250, checkpoint_every=250))
    eval_batch_size: int = 64         # distinct captions per held-out retrieval batch
    eval_batches: int = 8             # held-out retrieval batches averaged at the end (and every sample_every steps)


# ---------------------------------------------------------------------------------------------
# Stage 3: diffusion
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "scaled_linear"       # betas: "linear", "scaled_linear" (SD: linear in sqrt β) or "cosine" (squaredcos_cap_v2)
    num_train_timesteps: int = 1000   # T: training timesteps 0..T-1
    beta_start: float = 0.00085       # β at t = 0 (linear kinds only; SD's value)
    beta_end: float = 0.012           # β at t = T-1 (linear kinds only; SD's value)
    zero_terminal_snr: bool = False   # rescale so ᾱ_T = 0 (Lin et al. 2023); pair with v prediction, trailing spacing

    def __post_init__(self):
        _check_choice("schedule.kind", self.kind, ("linear", "scaled_linear", "cosine"))
        if self.num_train_timesteps < 2:
            raise ConfigError(f"schedule.num_train_timesteps: must be at least 2, got {self.num_train_timesteps}")
        if self.kind != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(f"schedule: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclass(frozen=True)
class ObjectiveConfig:
    prediction: str = "eps"           # what the network predicts: "eps" (noise), "v" (velocity) or "x0" (clean latent)
    weighting: str = "uniform"        # per-timestep loss weight: "uniform" or "min_snr" (Hang et al. 2023)
    snr_gamma: float = 5.0            # γ of min-SNR weighting: the SNR is capped at γ
    offset_noise: float = 0.0         # std of a per-channel constant added to ε (0 = off; ~0.1 helps very dark/bright)
    cond_dropout: float = 0.1         # share of samples trained on the unconditional context (classifier-free guidance)

    def __post_init__(self):
        _check_choice("objective.prediction", self.prediction, ("eps", "v", "x0"))
        _check_choice("objective.weighting", self.weighting, ("uniform", "min_snr"))
        if self.snr_gamma <= 0:
            raise ConfigError(f"objective.snr_gamma: must be positive, got {self.snr_gamma}")
        if self.offset_noise < 0:
            raise ConfigError(f"objective.offset_noise: must be at least 0, got {self.offset_noise}")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ConfigError(f"objective.cond_dropout: must be in [0, 1], got {self.cond_dropout}")


# ---------------------------------------------------------------------------------------------
# Stage 3: diffusion training
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "dpmpp_2m"         # a name in latentdiff.samplers.SAMPLERS (checked when used)
    steps: int = 20                   # denoising steps
    guidance_scale: float = 3.0       # classifier-free guidance scale (1 = no guidance)
    spacing: str = "leading"          # sigma spacing: "leading", "trailing", "linspace" or "karras"
    steps_offset: int = 1             # added to "leading" timesteps (SD: 1; diffusers' scheduler field of that name)

    def __post_init__(self):
        _check_choice("sampling.spacing", self.spacing, ("leading", "trailing", "linspace", "karras"))
        if self.steps < 1:
            raise ConfigError(f"sampling.steps: must be at least 1, got {self.steps}")
        if self.steps_offset < 0:
            raise ConfigError(f"sampling.steps_offset: must be at least 0, got {self.steps_offset}")
        if self.guidance_scale < 0:
            raise ConfigError(f"sampling.guidance_scale: must be at least 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class DiffusionTrainingConfig:
    autoencoder: str = ""             # trained stage-1 folder (--autoencoder); frozen, encodes images to latents
    text_encoder: str = ""            # trained stage-2 folder (--text-encoder); frozen, encodes captions
    text_layer: str = ""              # text states the UNet reads: "last", "penultimate" ("" = the text encoder's own)
    # 4.5M parameters; transformers at 8x8, 4x4 and in the middle. Without the 8x8 ones a step costs 2/3
    # but objects land in the named 3x3 region less often (single-object judge 0.66 / 0.64 vs 0.78 / 0.81).
    model: UNetConfig = field(default_factory=lambda: UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=4))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(prediction="eps", weighting="min_snr"))
    data: DataConfig = field(default_factory=lambda: DataConfig(length=8192))  # the cache holds `length` samples
    # Objects move into their named region late and fast. Single-object judge (train / held-out, 200
    # prompts each) on one autoencoder + text encoder: lr 6e-4: 0.32 / 0.33 at step 1,000, 0.82 / 0.75 at
    # 1,400, 0.92 / 0.84 at 1,600, 0.95 / 0.92 at 1,700; lr 3e-4 got there ~300 steps later, 1e-3 was worse.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1700, batch_size=64, lr=6e-4, warmup_steps=100, ema_decay=0.995, log_every=25,
        sample_every=500, checkpoint_every=500))
    # previews and the pipeline's defaults; guidance 5 placed single objects best (one model: 3 -> 0.55,
    # 5 -> 0.66, 7.5 -> 0.56 on 64 prompts)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(guidance_scale=5.0))
    preview_prompts: tuple[str, ...] = (
        "a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right",
        "a yellow star", "two purple diamonds", "an orange cross above a cyan circle")
    preview_images: int = 4           # images per preview prompt (seeds 0, 1, ...)
    cache_dir: str = ""               # latent + text cache root ("" = latent_cache/ beside the run folder)

    def __post_init__(self):
        _check_choice("text_layer", self.text_layer, ("", "last", "penultimate"))
        if self.preview_images < 0:
            raise ConfigError(f"preview_images: must be at least 0, got {self.preview_images}")
