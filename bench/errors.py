"""Harness errors: each names the field (or resource) at fault and how to fix it."""

from __future__ import annotations

import re

# torch re-raises an error of a DataLoader worker process as ``type(exc)(text)``, where ``text`` is
# "Caught X in DataLoader worker process N.\nOriginal Traceback ...": the whole worker traceback
_WORKER_TRACEBACK = re.compile(r"\ACaught \w+ in .*\nOriginal Traceback", re.DOTALL)


class BenchError(Exception):
    """A problem with a run's configuration, data or weights that the user can fix.

    Raised in a DataLoader worker process it still reads as its own one-line message (the CLI prints
    ``error: MESSAGE``), not as the worker's traceback that torch would wrap it in."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_own_message(str(message)))


def _own_message(text: str) -> str:
    """The message a worker process raised, out of torch's wrapper around its traceback."""
    if not _WORKER_TRACEBACK.match(text):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"\A[\w.]+: ", "", last, count=1)
