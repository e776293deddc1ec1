"""`in_eval_mode(module)`: run a block with a module in eval mode and give it back in the mode it came in,
even when the block raises (previews, held-out scores and evaluations called from a training loop)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Yields `module` in eval mode (dropout off, norms on running statistics); restores its train flags."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
