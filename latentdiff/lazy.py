"""Package attributes loaded on first use (PEP 562), so that light commands (`latentdiff --help`) do not
import torch and the models just to define their arguments."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_attributes(package: str, namespace: dict, homes: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package` that imports `name` from its submodule `homes[name]` when first
    asked for, then keeps it in `namespace` (the package's globals) as a plain attribute."""
    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{homes[name]}", package), name)
        namespace[name] = value
        return value
    return __getattr__
