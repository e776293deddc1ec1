"""Checkpoint folders: `model.safetensors` + `config.json` (config, format version, metadata), and the one
reader of weights files.

Nothing is pickled. Files are written to a temporary name and moved into place, so a crash leaves
either the old file or the new one, never half of one; `config.json` is written last and records the
SHA-256 of the weights, so a folder whose two files do not belong together is refused on load.

Every weights file latentdiff opens goes through `read_weights`: safetensors always; a pickled PyTorch
file (.ckpt / .bin / .pt / .pth), which can run code when unpickled, only when the caller passes
`allow_pickle=True`, and even then with `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers and refuses any other object.

torch loads only with the functions that handle tensors: a folder's config (`read_model_config`) and the
sizes of its weights (`read_tensor_sizes`) are read without it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .config import from_dict, to_dict
from .errors import CheckpointError, ConfigError, short_list

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; tensors are made contiguous CPU copies first."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_model_files(folder: str | Path, *, kind: str, config: Any, state_dict: dict[str, torch.Tensor],
                     metadata: dict | None = None) -> None:
    """Write one stage's weights and config into `folder` (weights first, config last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    save_tensors(state_dict, weights, metadata={"format": "pt", "kind": kind})
    atomic_write_json(folder / CONFIG_NAME, {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": to_dict(config),
        "weights_sha256": sha256_file(weights),
        "metadata": metadata or {},
    })


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; CheckpointError naming the file if it is missing, malformed or not an object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config_file(folder: str | Path, kind: str) -> dict:
    """The parsed config.json of a `kind` checkpoint folder, with clear errors for what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint not found: {folder}")
    if folder.is_file():
        raise CheckpointError(f"{folder}: expected a checkpoint folder (holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} here; is this a latentdiff {kind} checkpoint?")
    info = read_json(path)
    if "config" not in info:
        raise CheckpointError(f"{path}: not a latentdiff config (no 'config' entry)")
    if info.get("kind") != kind:
        raise CheckpointError(f"{folder}: holds a {info.get('kind')!r} checkpoint, expected {kind!r}")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {info['format_version']} is newer than this latentdiff "
                              f"reads ({FORMAT_VERSION}); upgrade latentdiff")
    return info


def read_model_config(folder: str | Path, kind: str, config_class: type) -> tuple[Any, dict]:
    """(config dataclass, the whole parsed config.json) of a `kind` checkpoint folder; no weights are read."""
    folder = Path(folder)
    info = read_config_file(folder, kind)
    try:
        return from_dict(config_class, info["config"]), info
    except ConfigError as err:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {err}") from None


def load_model_files(folder: str | Path, *, kind: str, config_class: type) -> tuple[Any, dict, dict]:
    """(config dataclass, state dict, metadata) of a checkpoint folder written by save_model_files."""
    folder = Path(folder)
    config, info = read_model_config(folder, kind, config_class)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {WEIGHTS_NAME} is missing")
    expected = info.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: does not match the hash recorded in {CONFIG_NAME} "
                              f"(the folder holds files from two different saves)")
    return config, read_weights(weights)[0], info.get("metadata", {})


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:  # torch's long refusal: keep its reason, not its advice to drop weights_only
        reason = text.split("WeightsUnpickler error:", 1)[1].strip()
        return reason.splitlines()[0].split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_weights(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of one weights file; a pickled file's top-level "state_dict" is unwrapped."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

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
    except Exception as err:  # unpickling errors come in many types; a code payload is one of them
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True), which loads tensors "
                              f"and nothing else ({_first_line(err)})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds no state dict")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = [k for k in data if k not in tensors]
    if others:
        raise CheckpointError(f"{path}: entries that are not tensors: {short_list(others)}")
    return tensors, {}


def read_tensor_sizes(path: str | Path) -> dict[str, tuple[str, int, int]]:
    """{tensor name: (safetensors dtype such as "F32", elements, bytes)} of a safetensors file, from its header
    alone (8 bytes little-endian: the header's length, then the header, JSON): no tensor is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return {name: (entry["dtype"], math.prod(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0])
                for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:  # a bad length or entry
        raise CheckpointError(f"{path}: cannot be read as safetensors ({_first_line(err)})") from None


def read_model_weights(folder: Path, stem: str, *, pickled: str | None = None,
                       allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a diffusers / transformers model folder: `stem`.safetensors, its sharded index, or
    (with allow_pickle) the pickled file `pickled` (default `stem`.bin)."""
    folder = Path(folder)
    single = folder / f"{stem}{SAFETENSORS_SUFFIX}"
    if single.is_file():
        return read_weights(single)[0]
    index = folder / f"{stem}{SAFETENSORS_SUFFIX}.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors shard index (no 'weight_map')")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_weights(folder / shard)[0])
        return state
    pickled_path = folder / (pickled or f"{stem}.bin")
    if pickled_path.is_file():
        return read_weights(pickled_path, allow_pickle=allow_pickle)[0]
    raise CheckpointError(f"{folder}: no weights ({single.name}, its .index.json, or {pickled_path.name})")


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, where: str | Path) -> None:
    """`load_state_dict(strict=True)`, with missing/unexpected keys and shape mismatches named."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {short_list(unexpected)}")
        if wrong:
            parts.append("shape mismatch " + short_list(
                [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]))
        raise CheckpointError(f"{where}: weights do not fit the model built from its config: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def weights_hash(folder: str | Path) -> str:
    """Short identity of a saved stage: the recorded SHA-256 of its weights (16 hex digits)."""
    info = json.loads((Path(folder) / CONFIG_NAME).read_text())
    digest = info.get("weights_sha256") or sha256_file(Path(folder) / WEIGHTS_NAME)
    return digest[:16]


@dataclass(frozen=True)
class StageIdentity:
    """Where a loaded stage came from: the hash of its weights (its identity, which the stages trained on it
    record) and the metadata saved beside them. A module built in memory has the empty identity."""
    weights_hash: str = ""
    metadata: dict = field(default_factory=dict)


class PretrainedMixin:
    """`save_pretrained(folder)` / `from_pretrained(folder)` for a module built from one config dataclass.

    Subclasses set `checkpoint_kind` and `config_class` and keep their config in `self.config`.
    """

    checkpoint_kind: str = ""
    config_class: type = object
    identity: StageIdentity = StageIdentity()  # set by from_pretrained

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        save_model_files(folder, kind=self.checkpoint_kind, config=self.config,
                         state_dict=self.state_dict(), metadata=metadata)

    @classmethod
    def from_pretrained(cls, folder: str | Path):
        config, state_dict, metadata = load_model_files(folder, kind=cls.checkpoint_kind,
                                                        config_class=cls.config_class)
        model = cls(config)
        load_state_dict_strict(model, state_dict, folder)
        model.identity = StageIdentity(weights_hash(folder), metadata)
        model.eval()
        return model
