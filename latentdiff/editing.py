"""img2img and inpainting: generations that start from an image's latent (`pipe.img2img`, `pipe.inpaint`).

img2img (SDEdit, Meng et al. 2022): encode the image, noise its latent to the sigma where a fraction
`strength` of the sampling schedule remains, and run the rest of the schedule with the prompt.

Inpainting blends in latent space, for any UNet (no inpainting-specific model): the denoiser's
prediction is replaced by the image's own latent wherever the mask keeps the image, so every sampler
carries the kept region along its noise trajectory and lands on it exactly; the pixels outside the
mask are then pasted back from the input, so they are kept exactly.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.images import pil_to_tensor
from .errors import ConfigError
from .latent_diffusion import GenerationRequest, LatentDiffusion
from .samplers import randn_per_sample


def image_batch(image: Image.Image | torch.Tensor, count: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image or (3, H, W) / (1, 3, H, W) tensor in [-1, 1] -> (count, 3, H, W), resized to `size` (W, H)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        image = pil_to_tensor(image)
    image = image.float()
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ConfigError(f"image: expected one RGB image, got a tensor of shape {tuple(image.shape)}")
    return image.expand(count, -1, -1, -1)


def mask_batch(mask: Image.Image | torch.Tensor, count: int, size: tuple[int, int]) -> torch.Tensor:
    """A mask (white / 1 = repaint, black / 0 = keep) -> (count, 1, H, W) in {0, 1} at `size` (W, H)."""
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    mask = mask.float()
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[-2:] != (size[1], size[0]):
        raise ConfigError(f"mask: size {tuple(mask.shape[-2:][::-1])} differs from the image's {size}")
    return (mask[:, :1] > 0.5).float().expand(count, -1, -1, -1)


class InpaintDenoiser:
    """Wraps a denoiser: where `keep` is 1 the prediction is the known latent x0, elsewhere the model's."""

    def __init__(self, denoiser, known: torch.Tensor, keep: torch.Tensor):
        self.denoiser, self.known, self.keep = denoiser, known, keep  # (B, C, h, w), (B, 1, h, w)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        denoised = self.denoiser(x, sigma, cond)
        return self.keep * self.known + (1 - self.keep) * denoised


def check_strength(strength: float, *, allow_zero: bool) -> None:
    """img2img takes strength in [0, 1] (0 returns the reconstruction), inpainting in (0, 1]."""
    if not (0.0 <= strength <= 1.0) or (strength == 0 and not allow_zero):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"strength: must be in {interval}, got {strength}")


def img2img_latents(model: LatentDiffusion, request: GenerationRequest, pixels: torch.Tensor, strength: float,
                    callback: Callable | None = None) -> torch.Tensor:
    """Re-draw the (B, 3, H, W) images toward the request's prompts: strength 0 returns their reconstruction,
    1 ignores them. Returns the scaled latents."""
    known = model.encode_image(pixels)
    return denoise_from(model, known, request, strength, callback)


def inpaint_images(model: LatentDiffusion, request: GenerationRequest, pixels: torch.Tensor, repaint: torch.Tensor,
                   strength: float, callback: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Repaint where the (B, 1, H, W) mask `repaint` is 1; keep the other pixels of `pixels` exactly.
    Returns (scaled latents, the pasted (B, 3, H, W) images; None when only latents were asked for)."""
    repaint = repaint.to(model.device)
    known = model.encode_image(pixels)
    # a latent cell is repainted if any of its pixels is
    keep = 1 - F.adaptive_max_pool2d(repaint, known.shape[-2:]).to(model.dtype)
    latents = denoise_from(model, known, request, strength, callback,
                           wrap=lambda denoiser: InpaintDenoiser(denoiser, known, keep))
    if request.output_type == "latent":
        return latents, None
    decoded = model.decode_latents(latents)
    return latents, repaint * decoded.float() + (1 - repaint) * pixels.to(decoded.device)


def denoise_from(model: LatentDiffusion, known: torch.Tensor, request: GenerationRequest, strength: float,
                 callback: Callable | None, wrap: Callable | None = None) -> torch.Tensor:
    """Noise `known` to the sigma where `strength` of the schedule remains, then sample down to 0."""
    sigmas = model.sigmas(request.steps)
    start = request.steps - int(round(request.steps * strength))
    sigmas = sigmas[start:].to(model.device)  # strength 0 leaves [0]: no step, the latent is returned as is
    noise = randn_per_sample(known.shape, request.generators, dtype=known.dtype, device=model.device)
    x = known + sigmas[0].to(known.dtype) * noise
    if len(sigmas) == 1:
        return x
    return model.denoise(x, sigmas, request, wrap=wrap, callback=callback)
