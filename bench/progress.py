"""Progress that suits where it is read: tqdm's redrawn bar on a terminal, plain lines in a log.

A CI log or a SLURM output file is not a terminal: tqdm's carriage-return redraws pile up there
(megabytes per run). When the stream is not a TTY, a bar prints one plain line every
``NEGMERGE_PROGRESS_SECONDS`` seconds (default 30) while it runs, and a closing line if it printed
any; bars shorter than that stay silent. Every bar of the project is made here (``progress_bar``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

PERIOD_ENV = "NEGMERGE_PROGRESS_SECONDS"
DEFAULT_PERIOD = 30.0


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    leave: bool = False,
    stream: TextIO | None = None,
):
    """A tqdm bar on a terminal; a ``LogProgress`` (same calls: iterate, ``update``, ``set_postfix``,
    ``close``, ``with``) on any other stream; a silent tqdm when not ``enabled``."""
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _is_tty(stream):
        return tqdm(iterable, total=total, desc=desc, leave=leave, file=stream)
    period = float(os.environ.get(PERIOD_ENV, DEFAULT_PERIOD))
    return LogProgress(iterable, total=total, desc=desc, stream=stream, period=period)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogProgress:
    """Progress as a plain line every ``period`` seconds (``clock``: seconds, injectable for tests)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        stream: TextIO,
        period: float = DEFAULT_PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.stream = iterable, total, desc or "progress", stream
        self.period, self.clock = period, clock
        self.n, self.postfix, self.printed, self.closed = 0, "", 0, False
        self.start = self.last = clock()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.period:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.printed:
            self._line(self.clock(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        state = "done " if done else ""
        self.stream.write(f"[progress] {self.desc}: {state}{count} in {now - self.start:.0f} s{extra}\n")
        self.stream.flush()
        self.printed += 1
