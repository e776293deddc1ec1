"""The autoencoder objective of the latent diffusion paper: reconstruction + KL + an adaptively weighted
PatchGAN hinge loss (and LPIPS when its weights are on disk).

Reconstruction and KL are summed over pixels / latent elements per image and averaged over the batch,
so `kl_weight` (1e-6) has the meaning it has in the original configs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice
from ..models.autoencoder import DiagonalGaussian

RECONSTRUCTION_LOSSES = ("l1", "l2")  # AutoencoderLoss' pixel terms


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
        check_choice("loss.recon", self.recon, RECONSTRUCTION_LOSSES)


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
