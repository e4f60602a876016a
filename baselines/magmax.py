"""MagMax (Marczak et al. 2024): per element, the candidate value with the largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise


def _max_magnitude(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    """Fold over the candidates in order; ">=" so a tie goes to the later one (docs/metrics.md#merges).

    ``take`` is 1.0 where |t| >= |best| and 0.0 elsewhere (the comparison in numpy: this torch's
    comparisons and torch.where are several times slower), and lerp with a weight of exactly 0 or 1
    returns ``best`` or ``t`` bit for bit, signed zeros included.
    """
    best = tensors[0]
    best_abs = np.abs(best.numpy())
    for t in tensors[1:]:
        mag = np.abs(t.numpy())
        take = torch.from_numpy(np.greater_equal(mag, best_abs).astype(np.float32))
        best = torch.lerp(best, t, take)
        np.maximum(best_abs, mag, out=best_abs)
    return best.clone() if best is tensors[0] else best


def magmax_merge(task_vectors: Sequence[SourceLike]) -> dict[str, torch.Tensor]:
    """Max-magnitude selection, streamed key by key."""
    return merge_elementwise(task_vectors, _max_magnitude)
