"""Literal numpy transcriptions of docs/metrics.md#merges, written for clarity, not speed: the oracle the
streaming implementations are checked against. Inputs are flattened whole vectors (K x N)."""

from __future__ import annotations

import math

import numpy as np


def negmerge_ref(stack: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    k, n = stack.shape
    need = max(1, math.ceil(round(threshold * k, 9)))
    out = np.zeros(n)
    for j in range(n):
        col = stack[:, j]
        pos, neg = int((col > 0).sum()), int((col < 0).sum())
        if need == k:
            if pos == k or neg == k:
                out[j] = col.mean()
            continue
        if pos >= need and pos > neg:
            out[j] = col[col > 0].mean()
        elif neg >= need and neg > pos:
            out[j] = col[col < 0].mean()
    return out


def average_ref(stack: np.ndarray) -> np.ndarray:
    return stack.mean(axis=0)


def magmax_ref(stack: np.ndarray) -> np.ndarray:
    k, n = stack.shape
    out = np.zeros(n)
    for j in range(n):
        best = 0
        for i in range(k):
            if abs(stack[i, j]) >= abs(stack[best, j]):
                best = i
        out[j] = stack[best, j]
    return out


def ties_ref(stack: np.ndarray, k: float = 0.2) -> np.ndarray:
    cands, n = stack.shape
    keep = max(1, math.ceil(round(k * n, 9)))
    trimmed = np.zeros_like(stack)
    for i in range(cands):
        mags = np.abs(stack[i])
        cut = np.sort(mags)[::-1][keep - 1] if keep < n else 0.0
        mask = (mags >= cut) & (stack[i] != 0)
        trimmed[i] = np.where(mask, stack[i], 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    majority = np.sign(sign.sum())
    sign = np.where(sign == 0, majority, sign)
    out = np.zeros(n)
    for j in range(n):
        sel = [trimmed[i, j] for i in range(cands) if np.sign(trimmed[i, j]) == sign[j] and trimmed[i, j] != 0]
        out[j] = sum(sel) / max(len(sel), 1)
    return out


_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def dare_keep_mask(seed: int, candidate: int, name: str, numel: int, p: float) -> np.ndarray:
    """DARE's survivors as docs/metrics.md#merges words it: BLAKE2b key, SplitMix64 of key + (e+1)*golden,
    element kept iff its top 53 bits as a fraction of 2**53 are >= p. Plain Python integers (no wrap-around
    tricks) for the key, numpy uint64 (which wraps mod 2**64) for the vector of counters."""
    import hashlib

    key = int.from_bytes(
        hashlib.blake2b(f"dare\0{seed}\0{candidate}\0{name}".encode(), digest_size=8).digest(), "little"
    )
    e = np.arange(numel, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (e + np.uint64(1)) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    fraction = (z >> np.uint64(11)).astype(np.float64) / 2.0**53
    return fraction >= p


def dare_dropped(pool: list[dict], p: float, seed: int = 0) -> np.ndarray:
    """K x N: each candidate's float32 values, dropped to 0 off the mask and divided by float32(1 - p) on it."""
    rows = []
    for i, tv in enumerate(pool):
        parts = []
        for name, tensor in tv.items():
            x = tensor.float().reshape(-1).numpy()
            keep = dare_keep_mask(seed, i, name, x.size, p)
            with np.errstate(over="ignore", invalid="ignore"):
                parts.append(np.where(keep, x / np.float32(1.0 - p), np.float32(0.0)).astype(np.float64))
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def iso_c_ref(mean: np.ndarray) -> np.ndarray:
    """One 2-D tensor of Iso-C: U diag(mean(S)) V^T of the mean task vector, float64 numpy SVD."""
    u, s, vh = np.linalg.svd(mean.astype(np.float64), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh
