"""The one engine every elementwise merge runs on: key by key, chunk by chunk.

A merge is a ``reduce(chunks, where) -> chunk`` over the K candidates' float32 values for one slice
of one tensor. The engine validates layout and values, converts dtypes and assembles the result, so a
new merge rule is only its arithmetic. Working on cache-sized chunks across all K candidates keeps
the accumulators in cache: the merge reads each input byte about once, which is what makes streaming
from memory-mapped files nearly as fast as reading them. Peak memory: the output (one model) plus
K chunks.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from negmerge.errors import MergeInputError
from negmerge.sources import SourceLike, TensorSource, as_source

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per candidate: K chunks plus accumulators fit in L2/L3


class Where:
    """Which slice of which tensor a chunk is, and the chunks' elementwise sum.

    The sum doubles as the NaN/Inf check (any NaN or Inf input makes it non-finite there), so every
    chunk is checked exactly once: a reducer reads ``total`` (computed and checked on first use),
    hands over a sum it made itself with ``provide_total``, or, as a fused kernel
    (negmerge.kernels), reports with ``check`` whether every sum it made was finite, which saves a
    pass over the K chunks. The engine checks a chunk nobody checked.
    """

    __slots__ = ("key", "start", "out", "_chunks", "_sources", "_total", "_checked")

    def __init__(
        self,
        key: str,
        start: int,
        chunks: list[torch.Tensor],
        sources: Sequence[TensorSource],
        out: torch.Tensor | None = None,
    ) -> None:
        self.key = key
        self.start = start
        # float32 destination of this chunk (the output's own memory where it is float32): a reducer
        # that writes its result here and returns it saves the engine a copy
        self.out = torch.empty(chunks[0].numel(), dtype=torch.float32) if out is None else out
        self._chunks = chunks
        self._sources = sources
        self._total: torch.Tensor | None = None
        self._checked = False

    @property
    def total(self) -> torch.Tensor:
        if self._total is None:
            self._sum_and_check()
        return self._total

    def _sum_and_check(self) -> bool:
        total = self._chunks[0].clone()
        for c in self._chunks[1:]:
            total += c
        return self.provide_total(total)

    def provide_total(self, total: torch.Tensor) -> bool:
        """Accept a reducer's own sum of the chunks, after checking the inputs for NaN/Inf.

        Returns whether the sum is finite everywhere (False only where finite inputs overflowed).
        """
        finite = _check_finite(total, self._chunks, self._sources, self.key)
        self._total = total
        self._checked = True
        return finite

    def check(self, all_finite: bool) -> bool:
        """Accept a fused kernel's verdict that every value it summed was finite (negmerge.kernels);
        where one was not, the exact check runs: it names a candidate holding NaN/Inf, or returns
        False where finite inputs overflowed."""
        if all_finite:
            self._checked = True
            return True
        return self._sum_and_check()

    def addresses(self) -> np.ndarray:
        """The chunks' data addresses, for negmerge.kernels (which read raw memory, hence the check)."""
        for c in self._chunks:
            if c.device.type != "cpu" or c.dtype != torch.float32 or not c.is_contiguous():
                raise MergeInputError(
                    f"key {self.key!r}: kernels need contiguous float32 CPU chunks, got {c.dtype} on {c.device}"
                    f"{'' if c.is_contiguous() else ', strided'}"
                )
        return np.fromiter((c.data_ptr() for c in self._chunks), dtype=np.int64, count=len(self._chunks))

    @property
    def checked(self) -> bool:
        return self._checked


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


