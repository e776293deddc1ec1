"""AutoencoderKL: the Stable Diffusion first stage (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"), a convolutional encoder to a diagonal Gaussian posterior
over `z_channels` latent channels at 1/f resolution, and a decoder back to pixels.

Module names follow the original CompVis layout (encoder.down[i].block[j], mid.attn_1, quant_conv,
...) so that SD checkpoints map onto this model key for key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch_random import BatchGenerator, draw
from ..checkpoint import PretrainedMixin
from .autoencoder_config import CHECKPOINT_KIND, AutoencoderConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus a (1x1 when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (1x1-conv projections, as in SD's VAE)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose width is all C channels
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padded on the right and bottom only (the original SD asymmetry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet block, optional self-attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResNet blocks (each followed by attention where configured) and a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None,
                 resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, resample_name, resample)
        self.resample_name = resample_name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        if self.resample_name:
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) image -> (B, 2 * z_channels, H/f, W/f) posterior moments."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        groups, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, resolution = cfg.ch, cfg.resolution
        for level, out_width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(width, out_width, groups, cfg.dropout))
                width = out_width
                if resolution in cfg.attn_resolutions:
                    attns.append(AttnBlock(width, groups))
            last = level == len(widths) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(width), "downsample"))
            resolution = resolution if last else resolution // 2
        self.mid = MidBlock(width, groups, cfg.dropout, cfg.mid_attention)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) latent -> (B, out_channels, h*f, w*f) image in about [-1, 1]."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        groups, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        width = widths[-1]
        resolution = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, groups, cfg.dropout, cfg.mid_attention)
        levels = []
        # Built from the lowest resolution up; stored so that up[i] is level i, as in the original layout.
        for level in reversed(range(len(widths))):
            out_width = widths[level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, out_width, groups, cfg.dropout))
                width = out_width
                if resolution in cfg.attn_resolutions:
                    attns.append(AttnBlock(width, groups))
            levels.insert(0, Level(blocks, attns, Upsample(width) if level else None, "upsample"))
            resolution = resolution * 2 if level else resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from (B, 2C, h, w) moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | BatchGenerator | None = None) -> torch.Tensor:
        noise = draw(torch.randn, tuple(self.mean.shape), generator, self.mean, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(PretrainedMixin, nn.Module):
    """Encoder + decoder around a diagonal Gaussian latent; `config.scale_factor` is the latent scale
    the diffusion stage multiplies latents by (measured from data at the end of training)."""

    checkpoint_kind = CHECKPOINT_KIND
    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) images in [-1, 1] -> posterior over (B, z_channels, H/f, W/f) latents."""
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the latent factor {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_channels, h, w) unscaled latents -> (B, 3, h*f, w*f) images, about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor, sample: bool = True,
                generator: torch.Generator | BatchGenerator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior
