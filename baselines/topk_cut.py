"""Exact "m-th largest magnitude" over a stream of tensors, without holding them all.

Two streaming passes. The first reads a systematic sample of about a million magnitudes (in blocks of
neighbours, so it reads a few percent of the pages) and brackets the answer between two sample order
statistics, eight standard deviations of the sample rank either side.
The second counts the magnitudes at or above the bracket's top and collects the few inside it; the
answer is then an order statistic of that small set; the counting pass is one fused loop per tensor
(negmerge.kernels.count_and_collect), so it reads each value once. Where the bracket missed (rare; it
costs time, never exactness) or the stream is small, an exact radix select answers instead
(histograms of the float bits: non-negative float32 values order as their int32 patterns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from negmerge import kernels

Stream = Callable[[], Iterable[torch.Tensor]]  # re-iterable: called once per pass
SAMPLE = 1 << 20  # magnitudes in the first pass's sample
BLOCK = 256  # ... taken as blocks of this many neighbours
Z = 8.0  # the bracket's half-width in (iid) standard deviations of the sample rank: neighbours correlate


def _magnitudes(t: torch.Tensor) -> np.ndarray:
    return np.abs(t.reshape(-1).to(torch.float32).numpy())


def mth_largest_magnitude(stream: Stream, m: int, n: int | None = None) -> float:
    """The m-th largest |value| (1-based) over all tensors the stream yields (``n``: their count)."""
    n = sum(t.numel() for t in stream()) if n is None else n
    if n <= 4 * SAMPLE:
        return _radix(stream, m)
    bracket = _bracket(stream, m, n)
    if bracket is not None:
        lo, hi = bracket
        above, inside = 0, []
        lo32, hi32 = np.float32(lo), np.float32(hi)
        for t in stream():
            flat = t.reshape(-1).to(torch.float32).numpy()
            buffer = np.empty_like(flat)  # untouched pages but for the few values it receives
            count, n_inside = kernels.count_and_collect(flat, lo32, hi32, buffer)
            above += count
            inside.append(buffer[:n_inside].copy())
        values = np.concatenate(inside)
        rank = m - above  # the answer's rank among the values inside the bracket
        if 1 <= rank <= values.size:
            return float(np.partition(values, values.size - rank)[values.size - rank])
    return _radix(stream, m)


def _bracket(stream: Stream, m: int, n: int) -> tuple[float, float] | None:
    """(lo, hi) with the answer in [lo, hi) but for a vanishing chance; None where none is useful.

    The sample is systematic in blocks of BLOCK neighbours, so the pass touches only the pages it
    samples (a strided sample of single values would fault in every page of a memory-mapped file)."""
    stride = BLOCK * max(1, n // SAMPLE)
    parts, offset = [], 0
    for t in stream():
        flat = t.reshape(-1)
        first = (-offset) % stride
        whole = max(0, (flat.numel() - first) // stride)  # blocks with a full stride after them: one 2-D view
        if whole:
            parts.append(_magnitudes(flat[first : first + whole * stride].view(whole, stride)[:, :BLOCK]))
        if first + whole * stride < flat.numel():
            parts.append(_magnitudes(flat[first + whole * stride :][:BLOCK]))
        offset += flat.numel()
    sample = np.concatenate(parts)
    s = sample.size
    q = m / n
    centre = q * s
    half = Z * math.sqrt(s * q * (1 - q)) + 2
    top, bottom = int(centre - half), int(math.ceil(centre + half))  # ranks from the largest, 0-based
    if top < 1 or bottom >= s:
        return None  # the cut lies in the sample's extremes: the radix select is as cheap
    low, high = s - 1 - bottom, s - 1 - top  # the same order statistics, counted from the smallest
    ordered = np.partition(sample, [low, high])
    return float(ordered[low]), float(ordered[high])


def _radix(stream: Stream, m: int) -> float:
    """Exact: a 64K-bin histogram of the top 16 bits, then of the low 16 inside the answer's bucket."""
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for t in stream():
        high += torch.bincount(_bits(t) >> 16, minlength=1 << 16)
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


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).abs().reshape(-1).view(torch.int32)
