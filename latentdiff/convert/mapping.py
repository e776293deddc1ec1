"""Renaming state dicts between key layouts, with every key accounted for, and checks on foreign configs.

A conversion never drops a tensor quietly: `rename` refuses keys that have no place in the target layout
and names them, and the strict load that follows it names any the source lacked.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import CheckpointError, short_list


def rename(state: dict[str, torch.Tensor], mapping: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    """`state` with key k renamed to mapping[k]; a key of `state` that `mapping` lacks is an error naming it."""
    unmapped = set(state) - set(mapping)
    if unmapped:
        raise CheckpointError(f"{where}: keys with no place in the model: {short_list(unmapped)}")
    return {mapping[k]: v for k, v in state.items()}


def split_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """Identity (16 hex digits) of in-memory weights: SHA-256 over names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _fits(value: Any, expected: Any) -> bool:
    if isinstance(value, (list, tuple)) and not isinstance(expected, (list, tuple)):
        return all(_fits(v, expected) for v in value)  # a per-block list of the one supported value
    if isinstance(expected, float) and isinstance(value, (int, float)):
        return abs(value - expected) <= 1e-9 * max(1.0, abs(expected))
    return value == expected


def check_fixed(config: dict, fixed: dict[str, Any | tuple], where: str) -> None:
    """Refuse a foreign config whose fields ask for an architecture we do not build.

    `fixed` maps a field to the value we support, or to a tuple of supported values; absent fields
    take the foreign library's default, which is always a supported value here.
    """
    bad = []
    for key, expected in fixed.items():
        if key not in config:
            continue
        options = expected if isinstance(expected, tuple) else (expected,)
        if not any(_fits(config[key], option) for option in options):
            bad.append(f"{key}={config[key]!r} (supported: {' or '.join(map(repr, options))})")
    if bad:
        raise CheckpointError(f"{where}: unsupported architecture: {'; '.join(bad)}")


def require(config: dict, key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: the config has no '{key}'")
    return config[key]


def per_level(value: Any, levels: int, key: str, where: str) -> tuple:
    """A field given once for all levels or as one entry per level, as a tuple of `levels` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise CheckpointError(f"{where}: {key} has {len(value)} entries for {levels} levels")
        return tuple(value)
    return (value,) * levels


def as_int_or_tuple(values: tuple) -> int | tuple:
    """(8, 8, 8) -> 8; (5, 10, 20) stays a tuple (the compact form configs use)."""
    return values[0] if len(set(values)) == 1 else tuple(values)
