"""One generation from the page's fields, without gradio: the fields become `pipe.request(...)` (every default
and check is the pipeline's), uploads are read with clear errors, and the images are written as
`latentdiff generate` writes them (its file names and its PNG parameters)."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..errors import ConfigError, DataError
from ..generate import next_index, slug, stage_hashes
from ..png_info import GenerationParams, save_png
from ..request_limits import format_bytes
from .picker import PipelineEntry

MODES = ("text to image", "image to image", "inpaint")
MAX_UPLOAD_PIXELS = 4096 * 4096  # an upload is resized to the generation size; this bounds its decoding
EDIT_CHUNK = "latentdiff-edit"   # edits' parameters: not "latentdiff", which --from-png would render as text to image
_writing = threading.Lock()      # output indices are unique across concurrent generations


class Cancelled(Exception):
    """Raised from the sampler's callback when the visitor cancels."""


@dataclass(frozen=True)
class Fields:
    """What the page sends: numbers may be None (blank: the pipeline's default), guidance is the typed text."""
    prompt: str
    negative: str = ""
    sampler: str | None = None
    steps: float | None = None
    guidance: str = ""
    seed: float | None = None
    random_seed: bool = False
    count: float | None = 1
    width: float | None = None
    height: float | None = None
    mode: str = MODES[0]
    strength: str = ""                  # typed text; blank: the pipeline method's default
    image: str | None = None            # uploaded file path
    drawn_mask: Image.Image | None = None  # painted on the image (white / opaque = repaint)
    mask: str | None = None             # uploaded mask file path


def parse_number(name: str, text: str | None) -> float | None:
    """A typed number; None when blank. "nan" and "inf" parse: the pipeline refuses them, as for the CLI."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None


def read_upload(path: str | None, what: str, max_bytes: int) -> Image.Image:
    """An uploaded image, refused (one line) when missing, too large, or not an image Pillow reads."""
    if not path:
        raise ConfigError(f"{what}: upload an image first")
    name, size = Path(path).name, os.path.getsize(path)
    if size > max_bytes:
        raise DataError(f"{what}: {name} is {format_bytes(size)}, more than the {format_bytes(max_bytes)} "
                        f"this page accepts")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise DataError(f"{what}: {name} is {image.width}x{image.height} pixels, more than the "
                                f"{MAX_UPLOAD_PIXELS:,} this page accepts")
            image.load()
            return image.copy()
    except UnidentifiedImageError:
        raise DataError(f"{what}: {name} cannot be read as an image (not a format Pillow reads)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{what}: {name} cannot be read as an image ({err})") from None


def drawn_mask(layers: list[Image.Image] | None) -> Image.Image | None:
    """The union of the painted layers' opaque pixels as an "L" mask (255 = repaint); None if nothing is painted."""
    painted = [np.asarray(layer.convert("RGBA"))[..., 3] > 0 for layer in layers or []]
    if not painted or not any(p.any() for p in painted):
        return None
    return Image.fromarray((np.logical_or.reduce(painted) * 255).astype(np.uint8), "L")


def caption(params: GenerationParams, mode: str, strength: float | None) -> str:
    text = (f"seed {params.seed} · {params.steps} steps · {params.sampler} · guidance {params.guidance_scale:g} · "
            f"{params.width}x{params.height}")
    if params.negative_prompt:
        text += f" · negative: {params.negative_prompt}"
    if mode != MODES[0]:
        text += f" · {mode}" + ("" if strength is None else f" at strength {strength:g}")
    return f"{text} — {params.prompt}"


