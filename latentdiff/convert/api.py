"""load_pipeline / save_pipeline / convert: any supported format in, any out (the package docstring explains)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME, PICKLE_SUFFIXES, SAFETENSORS_SUFFIX
from ..errors import CheckpointError
from ..pipeline import PIPELINE_FILE, Text2ImagePipeline
from .assemble import ContextMaskWarning
from .diffusers_format import MODEL_INDEX, load_diffusers, save_diffusers
from .single_file import SkippedWeightsWarning, load_single_file, save_single_file

FORMATS = ("diffusers", "single-file", "latentdiff")

__all__ = ["FORMATS", "ContextMaskWarning", "SkippedWeightsWarning", "convert", "detect_format", "load_diffusers",
           "load_pipeline", "load_single_file", "save_diffusers", "save_pipeline", "save_single_file"]


def detect_format(path: str | Path) -> str:
    """"single-file" (a weights file), "diffusers" (model_index.json) or "latentdiff" (pipeline / run folder)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
            return "single-file"
        raise CheckpointError(f"{path}: not a checkpoint file (expected {SAFETENSORS_SUFFIX} or "
                              f"{', '.join(PICKLE_SUFFIXES)})")
    if (path / MODEL_INDEX).is_file():
        return "diffusers"
    if (path / PIPELINE_FILE).is_file() or (path / CONFIG_NAME).is_file():
        return "latentdiff"
    if not path.exists():
        raise CheckpointError(f"not found: {path}")
    raise CheckpointError(f"{path}: neither a diffusers folder ({MODEL_INDEX}), a latentdiff pipeline or run folder "
                          f"({PIPELINE_FILE} / {CONFIG_NAME}), nor a checkpoint file")


def load_pipeline(path: str | Path, *, allow_pickle: bool = False, **single_file_options) -> Text2ImagePipeline:
    """A pipeline from any supported format; `single_file_options` go to load_single_file (config, variant,
    prediction, tokenizer)."""
    kind = detect_format(path)
    if kind != "single-file" and any(v is not None for v in single_file_options.values()):
        given = ", ".join(k for k, v in single_file_options.items() if v is not None)
        raise CheckpointError(f"{path}: {given} only apply to single-file checkpoints (this is a {kind} folder)")
    if kind == "single-file":
        return load_single_file(path, allow_pickle=allow_pickle, **single_file_options)
    if kind == "diffusers":
        return load_diffusers(path, allow_pickle=allow_pickle)
    return Text2ImagePipeline.from_pretrained(path)


def save_pipeline(pipe: Text2ImagePipeline, path: str | Path, *, to: str, dtype: torch.dtype | None = None) -> None:
    """Write `pipe` in format `to` (one of FORMATS); `dtype` casts the weights (diffusers and single-file)."""
    if to == "diffusers":
        save_diffusers(pipe, path, dtype=dtype)
    elif to == "single-file":
        save_single_file(pipe, path, dtype=dtype)
    elif to == "latentdiff":
        if dtype is not None:
            pipe.to(dtype=dtype)
        pipe.save_pretrained(path)
    else:
        raise CheckpointError(f"unknown format {to!r} (known: {', '.join(FORMATS)})")


def convert(src: str | Path, dst: str | Path, *, to: str, dtype: torch.dtype | None = None,
            allow_pickle: bool = False, **single_file_options) -> Text2ImagePipeline:
    """Load `src` (format detected), write it to `dst` in format `to`; returns the loaded pipeline."""
    if to not in FORMATS:
        raise CheckpointError(f"unknown format {to!r} (known: {', '.join(FORMATS)})")
    if Path(dst).resolve() == Path(src).resolve():
        raise CheckpointError(f"{dst}: the destination is the source")
    pipe = load_pipeline(src, allow_pickle=allow_pickle, **single_file_options)
    save_pipeline(pipe, dst, to=to, dtype=dtype)
    return pipe
