"""The one engine every elementwise merge runs on: key by key, chunk by chunk.

A merge is a ``reduce(chunks, where) -> chunk`` over the K candidates' float32 values for one slice
of one tensor. The engine validates layout and values, converts dtypes and assembles the result, so a
new merge rule is only its arithmetic. Working on cache-sized chunks across all K candidates keeps
the accumulators in cache: the merge reads each input byte about once, which is what makes streaming
from memory-mapped files nearly as fast as reading them. Peak memory: the output (one model) plus
K chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from negmerge.errors import MergeInputError
from negmerge.sources import SourceLike, TensorSource, as_source

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per candidate: K chunks plus accumulators fit in L2/L3


@dataclass(frozen=True)
class Where:
    """Which slice of which tensor a chunk is, plus the chunks' elementwise sum (already computed
    for validation; reducers that need it should not recompute it)."""

    key: str
    start: int
    total: torch.Tensor


Reduce = Callable[[list[torch.Tensor], Where], torch.Tensor]


def open_sources(candidates: Sequence[SourceLike]) -> list[TensorSource]:
    """Wrap candidates and check they share keys and shapes, naming the first mismatch."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise MergeInputError("task_vectors must be a list of state dicts or safetensors paths")
    if len(candidates) == 0:
        raise MergeInputError("task_vectors is empty: a merge needs at least one candidate")
    sources = [as_source(c, i) for i, c in enumerate(candidates)]
    ref = sources[0]
    ref_keys = ref.keys()
    ref_set = set(ref_keys)
    for i, src in enumerate(sources[1:], start=1):
        keys = src.keys()
        key_set = set(keys)
        missing = [k for k in ref_keys if k not in key_set]
        if missing:
            raise MergeInputError(f"candidate {i} ({src.name}): key {missing[0]!r} is missing")
        extra = [k for k in keys if k not in ref_set]
        if extra:
            raise MergeInputError(f"candidate {i} ({src.name}): unexpected key {extra[0]!r}")
        for k in ref_keys:
            if src.shape(k) != ref.shape(k):
                raise MergeInputError(
                    f"candidate {i} ({src.name}): key {k!r} has shape {src.shape(k)}, candidate 0 has {ref.shape(k)}"
                )
    return sources


def floating_keys_of(source: TensorSource) -> list[str]:
    return [k for k in source.keys() if source.is_floating(k)]


def iter_float32_chunks(tensor: torch.Tensor, chunk: int | None = None):
    """(start, float32 chunk) over a tensor's flattened values; converts one chunk at a time."""
    chunk = chunk or CHUNK_ELEMENTS
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        yield start, part if part.dtype == torch.float32 else part.to(torch.float32)


def _sum_checked(chunks: list[torch.Tensor], sources: Sequence[TensorSource], key: str) -> torch.Tensor:
    """Elementwise sum of the K chunks, which doubles as the NaN/Inf check: any NaN or Inf input makes
    the sum non-finite there (one add per candidate, versus several passes for torch.isfinite). Only
    then is each candidate tested exactly, to name the culprit; a sum that merely overflowed from finite
    values is no error."""
    total = chunks[0].clone()
    for c in chunks[1:]:
        total += c
    if not torch.isfinite(total).all():
        for i, c in enumerate(chunks):
            if not torch.isfinite(c).all():
                raise MergeInputError(f"candidate {i} ({sources[i].name}): key {key!r} contains NaN or Inf")
    return total


def merge_elementwise(candidates: Sequence[SourceLike], reduce: Reduce) -> dict[str, torch.Tensor]:
    """Run ``reduce`` over every chunk of every floating tensor; output dtype = candidate 0's dtype."""
    sources = open_sources(candidates)
    out: dict[str, torch.Tensor] = {}
    for key in floating_keys_of(sources[0]):
        tensors = [src.get(key) for src in sources]
        result = torch.empty(tensors[0].shape, dtype=tensors[0].dtype)
        flat_out = result.reshape(-1)
        streams = [iter_float32_chunks(t) for t in tensors]
        for parts in zip(*streams):
            start = parts[0][0]
            chunks = [c for _, c in parts]
            total = _sum_checked(chunks, sources, key)
            merged = reduce(chunks, Where(key, start, total))
            flat_out[start : start + merged.numel()] = merged
        del tensors, streams
        out[key] = result
    return out