def render(entry: PipelineEntry, fields: Fields, out: Path, *, memory_limit: int | None, max_upload: int,
           on_step: Callable[[int, int | None], None], cancelled: Callable[[], bool]) -> list[tuple[str, str]]:
    """Generate the fields' images with the entry's pipeline (one generation at a time per pipeline) and
    write them to `out`; returns (path, caption) per image. ConfigError / DataError for bad input, before any
    work starts; Cancelled when `cancelled()` turns true between steps."""
    pipe, prompt = entry.pipe, fields.prompt.strip()
    if not prompt:
        raise ConfigError('the prompt is empty: give a prompt, e.g. "a red circle"')
    if fields.mode not in MODES:
        raise ConfigError(f"mode {fields.mode!r} is not one of {', '.join(MODES)}")
    negative = fields.negative.strip() or None
    request = pipe.request(prompt, negative, num_inference_steps=fields.steps, sampler=fields.sampler or None,
                           guidance_scale=parse_number("guidance_scale", fields.guidance),
                           height=fields.height, width=fields.width,
                           num_images_per_prompt=1 if fields.count is None else fields.count,
                           seed=None if fields.random_seed else fields.seed, memory_limit=memory_limit)
    edit = fields.mode != MODES[0]
    strength = parse_number("strength", fields.strength) if edit else None  # None: the pipeline's default
    if edit:  # read the uploads before any sampling: a bad one is refused first
        size = (request.width, request.height)
        image = read_upload(fields.image, "image", max_upload).convert("RGB").resize(size, Image.Resampling.LANCZOS)
        mask = fields.drawn_mask if fields.mask is None else read_upload(fields.mask, "mask", max_upload)
        if fields.mode == "inpaint" and mask is None:
            raise ConfigError("inpaint: paint the area to repaint on the image, or upload a mask (white = repaint)")

    def callback(info: dict) -> None:
        # an edit runs the last `strength` of the schedule (the pipeline has checked strength by now)
        total = request.steps if strength is None else int(round(request.steps * strength))
        if cancelled():
            raise Cancelled(f"cancelled at step {info['i'] + 1} of {total}")
        on_step(info["i"] + 1, None if edit and strength is None else total)

    resolved = dict(num_inference_steps=request.steps, guidance_scale=request.guidance_scale, sampler=request.sampler,
                    num_images_per_prompt=len(request.seeds), seed=request.seeds, memory_limit=memory_limit,
                    callback=callback, **({} if strength is None else {"strength": strength}))
    with entry.lock:
        if fields.mode == "image to image":
            result = pipe.img2img(prompt, image, negative_prompt=negative, **resolved)
        elif fields.mode == "inpaint":
            result = pipe.inpaint(prompt, image, mask.convert("L"), negative_prompt=negative, **resolved)
        else:
            result = pipe.generate(request, callback)
    return write_images(entry, result.images, result.seeds, request, negative, out, fields.mode, strength)


def write_images(entry: PipelineEntry, images: list[Image.Image], seeds: list[int], request, negative: str | None,
                 out: Path, mode: str, strength: float | None) -> list[tuple[str, str]]:
    """The PNGs `latentdiff generate` writes (edits carry their parameters under EDIT_CHUNK instead)."""
    hashes, written = stage_hashes(entry.pipe), []
    out.mkdir(parents=True, exist_ok=True)
    with _writing:
        index = next_index(out)
        for k, (image, seed) in enumerate(zip(images, seeds)):
            params = GenerationParams(prompt=request.prompts[k], negative_prompt=negative, seed=seed,
                                      steps=request.steps, sampler=request.sampler,
                                      guidance_scale=request.guidance_scale, spacing=entry.pipe.sampling.spacing,
                                      width=image.width, height=image.height, stages=hashes, pipeline=entry.folder)
            path = out / f"{index + k:05d}-{seed}-{slug(params.prompt)}.png"
            if mode == MODES[0]:
                save_png(image, path, params)
            else:
                info = PngImagePlugin.PngInfo()
                info.add_text(EDIT_CHUNK, json.dumps({**asdict(params), "mode": mode, "strength": strength}))
                image.save(path, pnginfo=info)
            written.append((str(path), caption(params, mode, strength)))
    return written
