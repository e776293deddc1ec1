"""GenerationRequest, and `resolve_request`: the one place that turns a generation's arguments into resolved
settings, and refuses what cannot work, before any work starts.

Resolution needs only a PipelineSpec (pipeline_spec.py), not torch: the CLI resolves a request against the
folder's spec before it loads the pipeline, so that a bad one is refused at once; Text2ImagePipeline.request
resolves against the loaded pipeline's spec and adds what needs torch, one generator per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import ConfigError
from .pipeline_spec import PipelineSpec
from .request_limits import check_memory, finite, integer
from .sampling_config import check_sampler

if TYPE_CHECKING:
    import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
Prompts = str | Sequence[str]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation with every setting resolved (Text2ImagePipeline.request): a prompt, negative prompt
    and generator per image, and the sampling settings."""
    prompts: list[str]                      # one per image, prompt-major
    negative_prompts: list[str] | None      # one per image, or None for the empty prompt
    seeds: list[int] | None                 # one per image; None when the caller passed generators
    generators: list[torch.Generator]       # one per image
    steps: int
    guidance_scale: float
    sampler: str                            # a name in samplers.SAMPLERS
    height: int                             # pixels
    width: int
    output_type: str = "pil"                # "pil", "np", "pt" or "latent"


def prompt_list(value: Prompts, what: str) -> list[str]:
    """A prompt or prompts as a non-empty list of strings; ConfigError naming `what` otherwise."""
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"{what}: expected a string or a non-empty list of strings")
    return items


def resolve_request(spec: PipelineSpec, prompt: Prompts, negative_prompt: Prompts | None = None, *,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    sampler: str | None = None, height: int | None = None, width: int | None = None,
                    num_images_per_prompt: int = 1, output_type: str = "pil",
                    memory_limit: int | None = None) -> GenerationRequest:
    """Check a request's arguments and fill in the defaults (`spec.sampling`, the training size). A request
    whose estimated memory exceeds `memory_limit` bytes (default: the device's memory) is refused. The result
    has no seeds and no generators yet: they are the caller's (Text2ImagePipeline.request)."""
    prompts = prompt_list(prompt, "prompt")
    negatives = None if negative_prompt is None else prompt_list(negative_prompt, "negative_prompt")
    if negatives is not None and len(negatives) == 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
    num_images_per_prompt = integer("num_images_per_prompt", num_images_per_prompt)
    if num_images_per_prompt < 1:
        raise ConfigError(f"num_images_per_prompt: must be at least 1, got {num_images_per_prompt}")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    defaults = spec.sampling
    steps = integer("num_inference_steps", defaults.steps if num_inference_steps is None else num_inference_steps)
    if steps < 1:
        raise ConfigError(f"num_inference_steps: must be at least 1, got {steps}")
    scale = finite("guidance_scale", defaults.guidance_scale if guidance_scale is None else guidance_scale)
    sampler = sampler or defaults.sampler
    check_sampler(sampler)
    height, width = (None if v is None else integer(name, v) for name, v in (("height", height), ("width", width)))
    _, _, h, w = spec.latent_shape(1, height, width)  # a bad size is refused here
    f = spec.latent_factor
    count = len(prompts) * num_images_per_prompt
    check_memory(spec, count, h * f, w * f, guided=scale != 1, limit=memory_limit)  # arithmetic on the shapes
    return GenerationRequest(
        prompts=[p for p in prompts for _ in range(num_images_per_prompt)],
        negative_prompts=None if negatives is None else [n for n in negatives for _ in range(num_images_per_prompt)],
        seeds=None, generators=[], steps=steps, guidance_scale=scale, sampler=sampler, height=h * f, width=w * f,
        output_type=output_type)
