"""TIES-merging (Yadav et al. 2023) as docs/metrics.md#merges defines it.

1. Trim: each candidate keeps its top-k fraction of entries by |value|, ranked over the whole vector
   (``scope="global"``, the default) or within each tensor (``scope="tensor"``). The cut is the
   ceil(k*N)-th largest magnitude; entries tied with it are kept, exact zeros never are.
2. Elect: per element, sign of the sum of the trimmed values. Where that sum is exactly 0 the
   majority sign (sign of the sum of all elected signs over the whole vector) is used.
3. Disjoint mean: mean of the trimmed entries whose sign equals the elected sign (at least 1).

The cuts take two extra streaming passes (exact radix select); zero-sum elements are fixed up at the
end once the majority sign is known, so the merge itself still streams chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from baselines.topk_cut import mth_largest_magnitude
from negmerge.errors import MergeInputError
from negmerge.sources import SourceLike, TensorSource
from negmerge.streaming import Where, floating_keys_of, merge_elementwise, open_sources


def _keep_count(k: float, n: int) -> int:
    return max(1, math.ceil(round(k * n, 9)))


def _cut(source: TensorSource, keys: list[str], k: float) -> float:
    n = sum(math.prod(source.shape(key)) for key in keys)
    m = _keep_count(k, n)
    if m >= n:
        return 0.0
    return mth_largest_magnitude(lambda: (source.get(key) for key in keys), m)


class _TiesReduce:
    def __init__(self, cuts: list[dict[str, float]]) -> None:
        self.cuts = cuts
        self.elected_sign_total = 0
        self.deferred: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
        zero = torch.zeros(())
        pos_sum = torch.zeros_like(tensors[0])
        neg_sum = torch.zeros_like(tensors[0])
        pos_cnt = torch.zeros_like(tensors[0])
        neg_cnt = torch.zeros_like(tensors[0])
        for i, t in enumerate(tensors):
            kept = (t.abs() >= self.cuts[i][where.key]) & (t != 0)
            trimmed = torch.where(kept, t, zero)
            pos_sum += trimmed.clamp(min=0)
            neg_sum += trimmed.clamp(max=0)
            pos_cnt += trimmed > 0
            neg_cnt += trimmed < 0
        mass = pos_sum + neg_sum
        pos_mean = pos_sum / pos_cnt.clamp(min=1)
        neg_mean = neg_sum / neg_cnt.clamp(min=1)
        self.elected_sign_total += int((mass > 0).sum()) - int((mass < 0).sum())
        undecided = ((mass == 0) & ((pos_cnt > 0) | (neg_cnt > 0))).nonzero(as_tuple=True)[0]
        if undecided.numel():
            self.deferred.append((where.key, undecided + where.start, pos_mean[undecided], neg_mean[undecided]))
        return torch.where(mass > 0, pos_mean, torch.where(mass < 0, neg_mean, zero))

    def fix_zero_sums(self, out: dict[str, torch.Tensor]) -> None:
        majority = (self.elected_sign_total > 0) - (self.elected_sign_total < 0)
        if majority == 0:
            return  # no majority either: those elements stay 0
        for key, index, pos_vals, neg_vals in self.deferred:
            out[key].view(-1)[index] = (pos_vals if majority > 0 else neg_vals).to(out[key].dtype)


def ties_merge(task_vectors: Sequence[SourceLike], k: float = 0.2, scope: str = "global") -> dict[str, torch.Tensor]:
    """Trim, elect sign, disjoint mean; ``k`` is the fraction of entries each candidate keeps."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0.0 < k <= 1.0):
        raise MergeInputError(f"k must be a fraction in (0, 1], got {k!r}")
    if scope not in ("global", "tensor"):
        raise MergeInputError(f"scope must be 'global' or 'tensor', got {scope!r}")
    sources = open_sources(task_vectors)
    keys = floating_keys_of(sources[0])
    if not keys:
        raise MergeInputError("task vectors have no floating-point tensors to merge")
    if scope == "global":
        cuts = [dict.fromkeys(keys, _cut(src, keys, k)) for src in sources]
    else:
        cuts = [{key: _cut(src, [key], k) for key in keys} for src in sources]
    reduce = _TiesReduce(cuts)
    out = merge_elementwise(sources, reduce)
    reduce.fix_zero_sums(out)
    return out
