"""LatentDiffusion: the three loaded stages and how to sample with them — no loading, saving or argument checks.

Sampling runs in the sigma space of samplers.py: prompts -> token states -> (classifier-free guided)
denoiser -> sampler loop from `initial_latent` -> latents / scale_factor -> autoencoder decoder. Every
image has its own torch.Generator, so an image depends on its seed, not on the batch. The predicted x0 is
never clipped (latents are not pixels).

Text2ImagePipeline (pipeline.py) adds loading, saving and request resolution on top; the diffusion trainer
draws its previews with this class directly; img2img and inpainting (editing.py) start from an image's
latent and wrap `guided_denoiser`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .diffusion import Denoiser, NoiseSchedule
from .generation_request import GenerationRequest
from .guidance import TEXT_KEYS, CFGDenoiser
from .models.attention import reusing_text_projections
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import TextEncoder
from .models.unet import UNet
from .pipeline_spec import PipelineSpec
from .samplers import SAMPLERS, SamplingConfig, initial_latent
from .stages import UNetRecord


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def without_padding(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cond without the trailing token columns that no mask lets the UNet see (padding): the same
    attention (a masked key weighs exactly 0) over the longest prompt's tokens, not the encoder's full context."""
    used = torch.cat([cond[k] for k in ("context_mask", "uncond_context_mask") if k in cond]).any(0)  # (L,)
    length = int(used.nonzero().max()) + 1
    return {k: v[:, :length] if k in TEXT_KEYS else v for k, v in cond.items()}


class LatentDiffusion:
    """Autoencoder + text encoder + UNet, and how to sample from the UNet (`record`: see stages.UNetRecord)."""

    def __init__(self, autoencoder: AutoencoderKL, text_encoder: TextEncoder, unet: UNet, record: UNetRecord):
        self.autoencoder, self.text_encoder, self.unet = autoencoder, text_encoder, unet
        self.record = record
        self.schedule = NoiseSchedule.from_config(record.schedule)
        self.denoiser = Denoiser(unet, self.schedule, record.prediction, unet.config.self_condition)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        for module in (self.autoencoder, self.text_encoder, self.unet):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def sampling(self) -> SamplingConfig:
        """The default sampling settings (the UNet's record)."""
        return self.record.sampling

    @property
    def spec(self) -> PipelineSpec:
        """This pipeline as request resolution sees it (no torch needed to read it): the stages' configs, the
        sampling defaults, the training size, the weights' bytes and itemsizes, and the device."""
        weights = sum(t.numel() * t.element_size() for module in (self.autoencoder, self.text_encoder, self.unet)
                      for t in module.state_dict().values())  # weights and saved buffers, as from_folder counts
        return PipelineSpec(self.autoencoder.config, self.unet.config, self.sampling, self.record.image_size, weights,
                            self.dtype.itemsize, next(self.autoencoder.parameters()).dtype.itemsize, str(self.device))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the UNet's."""
        return self.spec.size_multiple

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the latents for images of height x width pixels (default: the training size)."""
        return self.spec.latent_shape(batch, height, width)

    # -- the steps of a generation ---------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None,
                       guidance_scale: float) -> dict[str, torch.Tensor]:
        """The denoiser's cond: "context" (B, L, D) [+ "context_mask" (B, L)] and, when guiding, the
        negative prompts' (or the empty prompt's) "uncond_context" [+ "uncond_context_mask"]."""
        encoding = self.text_encoder.encode(prompts)
        cond = {"context": encoding.states.to(self.device, self.dtype)}
        if self.record.context_mask:
            cond["context_mask"] = encoding.mask.to(self.device).bool()
        if guidance_scale != 1:
            uncond = (self.text_encoder.encode(negative_prompts) if negative_prompts is not None
                      else self.text_encoder.unconditional(len(prompts)))
            cond["uncond_context"] = uncond.states.to(self.device, self.dtype)
            if self.record.context_mask:
                cond["uncond_context_mask"] = uncond.mask.to(self.device).bool()
        return without_padding(cond) if self.record.context_mask else cond

    def guided_denoiser(self, guidance_scale: float) -> Callable:
        """D(x, sigma, cond) -> x0 with classifier-free guidance at `guidance_scale` (1 = none), for one
        sampling run (a self-conditioned UNet's denoiser keeps state)."""
        denoiser = self.denoiser.fresh()
        return denoiser if guidance_scale == 1 else CFGDenoiser(denoiser, guidance_scale)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampling sigma sequence for `steps` steps under the default spacing, ending in 0."""
        return self.schedule.sampling_sigmas(steps, self.sampling.spacing, self.sampling.steps_offset)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigmas: torch.Tensor, request: GenerationRequest, *,
                wrap: Callable | None = None, callback: Callable | None = None) -> torch.Tensor:
        """Run the request's sampler from x (sigma space, at sigmas[0]) down to sigma = 0; returns the scaled
        latents. `wrap(denoiser) -> denoiser` adapts the guided denoiser (inpainting)."""
        cond = self.encode_prompts(request.prompts, request.negative_prompts, request.guidance_scale)
        denoiser = self.guided_denoiser(request.guidance_scale)
        if wrap is not None:
            denoiser = wrap(denoiser)
        with reusing_text_projections(self.unet):  # the text is the same at every step
            return SAMPLERS[request.sampler](denoiser, x, sigmas, cond=cond, generator=request.generators,
                                             callback=callback)

    @torch.no_grad()
    def text_to_latents(self, request: GenerationRequest, callback: Callable | None = None) -> torch.Tensor:
        """(B, C, h, w) scaled latents for the request, from pure noise."""
        sigmas = self.sigmas(request.steps)
        shape = self.latent_shape(len(request.prompts), request.height, request.width)
        x = initial_latent(shape, sigmas, request.generators, dtype=self.dtype, device=self.device)
        return self.denoise(x, sigmas, request, callback=callback)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents (the posterior mode: deterministic)."""
        ae = self.autoencoder
        self.latent_shape(len(images), images.shape[-2], images.shape[-1])  # checks the size
        posterior = ae.encode(images.to(self.device, next(ae.parameters()).dtype))
        return posterior.mode().to(self.dtype) * ae.config.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) images, about [-1, 1]."""
        ae = self.autoencoder
        z = latents / ae.config.scale_factor
        return ae.decode(z.to(next(ae.parameters()).dtype))
