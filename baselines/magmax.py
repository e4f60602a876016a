"""MagMax (Marczak et al. 2024): per element, the candidate value with the largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise


def _max_magnitude(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    best = tensors[0].clone()
    best_abs = best.abs()
    for t in tensors[1:]:
        mag = t.abs()
        take = mag >= best_abs  # ">=": on a tie the later candidate wins (DESIGN.md §3)
        best = torch.where(take, t, best)
        best_abs = torch.where(take, mag, best_abs)
    return best


def magmax_merge(task_vectors: Sequence[SourceLike]) -> dict[str, torch.Tensor]:
    """Max-magnitude selection, streamed key by key."""
    return merge_elementwise(task_vectors, _max_magnitude)
