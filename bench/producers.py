"""Pool fine-tunes made ``jobs`` at a time: this process and ``jobs - 1`` copies of it.

Fine-tunes are independent cache entries (``bench.units``), like the units a cluster run spreads over
jobs; here they are spread over this machine's cores. Processes, not threads: RandAugment draws from
the process-global RNGs, which each fine-tune seeds for itself. On Linux the workers are forked from
the run after its setup, so they start at once with the datasets, backbone and heads already loaded
(elsewhere they are spawned and set the suite up themselves). Each makes one entry per task under
the entry's lock, with the ops a single process would run: the entries are the same bits.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from bench.progress import progress_bar
from bench.units import Unit

_PRODUCER: Any = None  # the object whose ``produce(unit)`` makes an entry, in this process


def _init(make_worker) -> None:
    global _PRODUCER
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if make_worker is not None:  # spawned: set the suite up here
        _PRODUCER = make_worker()
    _PRODUCER.quiet()  # one progress bar: the parent's


def _exit_with_parent(parent: int) -> None:
    """A worker whose run was killed (SIGKILL, an OOM killer) stops too, instead of waiting forever for
    work: its entries are either written whole or not at all, so a rerun resumes cleanly."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _make(unit: dict[str, Any]) -> list[str]:
    return _PRODUCER.produce(Unit.from_dict(unit))


def produce_in_workers(producer, make_worker, units: list[Unit], jobs: int, progress: bool = True) -> set[str]:
    """``producer.produce(unit)`` for every unit, ``jobs`` at a time: here and in ``jobs - 1`` worker
    processes, forked from this one where the platform can (else spawned, each running the picklable
    ``make_worker()`` to get its own producer). This process works from the start. Returns the keys
    of the entries made (not found in the cache), wherever they were made."""
    global _PRODUCER
    _PRODUCER = producer
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    pending = deque(units)
    workers = max(1, min(jobs - 1, len(units) - 1))
    with (
        ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init, initargs=(None if fork else make_worker,)
        ) as pool,
        progress_bar(total=len(units), desc=f"fine-tunes ({workers + 1} at a time)", enabled=progress) as bar,
    ):
        running: set[Future] = set()
        made: set[str] = set()
        try:
            while pending or running:
                while pending and len(running) < workers:
                    running.add(pool.submit(_make, pending.popleft().to_dict()))
                if pending:
                    made.update(producer.produce(pending.popleft()))
                    bar.update()
                else:
                    wait(running, return_when=FIRST_COMPLETED)
                for future in [f for f in running if f.done()]:
                    running.remove(future)
                    made.update(future.result())  # a worker's error is raised here, with its message
                    bar.update()
        except BaseException:
            for future in running:
                future.cancel()
            raise
    return made
