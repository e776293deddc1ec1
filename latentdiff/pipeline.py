"""Text2ImagePipeline: the three stages and their sampling defaults, prompt in, images out.

    pipe = Text2ImagePipeline.from_pretrained("weights/diffusion")   # a run folder, or a saved pipeline folder
    pipe.to("cuda", torch.float16)                                    # the caller picks device and dtype
    out = pipe("a red circle in the top left", num_images_per_prompt=4, seed=0)
    out.images[0].save("circle.png")

A pipeline folder written by `save_pretrained` holds autoencoder/, text_encoder/, unet/ and pipeline.json
(the sampling defaults); a diffusion run folder holds the UNet, whose metadata names the other two stages
(see stages.py). Either way the three stages are checked to belong together.

Every call goes through `request(...)`, the one place that turns arguments into resolved settings
(defaults from the UNet's record, checks, one generator per image: seed, seed + 1, ...); the CLI uses it
too. Sampling itself is LatentDiffusion's (latent_diffusion.py); img2img and inpainting are editing.py's.
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

from .checkpoint import CONFIG_NAME, FORMAT_VERSION, atomic_directory, atomic_write_json, read_json
from .config import apply_overrides, from_dict, to_dict
from .data.images import tensor_to_pil
from .editing import check_strength, image_batch, img2img_latents, inpaint_images, mask_batch
from .errors import CheckpointError, ConfigError
from .latent_diffusion import GenerationRequest, LatentDiffusion, seeded_generators
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import TextEncoder
from .models.unet import UNet
from .request_limits import check_memory, finite, integer
from .samplers import SamplingConfig, check_sampler
from .stages import StageRef, UNetRecord, stage_hash

PIPELINE_FILE = "pipeline.json"
STAGE_FOLDERS = {"autoencoder": "autoencoder", "text_encoder": "text_encoder", "unet": "unet"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
Prompts = str | Sequence[str]


@dataclass
class Text2ImageOutput:
    """images: PIL images ("pil"), (N, H, W, 3) float array in [0, 1] ("np"), (N, 3, H, W) tensor in
    [0, 1] ("pt"), or the (N, C, h, w) scaled latents ("latent"); one prompt and seed per image."""
    images: Any
    prompts: list[str]
    seeds: list[int] | None  # None when the caller passed generators


def _as_list(value: Prompts, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"{what}: expected a string or a non-empty list of strings")
    return items


class Text2ImagePipeline(LatentDiffusion):
    """LatentDiffusion loaded from folders, saved whole, and called with a prompt (`__call__`, `img2img`,
    `inpaint`)."""

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_stages(cls, autoencoder: AutoencoderKL | str | Path, text_encoder: TextEncoder | str | Path,
                    unet: UNet | str | Path, *, check: bool = True) -> "Text2ImagePipeline":
        """Three stages, each a loaded module or a folder; refused (CheckpointError) if they do not belong together."""
        paths = {}
        if not isinstance(unet, torch.nn.Module):
            paths["unet"], unet = unet, UNet.from_pretrained(unet)
        record = UNetRecord.from_metadata(unet.identity.metadata, paths.get("unet", "unet"))
        if not isinstance(autoencoder, torch.nn.Module):
            paths["autoencoder"], autoencoder = autoencoder, AutoencoderKL.from_pretrained(autoencoder)
        if not isinstance(text_encoder, torch.nn.Module):  # read out at the layer the UNet was trained on
            paths["text_encoder"], text_encoder = text_encoder, TextEncoder.from_pretrained(
                text_encoder, output_layer=record.stages["text_encoder"].output_layer)
        if check:
            record.check_stages(unet, autoencoder, text_encoder, autoencoder_path=paths.get("autoencoder"),
                                text_encoder_path=paths.get("text_encoder"))
        return cls(autoencoder.eval(), text_encoder.eval(), unet.eval(), record)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Text2ImagePipeline":
        """A pipeline folder (pipeline.json + autoencoder/, text_encoder/, unet/) or a diffusion run folder."""
        folder = Path(folder)
        if (folder / PIPELINE_FILE).is_file():
            info = read_json(folder / PIPELINE_FILE)
            if info.get("format_version", 0) > FORMAT_VERSION:
                raise CheckpointError(f"{folder / PIPELINE_FILE}: format version {info['format_version']} is newer "
                                      f"than this latentdiff reads ({FORMAT_VERSION}); upgrade latentdiff")
            stages = {name: folder / info.get("stages", {}).get(name, sub) for name, sub in STAGE_FOLDERS.items()}
            pipe = cls.from_stages(stages["autoencoder"], stages["text_encoder"], stages["unet"])
            try:
                sampling = from_dict(SamplingConfig, info.get("sampling", {}), "sampling")
            except ConfigError as err:
                raise CheckpointError(f"{folder / PIPELINE_FILE}: {err}") from None
            return pipe.with_sampling(sampling)
        if (folder / CONFIG_NAME).is_file():
            unet = UNet.from_pretrained(folder)
            record = UNetRecord.from_metadata(unet.identity.metadata, folder)
            return cls.from_stages(record.stage_path("autoencoder", folder),
                                   record.stage_path("text_encoder", folder), unet)
        raise CheckpointError(f"{folder}: neither a pipeline folder (no {PIPELINE_FILE}) nor a diffusion run folder "
                              f"(no {CONFIG_NAME})")

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
        any work starts. seed: image k uses seed + k (or seed[k]); generator: one per image instead. A request
        whose estimated memory exceeds `memory_limit` bytes (default: the device's memory) is refused."""
        prompts = _as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1:
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        num_images_per_prompt = integer("num_images_per_prompt", num_images_per_prompt)
        if num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt: must be at least 1, got {num_images_per_prompt}")
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        defaults = self.sampling
        steps = integer("num_inference_steps", defaults.steps if num_inference_steps is None else num_inference_steps)
        if steps < 1:
            raise ConfigError(f"num_inference_steps: must be at least 1, got {steps}")
        scale = finite("guidance_scale", defaults.guidance_scale if guidance_scale is None else guidance_scale)
        sampler = sampler or defaults.sampler
        check_sampler(sampler)
        height, width = (None if v is None else integer(name, v) for name, v in (("height", height), ("width", width)))
        _, _, h, w = self.latent_shape(1, height, width)  # a bad size is refused here
        f = self.autoencoder.downsample_factor
        count = len(prompts) * num_images_per_prompt
        check_memory(self, count, h * f, w * f, guided=scale != 1, limit=memory_limit)  # arithmetic on the shapes
        if isinstance(seed, numbers.Real):
            seed = integer("seed", seed)
        generators, seeds = self.generators(count, seed, generator)
        return GenerationRequest(
            prompts=[p for p in prompts for _ in range(num_images_per_prompt)],
            negative_prompts=None if negatives is None else [n for n in negatives for _ in range(num_images_per_prompt)],
            seeds=seeds, generators=generators, steps=steps, guidance_scale=scale, sampler=sampler,
            height=h * f, width=w * f, output_type=output_type)

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
