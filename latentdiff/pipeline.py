"""Text2ImagePipeline: the three stages and their sampling defaults, prompt in, images out.

    pipe = Text2ImagePipeline.from_pretrained("weights/diffusion")   # a run folder, or a saved pipeline folder
    pipe.to("cuda", torch.float16)                                    # the caller picks device and dtype
    out = pipe("a red circle in the top left", num_images_per_prompt=4, seed=0)
    out.images[0].save("circle.png")

A pipeline folder written by `save_pretrained` holds autoencoder/, text_encoder/, unet/ and pipeline.json
(the sampling defaults); a diffusion run folder holds the UNet, whose metadata names the other two stages
(see stages.py). Either way the three stages are checked to belong together.

Every call goes through `request(...)`: generation_request.resolve_request, the one place that turns
arguments into resolved settings (defaults from the UNet's record, checks), on this pipeline's spec, then one
generator per image (seed, seed + 1, ...); the CLI uses it too. Sampling itself is LatentDiffusion's
(latent_diffusion.py); img2img and inpainting are editing.py's.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import FORMAT_VERSION, atomic_directory, atomic_write_json
from .config import apply_overrides, to_dict
from .data.images import tensor_to_pil
from .editing import check_strength, image_batch, img2img_latents, inpaint_images, mask_batch
from .errors import ConfigError
from .generation_request import GenerationRequest, Prompts, resolve_request
from .latent_diffusion import LatentDiffusion, seeded_generators
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import TextEncoder
from .models.unet import UNet
from .pipeline_spec import PIPELINE_FILE, STAGE_FOLDERS, PipelineFolder
from .request_limits import integer
from .samplers import SamplingConfig, check_sampler
from .stages import StageRef, UNetRecord, stage_hash


@dataclass
class Text2ImageOutput:
    """images: PIL images ("pil"), (N, H, W, 3) float array in [0, 1] ("np"), (N, 3, H, W) tensor in
    [0, 1] ("pt"), or the (N, C, h, w) scaled latents ("latent"); one prompt and seed per image."""
    images: Any
    prompts: list[str]
    seeds: list[int] | None  # None when the caller passed generators


class Text2ImagePipeline(LatentDiffusion):
    """LatentDiffusion loaded from folders, saved whole, and called with a prompt (`__call__`, `img2img`,
    `inpaint`)."""

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_stages(cls, autoencoder: AutoencoderKL | str | Path, text_encoder: TextEncoder | str | Path,
                    unet: UNet | str | Path, *, check: bool = True, image_tower: bool = True) -> "Text2ImagePipeline":
        """Three stages, each a loaded module or a folder; refused (CheckpointError) if they do not belong together.
        image_tower=False loads a text encoder folder without CLIP's image tower (generation needs none; a tower
        trained here then loads without open_clip), so the pipeline cannot compute CLIP scores."""
        paths = {}
        if not isinstance(unet, torch.nn.Module):
            paths["unet"], unet = unet, UNet.from_pretrained(unet)
        record = UNetRecord.from_metadata(unet.identity.metadata, paths.get("unet", "unet"))
        if not isinstance(autoencoder, torch.nn.Module):
            paths["autoencoder"], autoencoder = autoencoder, AutoencoderKL.from_pretrained(autoencoder)
        if not isinstance(text_encoder, torch.nn.Module):  # read out at the layer the UNet was trained on
            paths["text_encoder"], text_encoder = text_encoder, TextEncoder.from_pretrained(
                text_encoder, output_layer=record.stages["text_encoder"].output_layer, image_tower=image_tower)
        if check:
            record.check_stages(unet, autoencoder, text_encoder, autoencoder_path=paths.get("autoencoder"),
                                text_encoder_path=paths.get("text_encoder"))
        return cls(autoencoder.eval(), text_encoder.eval(), unet.eval(), record)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, image_tower: bool = True) -> "Text2ImagePipeline":
        """A pipeline folder (pipeline.json + autoencoder/, text_encoder/, unet/) or a diffusion run folder
        (image_tower: see from_stages)."""
        found = PipelineFolder.find(folder)
        pipe = cls.from_stages(found.autoencoder, found.text_encoder, found.unet, image_tower=image_tower)
        return pipe if found.sampling is None else pipe.with_sampling(found.sampling)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a self-contained pipeline folder (atomically): the three stages and pipeline.json.

        The UNet's metadata is pointed at the copies written beside it (keeping what it was trained with
        under "trained_with"), so the folder can be moved, and stays consistent even when the copies'
        weights differ from the originals (e.g. saved after `.to(dtype=torch.float16)`).
        """
        folder = Path(folder)
        with atomic_directory(folder) as tmp:
            refs = {}
            for name, module in (("autoencoder", self.autoencoder), ("text_encoder", self.text_encoder)):
                saved = tmp / STAGE_FOLDERS[name]
                module.save_pretrained(saved, metadata=module.identity.metadata)
                ref = StageRef.of(name, module, saved, tmp / STAGE_FOLDERS["unet"], stage_hash(saved))
                refs[name] = dataclasses.replace(ref, path=str(folder / STAGE_FOLDERS[name]))  # not the temporary name
            previous = self.unet.identity.metadata
            extras = {**UNetRecord.extras(previous), "trained_with": previous.get("trained_with", previous.get("stages"))}
            record = dataclasses.replace(self.record, stages=refs)
            self.unet.save_pretrained(tmp / STAGE_FOLDERS["unet"], metadata=record.to_metadata(**extras))
            atomic_write_json(tmp / PIPELINE_FILE, {"format_version": FORMAT_VERSION, "kind": "pipeline",
                                                    "stages": STAGE_FOLDERS, "sampling": to_dict(self.record.sampling)})

    def with_sampling(self, sampling: SamplingConfig | dict) -> "Text2ImagePipeline":
        """This pipeline with other default sampling settings (a SamplingConfig or {field: value})."""
        if isinstance(sampling, dict):
            sampling = apply_overrides(self.record.sampling, sampling)
        check_sampler(sampling.sampler)
        self.record = dataclasses.replace(self.record, sampling=sampling)
        return self

    # -- requests ---------------------------------------------------------------------------------

    def request(self, prompt: Prompts, negative_prompt: Prompts | None = None, *, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, sampler: str | None = None, height: int | None = None,
                width: int | None = None, num_images_per_prompt: int = 1, seed: int | Sequence[int] | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                output_type: str = "pil", memory_limit: int | None = None) -> GenerationRequest:
        """Check a request's arguments and fill in the defaults (`self.sampling`, the training size), before
        any work starts (generation_request.resolve_request). seed: image k uses seed + k (or seed[k]);
        generator: one per image instead. A request whose estimated memory exceeds `memory_limit` bytes
        (default: the device's memory) is refused."""
        request = resolve_request(self.spec, prompt, negative_prompt, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, sampler=sampler, height=height, width=width,
                                  num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                  memory_limit=memory_limit)
        if isinstance(seed, numbers.Real):
            seed = integer("seed", seed)
        generators, seeds = self.generators(len(request.prompts), seed, generator)
        return dataclasses.replace(request, seeds=seeds, generators=generators)

    def generators(self, count: int, seed: int | Sequence[int] | None,
                   generator: torch.Generator | Sequence[torch.Generator] | None
                   ) -> tuple[list[torch.Generator], list[int] | None]:
        """One CPU generator per image: seeds seed, seed + 1, ... (a random seed if none), or the caller's."""
        if generator is not None:
            generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
            if len(generators) != count:
                raise ConfigError(f"got {len(generators)} generators for {count} images: pass one per image, "
                                  f"or a seed")
            return generators, None
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - count, ()))  # from the global RNG: torch.manual_seed repeats it
        seeds = [int(seed) + i for i in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != count:
            raise ConfigError(f"got {len(seeds)} seeds for {count} images")
        return seeded_generators(seeds), seeds

    # -- results ----------------------------------------------------------------------------------

    @staticmethod
    def format_images(images: torch.Tensor, output_type: str) -> Any:
        """(B, 3, H, W) images in [-1, 1] as `output_type` ("pil", "np" or "pt")."""
        if output_type == "pil":
            return [tensor_to_pil(image) for image in images]
        unit = (images.float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
        if output_type == "pt":
            return unit.cpu()
        return unit.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)

    def finish(self, latents: torch.Tensor, request: "GenerationRequest",
               images: torch.Tensor | None = None) -> Text2ImageOutput:
        """Decode (unless `images` are given or latents were asked for) and format the result."""
        if request.output_type == "latent":
            return Text2ImageOutput(latents, request.prompts, request.seeds)
        images = self.decode_latents(latents) if images is None else images
        return Text2ImageOutput(self.format_images(images, request.output_type), request.prompts, request.seeds)

    # -- text to image, img2img, inpainting -----------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: Prompts, negative_prompt: Prompts | None = None, *,
                 callback: Callable[[dict], None] | None = None, **options) -> Text2ImageOutput:
        """Generate num_images_per_prompt images per prompt (prompt-major order); `options` are `request`'s
        (num_inference_steps, guidance_scale, sampler, height, width, num_images_per_prompt, seed, generator,
        output_type). callback(dict(i, x, sigma, denoised)) is called once per step."""
        return self.generate(self.request(prompt, negative_prompt, **options), callback)

    @torch.no_grad()
    def generate(self, request: GenerationRequest, callback: Callable[[dict], None] | None = None) -> Text2ImageOutput:
        """The images of a resolved request."""
        return self.finish(self.text_to_latents(request, callback), request)

    @torch.no_grad()
    def img2img(self, prompt: Prompts, image: Image.Image | torch.Tensor, strength: float = 0.6,
                negative_prompt: Prompts | None = None, *, callback: Callable[[dict], None] | None = None,
                **options) -> Text2ImageOutput:
        """Re-draw `image` toward the prompt: strength 0 returns its reconstruction, 1 ignores it."""
        check_strength(strength, allow_zero=True)
        request, pixels = self._image_request(prompt, negative_prompt, image, options)
        return self.finish(img2img_latents(self, request, pixels, strength, callback), request)

    @torch.no_grad()
    def inpaint(self, prompt: Prompts, image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor,
                negative_prompt: Prompts | None = None, *, strength: float = 1.0,
                callback: Callable[[dict], None] | None = None, **options) -> Text2ImageOutput:
        """Repaint the mask's white (1) pixels following the prompt; the other pixels are kept exactly."""
        check_strength(strength, allow_zero=False)
        request, pixels = self._image_request(prompt, negative_prompt, image, options)
        repaint = mask_batch(mask, len(request.prompts), (request.width, request.height))  # (B, 1, H, W)
        latents, pasted = inpaint_images(self, request, pixels, repaint, strength, callback)
        return self.finish(latents, request, images=pasted)

    def _image_request(self, prompt: Prompts, negative_prompt: Prompts | None, image: Image.Image | torch.Tensor,
                       options: dict) -> tuple[GenerationRequest, torch.Tensor]:
        """The request for an edit of `image` (its size is the output size) and the image, one per output."""
        pixels = image_batch(image, 1)  # (1, 3, H, W)
        request = self.request(prompt, negative_prompt, height=pixels.shape[-2], width=pixels.shape[-1], **options)
        return request, pixels.expand(len(request.prompts), -1, -1, -1)
