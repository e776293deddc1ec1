"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, so samplers stay unaware of it."""
from __future__ import annotations

from typing import Callable

import torch

TEXT_KEYS = ("context", "uncond_context", "context_mask", "uncond_context_mask")  # the (B, L, ...) entries of a cond


class CFGDenoiser:
    """`D(x, sigma, cond) -> uncond + scale·(cond - uncond)`, both halves in one batched call.

    cond holds "context" (B, L, D) and "uncond_context" ((B or 1), L, D: the negative prompt's encoding, or
    the empty prompt's), and optionally "context_mask" / "uncond_context_mask" (B, L) bool. Any other
    entry (future conditioning) is given to both halves alike. Both contexts must have the same length L.

    Guiding x0 is the same as guiding ε (or v): for a fixed x and σ, x0 = c_skip·x + c_out·output is affine
    in the network output with the same coefficients in both halves, so the mix passes straight through.
    """

    def __init__(self, denoiser: Callable, scale: float):
        self.denoiser = denoiser
        self.scale = scale
        self._doubled: tuple | None = None  # (the text tensors it was made from, (B, their versions), result)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict) -> torch.Tensor:
        shared = {k: v for k, v in cond.items() if k not in TEXT_KEYS}
        if self.scale == 1:  # the unconditional half would be weighted by 0
            return self.denoiser(x, sigma, {**shared, "context": cond["context"],
                                            "context_mask": cond.get("context_mask")})
        B = x.shape[0]
        both, both_mask = self._both_texts(cond, B)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(B)
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in shared.items()}
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            {**doubled, "context": both, "context_mask": both_mask})
        out_uncond, out_cond = out.chunk(2)  # (B, C, H, W) each
        return out_uncond + self.scale * (out_cond - out_uncond)

    def _both_texts(self, cond: dict, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(2B, L, D) unconditional-then-conditional context and its (2B, L) mask or None; the same tensors
        at every step of a loop whose cond does not change, so that the UNet can reuse its text projections."""
        texts = tuple(cond.get(k) for k in TEXT_KEYS)
        key = (B, *(None if t is None else t._version for t in texts))  # and the tensors themselves, by identity
        if self._doubled is not None and self._doubled[1] == key and all(
                a is b for a, b in zip(self._doubled[0], texts)):
            return self._doubled[2]
        context, uncond = cond["context"], cond["uncond_context"].expand(B, -1, -1)
        if uncond.shape != context.shape:
            raise ValueError(f"uncond_context {tuple(uncond.shape)} and context {tuple(context.shape)} must have "
                             "the same token length and width")
        mask, uncond_mask = cond.get("context_mask"), cond.get("uncond_context_mask")
        both_mask = None
        if mask is not None or uncond_mask is not None:
            full = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)  # (B, L) attend to all
            mask = full if mask is None else mask.expand(B, -1)
            uncond_mask = full if uncond_mask is None else uncond_mask.expand(B, -1)
            both_mask = torch.cat([uncond_mask, mask])  # (2B, L)
        self._doubled = (texts, key, (torch.cat([uncond, context]), both_mask))
        return self._doubled[2]
