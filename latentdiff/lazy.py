"""Module attributes loaded on first use (PEP 562), so that light commands (`latentdiff --help`) do not
import torch and the models just to define their arguments."""
from __future__ import annotations

import importlib
import sys
import types
from typing import Callable


def lazy_attributes(module: str, namespace: dict, homes: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `module` that imports `name` from `homes[name]` (relative to the module's
    package: a package's own submodule, or a sibling of a plain module) when first asked for, then keeps
    it in `namespace` (the module's globals) as a plain attribute.

    A name that is also its home's name (`clip_score`, the function in the submodule clip_score.py) stays
    the attribute: importing such a submodule would otherwise bind the package's attribute to the module.
    """
    package = namespace.get("__package__") or module

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{homes[name]}", package), name)
        namespace[name] = value
        return value

    clashes = {name for name, home in homes.items() if home == name}
    if clashes and package == module:
        sys.modules[module].__class__ = _keeping(module, clashes)
    return __getattr__


def _keeping(package: str, names: set[str]) -> type[types.ModuleType]:
    """A module class on which the import system's `setattr(package, name, submodule)` leaves `names`
    alone: they load through `__getattr__`, or keep what it loaded."""
    class PackageKeepingAttributes(types.ModuleType):
        def __setattr__(self, name: str, value) -> None:
            if name in names and getattr(value, "__name__", None) == f"{package}.{name}":
                return  # the submodule stays reachable as sys.modules[f"{package}.{name}"]
            super().__setattr__(name, value)
    return PackageKeepingAttributes
