"""Embedding in batches and the cosine similarities the metrics report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")


def embed(features: Callable[[list[T]], torch.Tensor], items: Sequence[T], batch_size: int) -> torch.Tensor:
    """``features`` run on consecutive slices of at most ``batch_size`` items: ``[len(items), D]`` float32 embeddings."""
    parts = [features(list(items[start : start + batch_size])).float() for start in range(0, len(items), batch_size)]
    return torch.cat(parts)


def cosine(embeddings: torch.Tensor, left: Sequence[int], right: Sequence[int]) -> torch.Tensor:
    """Cosine similarity of rows ``left[k]`` and ``right[k]`` of ``embeddings``, for every ``k``, clamped to [-1, 1]."""
    rows = torch.as_tensor(left, device=embeddings.device)
    others = torch.as_tensor(right, device=embeddings.device)
    return F.cosine_similarity(embeddings[rows], embeddings[others], dim=-1).clamp(-1.0, 1.0)


def mean_cosine_to_references(embeddings: torch.Tensor, images: Sequence[int], references: Sequence[Sequence[int]]) -> list[float]:
    """For every generated image ``i``: the mean, over its references, of the cosine between its embedding and theirs.

    :param embeddings: ``[P, D]``, one row per distinct image.
    :param images: ``images[i]`` is the row of generated image ``i``.
    :param references: ``references[i]`` are the rows of its references (at least one).
    """
    counts = [len(group) for group in references]
    left = [row for row, count in zip(images, counts) for _ in range(count)]
    right = [row for group in references for row in group]
    similarities = cosine(embeddings, left, right)
    sample = torch.repeat_interleave(torch.arange(len(images), device=embeddings.device), torch.as_tensor(counts, device=embeddings.device))
    totals = torch.zeros(len(images), dtype=similarities.dtype, device=embeddings.device).index_add_(0, sample, similarities)
    return (totals / torch.as_tensor(counts, dtype=similarities.dtype, device=embeddings.device)).clamp(-1.0, 1.0).tolist()
