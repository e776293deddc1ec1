"""Generation parameters carried inside the PNGs we write, so that an image can be re-rendered exactly.

The parameters are one JSON object in a PNG text chunk named "latentdiff": prompt, negative prompt,
seed, steps, sampler, guidance scale, spacing, size, and the weights hashes of the three stages.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import DataError

CHUNK = "latentdiff"


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    sampler: str
    guidance_scale: float
    spacing: str
    width: int
    height: int
    stages: dict[str, str] = field(default_factory=dict)  # stage name -> weights hash
    pipeline: str = ""                                    # the folder it was generated with

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def save_png(image: Image.Image, path: str | Path, params: GenerationParams) -> None:
    """Write `image` with its parameters to `path` through a temporary file (never half-written)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(CHUNK, params.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def read_png_params(path: str | Path) -> GenerationParams:
    """The parameters stored in a PNG written by `latentdiff generate`; DataError naming the file if absent."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.text.get(CHUNK) if hasattr(image, "text") else None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err})") from None
    if text is None:
        raise DataError(f"{path}: carries no latentdiff generation parameters (was it written by latentdiff generate?)")
    try:
        data = json.loads(text)
        return GenerationParams(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise DataError(f"{path}: its latentdiff parameters are malformed ({err})") from None
