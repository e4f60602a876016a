"""MagMax (Marczak et al. 2024): per element, the candidate value with the largest magnitude."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from negmerge import kernels
from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise


def _max_magnitude(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    """Fold over the candidates in order; ">=" so a tie goes to the later one (docs/metrics.md#merges).

    One fused pass (negmerge.kernels.max_magnitude) that copies the winner's bits, signed zeros
    included, into the output."""
    where.check(kernels.max_magnitude(where.addresses(), where.out.numel(), where.out.numpy()))
    return where.out


def magmax_merge(task_vectors: Sequence[SourceLike]) -> dict[str, torch.Tensor]:
    """Max-magnitude selection, streamed key by key."""
    return merge_elementwise(task_vectors, _max_magnitude)
