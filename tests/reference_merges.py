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
