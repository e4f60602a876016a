"""Uniform merge (model-soup style): the plain mean of the candidates' task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from negmerge import kernels
from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise


def mean_reduce(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    """((t0 + t1) + ...) / K in one fused pass, written into the output."""
    where.check(kernels.mean(where.addresses(), where.out.numel(), where.out.numpy()))
    return where.out


def average_merge(task_vectors: Sequence[SourceLike]) -> dict[str, torch.Tensor]:
    """``mean_i tau_i``, streamed key by key."""
    return merge_elementwise(task_vectors, mean_reduce)
