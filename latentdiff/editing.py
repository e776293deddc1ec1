"""img2img and inpainting for Text2ImagePipeline (mixed into it as `pipe.img2img` and `pipe.inpaint`).

img2img (SDEdit, Meng et al. 2022): encode the image, noise its latent to the sigma where a fraction
`strength` of the sampling schedule remains, and run the rest of the schedule with the prompt.

Inpainting blends in latent space, for any UNet (no inpainting-specific model): the denoiser's
prediction is replaced by the image's own latent wherever the mask keeps the image, so every sampler
carries the kept region along its noise trajectory and lands on it exactly; the pixels outside the
mask are then pasted back from the input, so they are kept exactly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.images import pil_to_tensor
from .errors import ConfigError
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


class ImageEditingMixin:
    """img2img and inpainting on top of the Text2ImagePipeline steps (prepare, encode, denoise, decode)."""

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents (the posterior mode: deterministic)."""
        ae = self.autoencoder
        self.latent_shape(len(images), images.shape[-2], images.shape[-1])  # checks the size
        posterior = ae.encode(images.to(self.device, next(ae.parameters()).dtype))
        return posterior.mode().to(self.dtype) * ae.config.scale_factor

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str], image: Image.Image | torch.Tensor, strength: float = 0.6,
                negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, sampler: str | None = None, num_images_per_prompt: int = 1,
                seed: int | Sequence[int] | None = None, generator=None, output_type: str = "pil",
                callback: Callable[[dict], None] | None = None):
        """Re-draw `image` toward the prompt: strength 0 returns its reconstruction, 1 ignores it."""
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"strength: must be in [0, 1], got {strength}")
        request = self.prepare(prompt, negative_prompt, num_images_per_prompt, seed, generator, num_inference_steps,
                               guidance_scale, sampler, output_type)
        known = self.encode_image(image_batch(image, len(request.prompts)))
        latents = self._denoise_from(known, request, strength, callback, keep=None)
        return self.finish(latents, request)

    @torch.no_grad()
    def inpaint(self, prompt: str | Sequence[str], image: Image.Image | torch.Tensor,
                mask: Image.Image | torch.Tensor, negative_prompt: str | Sequence[str] | None = None, *,
                strength: float = 1.0, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                sampler: str | None = None, num_images_per_prompt: int = 1, seed: int | Sequence[int] | None = None,
                generator=None, output_type: str = "pil", callback: Callable[[dict], None] | None = None):
        """Repaint the mask's white (1) pixels following the prompt; the other pixels are kept exactly."""
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength: must be in (0, 1], got {strength}")
        request = self.prepare(prompt, negative_prompt, num_images_per_prompt, seed, generator, num_inference_steps,
                               guidance_scale, sampler, output_type)
        pixels = image_batch(image, len(request.prompts))
        height, width = pixels.shape[-2:]
        repaint = mask_batch(mask, len(request.prompts), (width, height)).to(self.device)  # (B, 1, H, W)
        known = self.encode_image(pixels)
        # a latent cell is repainted if any of its pixels is
        keep = 1 - F.adaptive_max_pool2d(repaint, known.shape[-2:]).to(self.dtype)
        latents = self._denoise_from(known, request, strength, callback, keep=keep)
        if request.output_type == "latent":
            return self.finish(latents, request)
        decoded = self.decode_latents(latents)
        pasted = repaint * decoded.float() + (1 - repaint) * pixels.to(decoded.device)
        return self.finish(latents, request, images=pasted)

    def _denoise_from(self, known: torch.Tensor, request, strength: float, callback, keep: torch.Tensor | None):
        """Noise `known` to the sigma where `strength` of the schedule remains, then sample down to 0."""
        sigmas = self.sigmas(request.steps)
        start = request.steps - int(round(request.steps * strength))
        sigmas = sigmas[start:].to(self.device)  # strength 0 leaves [0]: no step, the latent is returned as is
        noise = randn_per_sample(known.shape, request.generators, dtype=known.dtype, device=self.device)
        x = known + sigmas[0].to(known.dtype) * noise
        if len(sigmas) == 1:
            return x
        denoiser = None
        if keep is not None:
            denoiser = lambda base: InpaintDenoiser(base, known, keep)  # noqa: E731 (wraps the guided denoiser)
        return self.denoise(x, sigmas, request.cond, guidance_scale=request.guidance_scale, sampler=request.sampler,
                            generators=request.generators, callback=callback, wrap=denoiser)
