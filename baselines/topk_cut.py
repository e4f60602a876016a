"""Exact "m-th largest magnitude" over a stream of tensors, without holding them all.

Non-negative float32 values order the same as their int32 bit patterns, so a two-level radix select
(histogram of the top 16 bits, then of the low 16 bits inside the one bucket that holds the answer)
finds the exact cut in two streaming passes with 64K-bin histograms; no model-sized buffer, no sort.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Stream = Callable[[], Iterable[torch.Tensor]]  # re-iterable: called once per pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).abs().reshape(-1).view(torch.int32)


def mth_largest_magnitude(stream: Stream, m: int) -> float:
    """The m-th largest |value| (1-based) over all tensors the stream yields."""
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for t in stream():
        high += torch.bincount(_bits(t) >> 16, minlength=1 << 16)
    # walk buckets from the top until m values are covered
    above = torch.flip(high, [0]).cumsum(0)  # above[j] = count in buckets >= 65535 - j
    j = int(torch.searchsorted(above, torch.tensor(m)))
    bucket = (1 << 16) - 1 - j
    before = int(above[j - 1]) if j > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for t in stream():
        b = _bits(t)
        low += torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    rank = m - before
    low_above = torch.flip(low, [0]).cumsum(0)
    i = int(torch.searchsorted(low_above, torch.tensor(rank)))
    pattern = (bucket << 16) | ((1 << 16) - 1 - i)
    return float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
