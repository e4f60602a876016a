"""Counting host-device synchronisations of a piece of code, the same way on a GPU and on a CPU.

On CUDA: ``torch.cuda.set_sync_debug_mode("warn")``, each warning it raises counted (torch's own
list: ``.item()``, ``bool(tensor)``, a blocking copy either way, ``nonzero`` ...). On a CPU there is no
device to wait for, so the count is of the same calls made where torch would sync had the tensors
been on a device: reading a tensor's value on the host (``item``, ``bool``, ``float``, ``int``,
``tolist``, ``numpy``), ``.cpu()``, and ``torch.tensor(..., device=...)`` (a blocking upload). That
is an upper bound: it also counts reads of tensors that stay on the CPU in a GPU run. Either way the
sites (first project frame) are kept, so a count can be traced to its lines.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}
_PROJECT = str(Path(__file__).resolve().parent.parent)


@dataclass
class SyncCount:
    """How many synchronising calls ran, and where (``path:line`` of the first project frame)."""

    sites: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    @property
    def in_project(self) -> int:
        """Those made by this project's own lines (not inside torch, e.g. an optimiser's step)."""
        return sum(n for site, n in self.sites.items() if not site.startswith("torch:"))

    def add(self) -> None:
        self.sites[_site()] += 1


def _site() -> str:
    """The line that made the call: ``bench/x.py:12``, or ``torch:optim/adamw.py:34`` inside torch."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename
        if path.endswith(("syncs.py", "torch/overrides.py", "contextlib.py")) or "torch/utils/_device" in path:
            continue
        if path.startswith(_PROJECT):
            return f"{Path(path).relative_to(_PROJECT)}:{frame.lineno}"
        if "/torch/" in path:
            return f"torch:{path.split('/torch/')[-1]}:{frame.lineno}"
        return f"{Path(path).name}:{frame.lineno}"
    return "<unknown>"


class _CountHostReads(TorchFunctionMode):
    def __init__(self, count: SyncCount) -> None:
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS or (func is torch.tensor and kwargs.get("device") is not None):
            self.count.add()
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(device: torch.device | str = "cpu") -> Iterator[SyncCount]:
    """``with count_syncs(rt.device) as n: ...``; then ``n.total`` and ``n.sites``."""
    count = SyncCount()
    if torch.device(device).type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if "synchroniz" in str(w.message):
                count.sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
        return
    with _CountHostReads(count):
        yield count