def _check_finite(total: torch.Tensor, chunks: list[torch.Tensor], sources: Sequence[TensorSource], key: str) -> bool:
    """Raise naming the first candidate with a NaN or Inf in this chunk; else say whether the sum is finite.

    One reduction of the sum decides the common case (a NaN or Inf anywhere makes the sum's sum
    non-finite; torch.isfinite is far slower). Only then is each candidate tested exactly: a sum that
    merely overflowed from finite values is no error, and the reducer learns of it (returns False).
    """
    if math.isfinite(total.sum().item()) or torch.isfinite(total).all():
        return True
    for i, c in enumerate(chunks):
        if not torch.isfinite(c).all():
            raise MergeInputError(f"candidate {i} ({sources[i].name}): key {key!r} contains NaN or Inf")
    return False


def merge_threads() -> int:
    """Threads a merge spreads its chunks over: ``$NEGMERGE_MERGE_THREADS``, else torch's thread count."""
    value = os.environ.get("NEGMERGE_MERGE_THREADS", "")
    if value.strip():
        try:
            return max(1, int(value))
        except ValueError:
            raise MergeInputError(f"NEGMERGE_MERGE_THREADS must be a whole number, got {value!r}") from None
    return torch.get_num_threads()


@contextmanager
def one_thread_per_op() -> Iterator[None]:
    """Chunks (or Iso-C's SVDs) run side by side, each op on one core (no oversubscription by intra-op
    threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge_elementwise(candidates: Sequence[SourceLike], reduce: Reduce) -> dict[str, torch.Tensor]:
    """Run ``reduce`` over every chunk of every floating tensor; output dtype = candidate 0's dtype.

    Chunks are independent (each writes its own slice of the output), so ``merge_threads()`` threads
    take them in turn (torch releases the GIL inside ops): every chunk is computed by the same ops on
    the same values whichever thread runs it, so the result does not depend on the thread count. A
    window of a few chunks per thread is in flight, so tensors are opened key by key as before.
    """
    sources = open_sources(candidates)
    out: dict[str, torch.Tensor] = {}

    def tasks() -> Iterator[tuple[str, int, list[torch.Tensor], torch.Tensor]]:
        for key in floating_keys_of(sources[0]):
            flats = [_flat(src, key) for src in sources]  # files: zero-copy views of their pages
            out[key] = torch.empty(sources[0].shape(key), dtype=flats[0].dtype)
            flat_out = out[key].reshape(-1)
            for start in range(0, flat_out.numel(), CHUNK_ELEMENTS):
                yield key, start, flats, flat_out

    def run(task: tuple[str, int, list[torch.Tensor], torch.Tensor]) -> None:
        key, start, flats, flat_out = task
        chunks = [_float32(f[start : start + CHUNK_ELEMENTS]) for f in flats]
        part = flat_out[start : start + chunks[0].numel()]
        where = Where(key, start, chunks, sources, part if part.dtype == torch.float32 else None)
        merged = reduce(chunks, where)
        if not where.checked:
            where.total  # noqa: B018 (evaluating it runs the NaN/Inf check)
        if merged.data_ptr() != part.data_ptr():
            part.copy_(merged)

    threads = merge_threads()
    if threads == 1:
        for task in tasks():
            run(task)
        return out
    with one_thread_per_op(), ThreadPoolExecutor(threads) as pool:
        in_flight: deque[Future] = deque()
        try:
            for task in tasks():
                in_flight.append(pool.submit(run, task))
                if len(in_flight) >= 4 * threads:
                    in_flight.popleft().result()  # errors surface in chunk order, as without threads
            while in_flight:
                in_flight.popleft().result()
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
    return out


def _flat(source: TensorSource, key: str):
    """A flat view of one tensor; a source that forms its values lazily (``flat``, e.g.
    negmerge.sources.DifferenceSource) hands over an object whose slices are float32 chunks."""
    flat = getattr(source, "flat", None)
    return flat(key) if flat is not None else source.get(key).reshape(-1)


def _float32(part: torch.Tensor) -> torch.Tensor:
    """A float32 CPU chunk outside autograd (kernels and numpy work on host memory): a view where the
    input already is one, else a copy (tensors on an accelerator are merged from host copies)."""
    return part.detach().to(device="cpu", dtype=torch.float32)
