"""The config machinery: frozen dataclasses <-> plain dicts, YAML files, dotted `a.b=value` overrides, checks.

Each component's config dataclass lives beside the component (UNetConfig in models/unet_config.py beside
models/unet.py, SamplingConfig in sampling_config.py beside samplers.py, each stage's training config at the
top of train/<stage>.py, ...); the configs a request is checked against import without torch. Each list of
valid names lives with the thing it names (SAMPLERS, PREDICTIONS, SPACINGS), a torch-free copy of a registry's
names beside its config, checked against the registry; this module knows none of them.
The dataclass defaults are the CPU presets for the built-in shapes data; the YAML files under configs/ hold
only dataclass fields, and an unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Machinery: dict <-> dataclass, YAML files, dotted overrides
# ---------------------------------------------------------------------------------------------

class ConfigLoader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true / false. YAML 1.1 also reads yes/no/on/off (any case) as
    booleans, which turned `mixed_precision: no` into False."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain JSON/YAML types (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


# Scalar kinds taken as they are: (the check, what the error says was expected). bool is an int in Python.
_EXACT = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check `value` against the annotation `kind` and convert lists to tuples, ints to floats."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {kind}")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {kind.__name__} fields, got {value!r}")
        return from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if kind in _EXACT:
        fits, expected = _EXACT[kind]
        if not fits(value):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            f"unknown config key '{key}' (known keys{' in ' + where if where else ''}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`model.ch_mult=[1,2,4]` -> ("model.ch_mult", [1, 2, 4]); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: T, overrides: dict[str, Any] | list[str]) -> T:
    """A copy of `cfg` with dotted keys replaced; `overrides` is {key: value} or ["key=value", ...]."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    data = to_dict(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key '{'.'.join(parts[:depth + 1])}'")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return from_dict(type(cfg), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """The defaults of `cls`, updated by the YAML file at `path` (if any), then by `overrides`."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        try:
            cfg = from_dict(cls, _merge(to_dict(cfg), data, ""))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def _merge(base: dict, update: dict, where: str) -> dict:
    """Deep-merge `update` into `base`; sections that are mappings merge, everything else replaces."""
    if not isinstance(update, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {update!r}")
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{where}.{key}" if where else key)
        else:
            merged[key] = value
    return merged


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_choice(where: str, value: Any, choices: tuple) -> None:
    """ConfigError naming `where` and the valid choices unless `value` is one of them."""
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
