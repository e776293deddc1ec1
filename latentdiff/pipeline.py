"""Text2ImagePipeline: the three stages and their sampling defaults, prompt in, images out.

    pipe = Text2ImagePipeline.from_pretrained("weights/diffusion")   # a run folder, or a saved pipeline folder
    pipe.to("cuda", torch.float16)                                    # the caller picks device and dtype
    out = pipe("a red circle in the top left", num_images_per_prompt=4, seed=0)
    out.images[0].save("circle.png")

A pipeline folder written by `save_pretrained` holds autoencoder/, text_encoder/, unet/ and pipeline.json
(the sampling defaults); a diffusion run folder holds the UNet, whose metadata names the other two stages
(see stages.py). Either way the three stages are checked to belong together.

Sampling runs in the sigma space of samplers.py: prompts -> token states -> (classifier-free guided)
denoiser -> sampler loop from `initial_latent` -> latents / scale_factor -> autoencoder decoder. Every
image has its own torch.Generator (seed, seed + 1, ...), so an image depends on its seed, not on the batch.
The predicted x0 is never clipped (latents are not pixels).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .checkpoint import CONFIG_NAME, FORMAT_VERSION, atomic_directory, atomic_write_json, read_json
from .config import SamplingConfig, apply_overrides, from_dict, to_dict
from .data.images import tensor_to_pil
from .editing import ImageEditingMixin
from .diffusion import Denoiser, NoiseSchedule
from .errors import CheckpointError, ConfigError
from .guidance import CFGDenoiser
from .models.autoencoder import AutoencoderKL
from .models.text_encoder import TextEncoder
from .models.unet import UNet
from .samplers import SAMPLERS, initial_latent
from .stages import UNetRecord, check_stages, stage_hash, stage_record

PIPELINE_FILE = "pipeline.json"
STAGE_FOLDERS = {"autoencoder": "autoencoder", "text_encoder": "text_encoder", "unet": "unet"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Text2ImageOutput:
    """images: PIL images ("pil"), (N, H, W, 3) float array in [0, 1] ("np"), (N, 3, H, W) tensor in
    [0, 1] ("pt"), or the (N, C, h, w) scaled latents ("latent"); one prompt and seed per image."""
    images: Any
    prompts: list[str]
    seeds: list[int] | None  # None when the caller passed generators


@dataclass
class GenerationRequest:
    """A checked request: one prompt, seed and generator per image, the sampling settings, the encoded cond."""
    prompts: list[str]
    seeds: list[int] | None
    generators: list[torch.Generator]
    steps: int
    guidance_scale: float
    sampler: str
    output_type: str
    cond: dict[str, torch.Tensor]


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"{what}: expected a string or a non-empty list of strings")
    return items


class Text2ImagePipeline(ImageEditingMixin):
    """Autoencoder + text encoder + UNet, and how to sample from the UNet (`record`: see stages.UNetRecord)."""

    def __init__(self, autoencoder: AutoencoderKL, text_encoder: TextEncoder, unet: UNet, record: UNetRecord):
        self.autoencoder, self.text_encoder, self.unet = autoencoder, text_encoder, unet
        self.record = record
        self.schedule = NoiseSchedule.from_config(record.schedule)
        self.denoiser = Denoiser(unet, self.schedule, record.prediction)

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_stages(cls, autoencoder: AutoencoderKL | str | Path, text_encoder: TextEncoder | str | Path,
                    unet: UNet | str | Path, *, check: bool = True) -> "Text2ImagePipeline":
        """Three stages, each a loaded module or a folder; refused (CheckpointError) if they do not belong together."""
        paths = {}
        if not isinstance(unet, torch.nn.Module):
            paths["unet"], unet = unet, UNet.from_pretrained(unet)
        record = UNetRecord.from_metadata(getattr(unet, "metadata", {}), paths.get("unet", "unet"))
        if not isinstance(autoencoder, torch.nn.Module):
            paths["autoencoder"], autoencoder = autoencoder, AutoencoderKL.from_pretrained(autoencoder)
        if not isinstance(text_encoder, torch.nn.Module):  # read out at the layer the UNet was trained on
            paths["text_encoder"], text_encoder = text_encoder, TextEncoder.from_pretrained(
                text_encoder, output_layer=record.stages["text_encoder"].get("output_layer"))
        if check:
            check_stages(record, unet, autoencoder, text_encoder, autoencoder_path=paths.get("autoencoder"),
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
            record = UNetRecord.from_metadata(unet.metadata, folder)
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
            self.autoencoder.save_pretrained(tmp / STAGE_FOLDERS["autoencoder"],
                                             metadata=getattr(self.autoencoder, "metadata", None))
            self.text_encoder.save_pretrained(tmp / STAGE_FOLDERS["text_encoder"],
                                              metadata=getattr(self.text_encoder, "metadata", None))
            unet_dir = tmp / STAGE_FOLDERS["unet"]
            stages = {}
            for name, module in (("autoencoder", self.autoencoder), ("text_encoder", self.text_encoder)):
                saved = tmp / STAGE_FOLDERS[name]
                stages[name] = stage_record(name, module, saved, unet_dir, stage_hash(saved))
                stages[name]["path"] = str(folder / STAGE_FOLDERS[name])  # where it will be, not the temporary name
            metadata = dict(getattr(self.unet, "metadata", {}))
            metadata.setdefault("trained_with", metadata.get("stages"))
            metadata.update(stages=stages, prediction=self.record.prediction, schedule=to_dict(self.record.schedule),
                            sampling=to_dict(self.record.sampling), image_size=self.record.image_size,
                            context_mask=self.record.context_mask)
            self.unet.save_pretrained(unet_dir, metadata=metadata)
            atomic_write_json(tmp / PIPELINE_FILE, {"format_version": FORMAT_VERSION, "kind": "pipeline",
                                                    "stages": STAGE_FOLDERS, "sampling": to_dict(self.record.sampling)})

    def with_sampling(self, sampling: SamplingConfig | dict) -> "Text2ImagePipeline":
        """This pipeline with other default sampling settings (a SamplingConfig or {field: value})."""
        if isinstance(sampling, dict):
            sampling = apply_overrides(self.record.sampling, sampling)
        check_sampler(sampling.sampler)
        self.record = dataclasses.replace(self.record, sampling=sampling)
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Text2ImagePipeline":
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
        return self.record.sampling

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the UNet's."""
        return self.autoencoder.downsample_factor * self.unet.config.downsample_factor

    # -- the steps of a generation (img2img and inpainting reuse them) ---------------------------

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the latents for images of height x width pixels (default: the training size)."""
        default = self.record.image_size or 8 * self.size_multiple
        height, width = height or default, width or default
        m = self.size_multiple
        if height % m or width % m or height < m or width < m:
            raise ConfigError(f"image size {width}x{height} is not a positive multiple of {m} on both sides "
                              f"(the autoencoder's latent factor {self.autoencoder.downsample_factor} times the "
                              f"UNet's {self.unet.config.downsample_factor})")
        f = self.autoencoder.downsample_factor
        return batch, self.unet.config.in_channels, height // f, width // f

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
        return [torch.Generator().manual_seed(s) for s in seeds], seeds

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
        return cond

    def denoise(self, x: torch.Tensor, sigmas: torch.Tensor, cond: dict, *, guidance_scale: float, sampler: str,
                generators: list[torch.Generator], callback: Callable | None = None,
                wrap: Callable | None = None) -> torch.Tensor:
        """Run `sampler` from x (sigma space, at sigmas[0]) down to sigma = 0; returns the scaled latents.
        `wrap(denoiser) -> denoiser` adapts the (guided) denoiser, e.g. for inpainting."""
        check_sampler(sampler)
        denoiser = self.denoiser if guidance_scale == 1 else CFGDenoiser(self.denoiser, guidance_scale)
        if wrap is not None:
            denoiser = wrap(denoiser)
        return SAMPLERS[sampler](denoiser, x, sigmas, cond=cond, generator=generators, callback=callback)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, H, W) images, about [-1, 1]."""
        ae = self.autoencoder
        z = latents / ae.config.scale_factor
        return ae.decode(z.to(next(ae.parameters()).dtype))

    @staticmethod
    def format_images(images: torch.Tensor, output_type: str) -> Any:
        """(B, 3, H, W) images in [-1, 1] as `output_type` ("pil", "np" or "pt")."""
        if output_type == "pil":
            return [tensor_to_pil(image) for image in images]
        unit = (images.float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
        if output_type == "pt":
            return unit.cpu()
        return unit.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)

    # -- text to image --------------------------------------------------------------------------

    def prepare(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
                num_images_per_prompt: int, seed: int | Sequence[int] | None,
                generator: torch.Generator | Sequence[torch.Generator] | None, num_inference_steps: int | None,
                guidance_scale: float | None, sampler: str | None, output_type: str) -> "GenerationRequest":
        """Check a request's arguments, fill in the sampling defaults, make the generators, encode the prompts."""
        prompts = _as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1:
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        if num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt: must be at least 1, got {num_images_per_prompt}")
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        defaults = self.sampling
        steps = defaults.steps if num_inference_steps is None else num_inference_steps
        if steps < 1:
            raise ConfigError(f"num_inference_steps: must be at least 1, got {steps}")
        scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        sampler = sampler or defaults.sampler
        check_sampler(sampler)
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        negative_per_image = None if negatives is None else [n for n in negatives for _ in range(num_images_per_prompt)]
        generators, seeds = self.generators(len(per_image), seed, generator)
        return GenerationRequest(per_image, seeds, generators, steps, scale, sampler, output_type,
                                 self.encode_prompts(per_image, negative_per_image, scale))

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampling sigma sequence for `steps` steps under the pipeline's spacing, ending in 0."""
        defaults = self.sampling
        return self.schedule.sampling_sigmas(steps, defaults.spacing, defaults.steps_offset)

    def finish(self, latents: torch.Tensor, request: "GenerationRequest",
               images: torch.Tensor | None = None) -> Text2ImageOutput:
        """Decode (unless `images` are given or latents were asked for) and format the result."""
        if request.output_type == "latent":
            return Text2ImageOutput(latents, request.prompts, request.seeds)
        images = self.decode_latents(latents) if images is None else images
        return Text2ImageOutput(self.format_images(images, request.output_type), request.prompts, request.seeds)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, seed: int | Sequence[int] | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 output_type: str = "pil", callback: Callable[[dict], None] | None = None) -> Text2ImageOutput:
        """Generate num_images_per_prompt images per prompt (prompt-major order).

        Steps, guidance scale and sampler default to the pipeline's sampling settings (`self.sampling`).
        seed: image k uses seed + k (or seed[k]); generator: one torch.Generator per image instead.
        callback(dict(i, x, sigma, denoised)) is called once per step.
        """
        self.latent_shape(1, height, width)  # a bad size is refused before the prompts are encoded
        request = self.prepare(prompt, negative_prompt, num_images_per_prompt, seed, generator,
                               num_inference_steps, guidance_scale, sampler, output_type)
        shape = self.latent_shape(len(request.prompts), height, width)
        sigmas = self.sigmas(request.steps)
        x = initial_latent(shape, sigmas, request.generators, dtype=self.dtype, device=self.device)
        latents = self.denoise(x, sigmas, request.cond, guidance_scale=request.guidance_scale,
                               sampler=request.sampler, generators=request.generators, callback=callback)
        return self.finish(latents, request)
