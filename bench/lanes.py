"""Evaluation lanes: several lambda points of a sweep evaluated at once, one per CPU core.

A sweep's points are independent forward passes, each a long chain of small ops that one core runs
best (intra-op threads scale poorly on them). A lane is a thread that owns its own copy of the encoder;
``jobs`` lanes evaluate ``jobs`` points concurrently (torch releases the GIL inside every op). Each
point is computed by exactly the ops, on exactly the batches, that one lane alone would use, so the
numbers do not depend on the lane count: it is a speed setting, never part of a cache key.
"""

from __future__ import annotations

import os
import queue
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from bench.data.registry import ImageSplit
from bench.evaluate import Evaluator

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """Cores this process may run on (the scheduler's affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: int | str, threads: int, on_accelerator: bool) -> int:
    """``auto``: one lane per ``threads`` cores on a CPU. One on an accelerator, whatever was asked: it
    runs one batch at a time, so more lanes add encoder copies to its memory and no speed."""
    if on_accelerator:
        if jobs != "auto" and int(jobs) > 1:
            warnings.warn(
                f"jobs: {jobs} on an accelerator runs as 1 (more lanes only add encoder copies)", stacklevel=2
            )
        return 1
    if jobs != "auto":
        return int(jobs)
    return max(1, usable_cores() // max(1, threads))


class Lanes:
    """``n`` evaluators (the given one and ``n - 1`` replicas); ``map`` spreads work over them."""

    def __init__(self, first: Evaluator, n: int) -> None:
        self.evaluators = [first] + [first.replica() for _ in range(max(1, n) - 1)]
        self._free: queue.SimpleQueue[Evaluator] = queue.SimpleQueue()
        for ev in self.evaluators:
            self._free.put(ev)
        self._threads = ThreadPoolExecutor(len(self.evaluators)) if len(self.evaluators) > 1 else None

    def __len__(self) -> int:
        return len(self.evaluators)

    def map(
        self, fn: Callable[[Evaluator, T], R], items: Iterable[T], done: Callable[[], None] = lambda: None
    ) -> list[R]:
        """``[fn(lane, item) for item in items]``, in order; ``done`` is called as each item finishes."""
        if self._threads is None:
            out = []
            for item in items:
                out.append(fn(self.evaluators[0], item))
                done()
            return out

        def on_a_free_lane(item: T) -> R:
            ev = self._free.get()
            try:
                return fn(ev, item)
            finally:
                self._free.put(ev)

        futures = [self._threads.submit(on_a_free_lane, item) for item in items]
        out = []
        try:
            for future in futures:
                out.append(future.result())
                done()
        except BaseException:
            for future in futures:
                future.cancel()  # a failed point ends the sweep: do not start the rest
            raise
        return out

    def logits(
        self, load: Callable[[Evaluator], None], jobs: list[tuple[ImageSplit, torch.Tensor]], chunk_batches: int = 4
    ) -> list[torch.Tensor]:
        """Logits of each (split, head) under one set of weights (``load`` puts them into a lane), the
        splits cut into runs of ``chunk_batches`` whole batches spread over the lanes. The cuts fall on
        batch boundaries, so every batch is the one the whole split would have: the same bits."""
        if len(self) == 1:
            load(self.evaluators[0])
            return [self.evaluators[0].logits(split, head) for split, head in jobs]
        step = self.evaluators[0].batch_size * chunk_batches
        pieces = [(j, start) for j, (split, _) in enumerate(jobs) for start in range(0, len(split), step)]
        loaded: set[int] = set()

        def piece(ev: Evaluator, at: tuple[int, int]) -> torch.Tensor:
            if id(ev) not in loaded:  # a lane is used by one thread at a time
                load(ev)
                loaded.add(id(ev))
            split, head = jobs[at[0]]
            return ev.logits(split, head, rows=slice(at[1], at[1] + step))

        out = self.map(piece, pieces)
        return [torch.cat([o for (j, _), o in zip(pieces, out, strict=True) if j == k]) for k in range(len(jobs))]

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
