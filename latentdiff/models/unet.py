"""The denoising UNet of Stable Diffusion (Rombach et al. 2022, after Ho et al. 2020 and Dhariwal & Nichol
2021): ResBlocks conditioned on the timestep, spatial transformers cross-attending to the text tokens,
a down path whose outputs are concatenated into the up path.

The module tree follows ldm's `openaimodel.UNetModel` (time_embed, input_blocks[i][j], middle_block,
output_blocks[i][j], out), so the SD 1.x / 2.x checkpoints load by a key-renaming table:

    input_blocks[0]     3x3 conv in
    input_blocks[1..]   per level: num_res_blocks x (ResBlock [+ SpatialTransformer]), then a Downsample
                        (except after the last level)
    middle_block        ResBlock, SpatialTransformer, ResBlock
    output_blocks       per level, deepest first: (num_res_blocks + 1) x (ResBlock on [h, skip]
                        [+ SpatialTransformer]), the last one of each level but the top ending in an Upsample
    out                 GroupNorm, SiLU, 3x3 conv
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import PretrainedMixin
from .attention import SpatialTransformer
from .autoencoder import Upsample  # the same module (and key names) as the VAE's
from .unet_blocks import Downsample, ResBlock, TimestepSequential, timestep_embedding
from .unet_config import CHECKPOINT_KIND, UNetConfig


class UNet(PretrainedMixin, nn.Module):
    """`unet(x, t, context, context_mask=None, x0_estimate=None) -> (B, out_channels, H, W)`.

    x (B, in_channels, H, W) with H, W multiples of `config.downsample_factor`; t (B,) float timesteps
    (continuous values allowed) or a scalar; context (B, L, context_dim) text tokens; context_mask
    (B, L) bool, True = a real token (None attends to all; every row needs at least one True);
    x0_estimate (B, in_channels, H, W), only for a self-conditioned UNet: its previous estimate of the
    clean latent (None: zeros, as on a first step).
    """

    checkpoint_kind = CHECKPOINT_KIND
    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # a runtime switch, not part of the architecture
        c = config
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, groups=c.norm_groups, dropout=c.dropout)

        def transformer(level: int) -> SpatialTransformer:
            return SpatialTransformer(c.width(level), c.heads(level), c.depth(level), c.context_dim,
                                      groups=c.norm_groups, linear_projection=c.use_linear_projection,
                                      dropout=c.dropout, upcast=c.upcast_attention,
                                      position_embedding=c.position_embedding)

        # Down path; skip_widths records the width of every block output that the up path will concatenate.
        # self-conditioning: the previous x0 estimate (or zeros) enters beside x, channel-concatenated
        conv_in = nn.Conv2d(c.in_channels * (2 if c.self_condition else 1), c.model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepSequential(conv_in)])
        skip_widths = [c.model_channels]
        ch = c.model_channels
        last = len(c.channel_mult) - 1
        for level in range(last + 1):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, c.width(level))]
                ch = c.width(level)
                if level in c.attention_levels:
                    layers.append(transformer(level))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_widths.append(ch)
            if level != last:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_widths.append(ch)

        self.middle_block = TimestepSequential(res(ch, ch), transformer(last), res(ch, ch))

        # Up path: one more block per level than the down path, so every skip is consumed.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(last + 1)):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_widths.pop(), c.width(level))]
                ch = c.width(level)
                if level in c.attention_levels:
                    layers.append(transformer(level))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(c.norm_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, c.out_channels, 3, padding=1))
        # A fresh UNet predicts zero (as in ldm); training moves it off.
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (training only)."""
        self.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        b, _, height, width = x.shape
        f = self.config.downsample_factor
        if height % f or width % f:
            raise ValueError(f"UNet input {height}x{width} is not a multiple of {f} on both sides")
        if self.config.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x0_estimate is None else x0_estimate.to(x.dtype)], dim=1)
        elif x0_estimate is not None:
            raise ValueError("x0_estimate is for a self-conditioned UNet (model.self_condition); this one is not")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)  # scalar or (B,) -> (B,)
        emb_in = timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb_in)  # (B, 4 * model_channels)

        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)

    def _run(self, block: TimestepSequential, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, mask, use_reentrant=False)
        return block(h, emb, context, mask)
