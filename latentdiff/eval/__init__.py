"""Evaluation: CLIP score and retrieval (FID, the shapes judge and benchmarks live beside them)."""
from .clip_score import clip_score
from .retrieval import distinct_caption_batches, heldout_retrieval, retrieval_accuracy

__all__ = ["clip_score", "distinct_caption_batches", "heldout_retrieval", "retrieval_accuracy"]
