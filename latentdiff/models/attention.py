"""Multi-head self/cross attention and the spatial transformer of the SD UNet.

Module names follow the standard layout (attn1/attn2 with to_q/to_k/to_v/to_out.0, ff.net.0.proj,
ff.net.2, norm1/2/3, proj_in/proj_out), shared by the CompVis and diffusers checkpoints, so that
loading either is a key-renaming table.

Attention runs on F.scaled_dot_product_attention, except where it is written out: small maps at CPU
inference (`written_out`, faster there), and within `recording_cross_attention(model)`, a training-only
view into the cross-attention probabilities (for the grounding loss of issue 15).
`reusing_text_projections(model)` lets a sampling loop project its (unchanging) text once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


WRITTEN_OUT_MAX_SCORES = 64 * 64  # queries x keys per head at or below which CPU inference skips the fused kernel


def written_out(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention of q (B, heads, N, d) over k (B, heads, L, d) runs as three plain ops instead of SDPA.

    On the CPU, without gradients, for small maps (the shapes UNet's 8x8 and 4x4 levels over ~10 text
    tokens), SDPA's flash kernel costs 1.5-3x the plain matmul, softmax, matmul (2 cores, batch 32); for
    large maps (SD's 64x64 latents) the fused kernel is what keeps the (N, L) scores out of memory.
    """
    small = q.shape[-2] * k.shape[-2] <= WRITTEN_OUT_MAX_SCORES
    return small and q.device.type == "cpu" and not torch.is_grad_enabled()


class Attention(nn.Module):
    """Multi-head attention of `x` over itself (context None) or over `context` (cross-attention)."""

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        # No bias on q/k/v, as in SD; the output projection sits in a Sequential so its key is to_out.0.
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim))
        self.record: Callable[[torch.Tensor], None] | None = None  # set by recording_cross_attention only
        self.reuse_projections = False  # set by reusing_text_projections only
        self._projected: tuple | None = None  # (context, its version, k, v) while reusing

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); context (B, L, C_ctx) or None; mask (B, L) bool, True = attend. -> (B, N, C)"""
        q = self._heads(self.to_q(x))
        k, v = self._keys_values(x if context is None else context)
        if mask is not None:
            mask = mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L), broadcast over heads and queries
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.record is None and not written_out(q, k):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(x.dtype)
        else:  # the same attention written out: its probabilities can be kept (with their gradients)
            scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, heads, N, L)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(-1)
            if self.record is not None:
                self.record(probs)
            out = (probs.to(v.dtype) @ v).to(x.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, C)

    def _heads(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)"""
        return h.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `context`, (B, heads, L, C / heads) each; while reusing, those of the last
        context again if this is the same tensor, unchanged since."""
        if self._projected is not None:
            source, version, k, v = self._projected
            if source is context and source._version == version:
                return k, v
        k, v = self._heads(self.to_k(context)), self._heads(self.to_v(context))
        if self.reuse_projections:
            self._projected = (context, context._version, k, v)
        return k, v


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width, dropout, linear back; kept in `net` so keys read ff.net.0.proj / ff.net.2."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text tokens, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), context (B, L, C_ctx), mask (B, L) bool or None -> (B, N, C)"""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


def position_features(height: int, width: int, channels: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D sin/cos features of each token's place -> (H*W, channels), row-major as the tokens are.

    Quarters of the channels hold sin(w*y), cos(w*y), sin(w*x), cos(w*x) of the centre of each cell in
    image fractions (0, 1), so a place means the same at any resolution ("top left" is top left at 8x8 and
    at 16x16). The frequencies run geometrically from pi (half a cycle across the image: cos is monotonic
    in x and y) to 8 pi; channels beyond a multiple of 4 stay zero.
    """
    n = channels // 4
    freqs = math.pi * 8.0 ** (torch.arange(n, device=device, dtype=torch.float32) / max(n - 1, 1))  # (n,)
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    ay, ax = yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs  # (H*W, n) each
    feats = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return F.pad(feats, (0, channels - 4 * n)).to(dtype)


class SpatialTransformer(nn.Module):
    """Feature maps as a sequence of H*W tokens through `depth` transformer blocks, added back residually.

    The projections are 1x1 convs applied before flattening (SD 1.x) or Linear layers applied after
    it (SD 2.x); the two are the same map, but their weights have different shapes. With
    `position_embedding` the tokens entering the blocks also carry `position_features` (no weights), so
    that a query knows where it is without inferring it from the zero padding of the convolutions.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, *, groups: int,
                 linear_projection: bool = False, dropout: float = 0.0, upcast: bool = False,
                 position_embedding: bool = False):
        super().__init__()
        self.linear_projection = linear_projection
        self.position_embedding = position_embedding
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        proj = nn.Linear if linear_projection else (lambda cin, cout: nn.Conv2d(cin, cout, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, dropout, upcast) for _ in range(depth))
        self.proj_out = proj(channels, channels)
        # Zero the last projection so a fresh block starts as the identity (as ldm does).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), context (B, L, C_ctx), mask (B, L) bool or None -> (B, C, H, W)"""
        b, c, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.linear_projection:
            h = self.proj_in(h)
        if self.position_embedding:
            h = h + position_features(height, width, c, device=h.device, dtype=h.dtype)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(b, c, height, width)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


def cross_attentions(model: nn.Module) -> list[Attention]:
    """Every cross-attention (attn2) of `model`'s transformer blocks."""
    return [m.attn2 for m in model.modules() if isinstance(m, BasicTransformerBlock)]


@contextmanager
def reusing_text_projections(model: nn.Module) -> Iterator[None]:
    """Within the block, each cross-attention of `model` projects a text context to keys and values once
    and reuses them for as long as it is given that same tensor: a sampling loop's text does not change
    from step to step, and its projections are a fifth of a small UNet's arithmetic at 77 tokens (7% at the
    shapes preset's 24). Inference only (the kept keys carry no gradient for a later step); on leaving,
    nothing is kept.
    """
    layers = cross_attentions(model)
    for layer in layers:
        layer.reuse_projections = True
    try:
        yield
    finally:
        for layer in layers:
            layer.reuse_projections, layer._projected = False, None


@contextmanager
def recording_cross_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every cross-attention of `model` runs written out (not SDPA) and appends its
    (B, heads, N, L) probabilities, N = the feature map's H*W, to the list yielded; afterwards none does.

    Training only: not with gradient checkpointing, whose backward recomputes the blocks outside it.
    """
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("recording cross-attention does not work with gradient checkpointing")
    layers = cross_attentions(model)
    maps: list[torch.Tensor] = []
    for layer in layers:
        layer.record = maps.append
    try:
        yield maps
    finally:
        for layer in layers:
            layer.record = None
