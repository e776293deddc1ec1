"""Evaluation: CLIP score and retrieval (FID, the shapes judge and benchmarks live beside them).

The names load on first use (PEP 562), so that `latentdiff eval --help` and `bench --help` need not wait
for torch. `clip_score` is the function, also after its module eval/clip_score.py has been imported.
"""
from __future__ import annotations

from ..lazy import lazy_attributes

_LAZY = {"clip_score": "clip_score", "distinct_caption_batches": "retrieval", "heldout_retrieval": "retrieval",
         "retrieval_accuracy": "retrieval"}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, globals(), _LAZY)
