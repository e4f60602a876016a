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

import torch

from negmerge import kernels
from negmerge.errors import MergeInputError
from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise


def required_votes(threshold: float, n: int) -> int:
    """ceil(threshold * n), immune to float noise such as 0.7 * 10 = 7.000000000000001."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < threshold <= 1.0):
        raise MergeInputError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return max(1, math.ceil(round(threshold * n, 9)))


def _unanimous(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    """Released rule: one fused pass (negmerge.kernels.unanimous), written into the output."""
    if len(tensors) == 1:
        only = tensors[0]
        where.provide_total(only)
        return torch.where(only != 0, only, torch.zeros(()))
    where.check(kernels.unanimous(where.addresses(), where.out.numel(), where.out.numpy()))
    return where.out


def consensus_reduce(need: int, n_candidates: int):
    if need == n_candidates:
        return _unanimous

    def reduce(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
        """Votes and per-sign sums in one fused pass (negmerge.kernels.consensus)."""
        where.check(kernels.consensus(where.addresses(), where.out.numel(), need, where.out.numpy()))
        return where.out

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
    return merge_elementwise(task_vectors, consensus_reduce(need, n))


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
