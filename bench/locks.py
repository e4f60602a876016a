"""One lock per cache entry, so that many processes (cluster jobs, two ``run``s on one machine) can
share a cache: an entry another process is computing is waited for, not computed twice.

``filelock.FileLock`` is an OS lock (``flock``) on ``ENTRY.lock``: the kernel releases it when its
holder dies, so a lock left by a SIGKILLed process never blocks the next run (its lock *file* stays,
empty and harmless). Entries themselves are written atomically (temp file + rename), so a reader
never sees a half-written one. On a cluster, the cache must be on a filesystem where ``flock`` works
across nodes (NFSv4, Lustre, GPFS, BeeGFS with the right mount options).

The pattern, in every producer: look (no lock) -> lock -> look again -> compute -> write -> unlock.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

T = TypeVar("T")


def worker_id() -> str:
    """Who computed an entry: host and process, written into the entry's record and the manifest."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold the lock of the cache entry ``entry`` (any of its files' paths; the lock sits beside it)."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        yield


def locked_compute(entry: Path, lookup: Callable[[], T | None], compute: Callable[[], T]) -> tuple[T, bool]:
    """``lookup()`` if the entry exists, else ``compute()`` under its lock (looking again once the
    lock is held: another process may have finished it meanwhile). Returns (value, computed here)."""
    found = lookup()
    if found is not None:
        return found, False
    with entry_lock(entry):
        found = lookup()
        if found is not None:
            return found, False
        return compute(), True
