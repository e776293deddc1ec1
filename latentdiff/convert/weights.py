"""Reading weights files: safetensors (always), and pickled PyTorch files only when the caller opts in.

Pickle can run code, so `.ckpt` / `.bin` / `.pt` files are refused unless `allow_pickle=True`, and even then
they are read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_weights(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of one weights file; a pickled file's top-level "state_dict" is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: cannot be read as safetensors ({_first_line(err)})") from None
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: not a weights file (expected {SAFETENSORS_SUFFIX} or, with --allow-pickle, "
                              f"{', '.join(PICKLE_SUFFIXES)})")
    if not allow_pickle:
        raise CheckpointError(f"{path}: a pickled checkpoint, which can run code when loaded; convert a "
                              f"{SAFETENSORS_SUFFIX} file instead, or pass --allow-pickle (allow_pickle=True) to read "
                              f"it with torch.load(weights_only=True)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) "
                              f"({_first_line(err)})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds no state dict")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in data if k not in tensors)
    if others:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, others[:8]))}")
    return tensors, {}


def read_model_weights(folder: Path, stem: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a diffusers model folder: `stem`.safetensors, its sharded index, or (opt-in) `stem`.bin."""
    single = folder / f"{stem}{SAFETENSORS_SUFFIX}"
    if single.is_file():
        return read_weights(single)[0]
    index = folder / f"{stem}{SAFETENSORS_SUFFIX}.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a safetensors shard index ({_first_line(err)})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_weights(folder / shard)[0])
        return state
    pickled = folder / f"{stem}.bin"
    if pickled.is_file():
        return read_weights(pickled, allow_pickle=allow_pickle)[0]
    raise CheckpointError(f"{folder}: no weights ({single.name}, its .index.json, or {pickled.name})")
