"""NegMerge's sign-consensus merge (docs/metrics.md#merges).

Released rule (threshold 1.0): an element is kept iff every candidate is strictly positive there, or
every one strictly negative (an exact zero in any candidate drops it); its value is the mean over all
candidates; everything else is 0.

Generalised threshold t in (0, 1]: with n candidates, an element is kept for a sign iff at least
ceil(t*n) candidates are strictly of that sign. When t <= 0.5 both signs can qualify: the sign with
more votes wins and an exact tie is dropped. The kept value is the mean over the candidates that
voted for the kept sign, so a kept element always carries the consensus sign (for t = 1 this is the
mean over all candidates, the released rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from negmerge.errors import MergeInputError
from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise


def required_votes(threshold: float, n: int) -> int:
    """ceil(threshold * n), immune to float noise such as 0.7 * 10 = 7.000000000000001."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < threshold <= 1.0):
        raise MergeInputError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return max(1, math.ceil(round(threshold * n, 9)))


def _unanimous(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    """Released rule, fast path: all > 0 iff min > 0, all < 0 iff max < 0.

    Sum, min and max run in one loop over the candidates, so each chunk is read from memory once and
    twice more from cache. Comparisons, min and max run in numpy (vectorised; this torch's
    comparisons, ``sign`` and ``where`` are several times slower than its float arithmetic), on the
    same memory; the keep mask enters as exact 0.0/1.0 factors.
    """
    if len(tensors) == 1:
        only = tensors[0]
        where.provide_total(only)
        return torch.where(only != 0, only, torch.zeros(()))
    first, second = tensors[0], tensors[1]
    total = torch.add(first, second)
    low, high = np.minimum(first.numpy(), second.numpy()), np.maximum(first.numpy(), second.numpy())
    for t in tensors[2:]:
        total += t
        np.minimum(low, t.numpy(), out=low)
        np.maximum(high, t.numpy(), out=high)
    finite = where.provide_total(total)
    mean = total / len(tensors)
    keep = np.greater(low, 0)
    keep |= np.less(high, 0)
    if not finite:  # finite inputs overflowed to inf: inf * 0 would be NaN, so select instead
        return torch.where(torch.from_numpy(keep), mean, torch.zeros(()))
    return mean.mul_(torch.from_numpy(keep.astype(np.float32))).add_(0.0)  # + 0.0: -0.0 of dropped -> +0.0


def _consensus_reduce(need: int, n_candidates: int):
    if need == n_candidates:
        return _unanimous

    def reduce(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
        n = len(tensors)
        count_dtype = torch.int16 if n < 2**15 else torch.int32
        pos_sum = torch.zeros_like(tensors[0])
        neg_sum = torch.zeros_like(tensors[0])
        pos_cnt = torch.zeros(tensors[0].shape, dtype=count_dtype)
        neg_cnt = torch.zeros(tensors[0].shape, dtype=count_dtype)
        for t in tensors:
            pos = t > 0
            neg = t < 0
            pos_cnt += pos
            neg_cnt += neg
            pos_sum += t.clamp(min=0)
            neg_sum += t.clamp(max=0)
        pos_ok = (pos_cnt >= need) & (pos_cnt > neg_cnt)
        neg_ok = (neg_cnt >= need) & (neg_cnt > pos_cnt)
        pos_mean = pos_sum / pos_cnt.clamp(min=1)
        neg_mean = neg_sum / neg_cnt.clamp(min=1)
        return torch.where(pos_ok, pos_mean, torch.where(neg_ok, neg_mean, torch.zeros(())))

    return reduce


def sign_consensus_merge(task_vectors: Sequence[SourceLike], threshold: float = 1.0) -> dict[str, torch.Tensor]:
    """Merge K task vectors keeping only sign-consensus elements; negate the result to unlearn.

    ``task_vectors`` are state dicts, safetensors paths or TensorSources, mixed freely: files are read
    one tensor at a time, so memory stays near one model whatever K is.
    """
    if isinstance(task_vectors, Sequence) and not isinstance(task_vectors, (str, bytes)):
        n = len(task_vectors)
    else:
        raise MergeInputError("task_vectors must be a list of state dicts or safetensors paths")
    need = required_votes(threshold, max(n, 1))
    return merge_elementwise(task_vectors, _consensus_reduce(need, n))


def consensus_rate(merged: Mapping[str, torch.Tensor]) -> float:
    """Fraction of elements a merge kept (non-zero), over all floating elements."""
    kept = 0
    total = 0
    for t in merged.values():
        if torch.is_floating_point(t):
            kept += int(torch.count_nonzero(t))
            total += t.numel()
    if total == 0:
        raise MergeInputError("consensus_rate: the merged vector has no floating-point elements")
    return kept / total
