"""TIES-merging (Yadav et al. 2023) as docs/metrics.md#merges defines it.

1. Trim: each candidate keeps its top-k fraction of entries by |value|, ranked over the whole vector
   (``scope="global"``, the default) or within each tensor (``scope="tensor"``). The cut is the
   ceil(k*N)-th largest magnitude; entries tied with it are kept, exact zeros never are.
2. Elect: per element, sign of the sum of the trimmed values. Where that sum is exactly 0 the
   majority sign (sign of the sum of all elected signs over the whole vector) is used.
3. Disjoint mean: mean of the trimmed entries whose sign equals the elected sign (at least 1).

Each cut takes one extra streaming pass (baselines/topk_cut.py: a sampled bracket, then one counting
pass); zero-sum elements are fixed up at the end once the majority sign is known, so the merge itself
still streams chunk by chunk.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from baselines.topk_cut import mth_largest_magnitude
from negmerge import kernels
from negmerge.errors import MergeInputError
from negmerge.sources import SourceLike, TensorSource
from negmerge.streaming import Where, floating_keys_of, merge_elementwise, merge_threads, open_sources


def _below(cut: float) -> float:
    """The largest float32 below ``cut`` (0 for a cut of 0): |t| > below(cut) iff |t| >= cut."""
    if cut <= 0:
        return 0.0
    return float(np.nextafter(np.float32(cut), np.float32(0)))


def _keep_count(k: float, n: int) -> int:
    return max(1, math.ceil(round(k * n, 9)))


def _cut(source: TensorSource, keys: list[str], k: float) -> float:
    n = sum(math.prod(source.shape(key)) for key in keys)
    m = _keep_count(k, n)
    if m >= n:
        return 0.0
    return mth_largest_magnitude(lambda: (source.get(key) for key in keys), m, n)


class TiesReduce:
    """Trim, elect, disjoint mean, chunk by chunk, in one fused pass (negmerge.kernels.ties): the
    same values as the literal definition, bit for bit (tests/test_merge_digests.py).

    The trim is hardshrink by the largest float below the cut: it keeps t where |t| > below(cut),
    i.e. |t| >= cut, and gives +0.0 elsewhere (exact zeros are never kept).
    """

    def __init__(self, cuts: list[dict[str, float]]) -> None:
        self.below = {key: np.array([_below(c[key]) for c in cuts], dtype=np.float32) for key in cuts[0]}
        self.elected_sign_total = 0
        self.lock = threading.Lock()
        self.deferred: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
        n = where.out.numel()
        index, pos_mean, neg_mean = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.float32)
        finite, up, down, undecided = kernels.ties(
            where.addresses(), n, self.below[where.key], where.out.numpy(), index, pos_mean, neg_mean
        )
        where.check(finite)  # a NaN/Inf input makes its mass non-finite; finite overflow is no error
        with self.lock:  # chunks may run on several threads (negmerge.streaming)
            self.elected_sign_total += up - down
            if undecided:
                self.deferred.append(
                    (
                        where.key,
                        torch.from_numpy(index[:undecided] + where.start),
                        torch.from_numpy(pos_mean[:undecided].copy()),
                        torch.from_numpy(neg_mean[:undecided].copy()),
                    )
                )
        return where.out

    def fix_zero_sums(self, out: dict[str, torch.Tensor]) -> None:
        majority = (self.elected_sign_total > 0) - (self.elected_sign_total < 0)
        if majority == 0:
            return  # no majority either: those elements stay 0
        for key, index, pos_vals, neg_vals in self.deferred:
            out[key].view(-1)[index] = (pos_vals if majority > 0 else neg_vals).to(out[key].dtype)


def check_ties_params(k: float, scope: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0.0 < k <= 1.0):
        raise MergeInputError(f"k must be a fraction in (0, 1], got {k!r}")
    if scope not in ("global", "tensor"):
        raise MergeInputError(f"scope must be 'global' or 'tensor', got {scope!r}")


def ties_reducer(sources: Sequence[TensorSource], k: float = 0.2, scope: str = "global") -> TiesReduce:
    """Validate ``k`` and ``scope``, take each candidate's cut over ``sources`` (one streaming pass) and
    return the chunk reducer; after the merge pass, ``fix_zero_sums`` finishes the result. DARE
    (baselines/dare.py) takes the cuts over its dropped candidates this way."""
    check_ties_params(k, scope)
    keys = floating_keys_of(sources[0])
    if not keys:
        raise MergeInputError("task vectors have no floating-point tensors to merge")
    with ThreadPoolExecutor(merge_threads()) as pool:  # one candidate's cut per thread (numpy frees the GIL)
        if scope == "global":
            cuts = [dict.fromkeys(keys, cut) for cut in pool.map(lambda src: _cut(src, keys, k), sources)]
        else:
            cuts = list(pool.map(lambda src: {key: _cut(src, [key], k) for key in keys}, sources))
    return TiesReduce(cuts)


def ties_merge(task_vectors: Sequence[SourceLike], k: float = 0.2, scope: str = "global") -> dict[str, torch.Tensor]:
    """Trim, elect sign, disjoint mean; ``k`` is the fraction of entries each candidate keeps."""
    check_ties_params(k, scope)  # before the inputs are opened
    sources = open_sources(task_vectors)
    reduce = ties_reducer(sources, k, scope)
    out = merge_elementwise(sources, reduce)
    reduce.fix_zero_sums(out)
    return out
