"""The autoencoder objective of the latent diffusion paper: reconstruction + KL + an adaptively weighted
PatchGAN hinge loss (and LPIPS when its weights are on disk).

Reconstruction and KL are summed over pixels / latent elements per image and averaged over the batch,
so `kl_weight` (1e-6) has the meaning it has in the original configs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderLossConfig
from ..models.autoencoder import DiagonalGaussian


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Balance the GAN term against reconstruction: ||∇ nll|| / ||∇ g_loss|| at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """Generator-side and discriminator-side losses; `perceptual` is an LPIPS module or None."""

    def __init__(self, cfg: AutoencoderLossConfig, discriminator: nn.Module | None,
                 perceptual: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.discriminator = discriminator
        self.perceptual = perceptual

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and 0 <= self.cfg.disc_start <= step

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian,
                       step: int, last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """images, recon: (B, 3, H, W) in [-1, 1]. Returns the loss and its parts for logging."""
        diff = (recon - images).abs() if self.cfg.recon == "l1" else (recon - images).pow(2)
        per_pixel = diff
        if self.perceptual is not None:
            per_pixel = per_pixel + self.cfg.lpips_weight * self.perceptual(images, recon)
        nll = per_pixel.sum() / images.shape[0]
        kl = posterior.kl().mean()
        loss = nll + self.cfg.kl_weight * kl
        parts = {"recon": diff.mean().item(), "kl": kl.item()}
        if self.gan_active(step):
            g_loss = -self.discriminator(recon).mean()
            weight = self.cfg.disc_weight * adaptive_gan_weight(nll, g_loss, last_layer)
            loss = loss + weight * g_loss
            parts.update(g_loss=g_loss.item(), gan_weight=weight.item())
        return loss, parts

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
