"""Exponential moving average of a model's weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


def _tensors(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return list(model.parameters()), list(model.buffers())


class EMA(nn.Module):
    """Holds a frozen copy of `model` whose weights follow w_ema <- decay * w_ema + (1 - decay) * w.

    The effective decay is warmed up as min(decay, (1 + n) / (10 + n)) so that early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # (followed model, its tensors, the shadow's tensors), listed on the first update: listing a UNet's
        # tensors walks its ~300 submodules, ~1 ms a time, and the same Parameter objects are updated in place
        self._lists: tuple | None = None

    def _paired_tensors(self, model: nn.Module) -> tuple[tuple[list, list], tuple[list, list]]:
        if self._lists is None or self._lists[0] is not model:
            self._lists = (model, _tensors(model), _tensors(self.shadow))
        return self._lists[1], self._lists[2]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = self.num_updates.item()
        decay = min(self.decay, (1 + n) / (10 + n))
        (parameters, buffers), (shadow, shadow_buffers) = self._paired_tensors(model)
        current = [p.detach().to(s.dtype) for s, p in zip(shadow, parameters)]
        # one call for all tensors: a loop of lerp_ costs ~5 ms per step on the UNet preset's 286 tensors
        torch._foreach_lerp_(shadow, current, 1.0 - decay)
        for ema_b, b in zip(shadow_buffers, buffers):
            ema_b.copy_(b)
