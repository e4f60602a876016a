"""What each method spent, counted where the work happens, so a result row says its price.

Training loops report every batch they step through (``processed``); a cache entry being computed
collects those counts (``metered``) and stores them in its record, so a cached entry is charged what
it cost when it was made, never the zero of a cache hit. A method's cost splits into the work that
made its model ("to unlearn": a merge's whole pool, the chosen candidate or setting) and the work
spent only to choose it ("to select": the other candidates or settings, and the Val forward passes
of the selection). Definitions: docs/metrics.md, "Cost".
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_local = threading.local()

# the cost columns of results.csv, in order (every row of a method carries its method's cost)
COST_COLUMNS = [
    "train_samples_unlearn",
    "train_samples_select",
    "val_samples_select",
    "train_samples",
    "gflops",
]


def processed(samples: int) -> None:
    """A training loop stepped through ``samples`` examples (forward and backward)."""
    meter = getattr(_local, "meter", None)
    if meter is not None:
        meter[0] += int(samples)


@contextmanager
def metered() -> Iterator[list[int]]:
    """Count the samples training code on this thread processes inside the block (``[count]``)."""
    outer = getattr(_local, "meter", None)
    _local.meter = box = [0]
    try:
        yield box
    finally:
        _local.meter = outer
        if outer is not None:  # nested work also counts for the enclosing entry
            outer[0] += box[0]


@dataclass(frozen=True)
class Cost:
    """One method's price for one (dataset, seed)."""

    unlearn_samples: int | None  # training samples (forward + backward) of the work that made the model
    select_samples: int | None  # training samples of work made only to choose among settings
    val_samples: int  # evaluation forward passes (images) the selection read
    seconds: float  # wall seconds of that training, from the cache records
    flops_per_image: float | None = None  # forward FLOPs of one image, where the model's count is known

    @property
    def train_samples(self) -> int | None:
        if self.unlearn_samples is None or self.select_samples is None:
            return None
        return self.unlearn_samples + self.select_samples

    @property
    def gflops(self) -> float | None:
        """Total GFLOPs: a training sample costs three forward passes (forward + backward)."""
        if self.flops_per_image is None or self.train_samples is None:
            return None
        return self.flops_per_image * (3 * self.train_samples + self.val_samples) / 1e9

    def columns(self) -> dict[str, Any]:
        return {
            "train_samples_unlearn": self.unlearn_samples,
            "train_samples_select": self.select_samples,
            "val_samples_select": self.val_samples,
            "train_samples": self.train_samples,
            "gflops": None if self.gflops is None else round(self.gflops, 3),
        }


def _samples(entries: Iterable[Any]) -> int | None:
    """Summed training samples of pool entries; None when any entry's record predates counting."""
    counts = [getattr(e, "samples", None) for e in entries]
    return None if any(c is None for c in counts) else int(sum(counts))


def charge(
    unlearn: Iterable[Any] = (),
    select: Iterable[Any] = (),
    val_samples: int = 0,
    flops_per_image: float | None = None,
) -> Cost:
    """The cost of a method whose model came from the pool entries ``unlearn`` and whose choice also
    needed ``select`` (entries are charged once: one listed in both counts as unlearning work)."""
    unlearn = list(unlearn)
    keys = {e.key for e in unlearn}
    select = [e for e in select if e.key not in keys]
    seconds = math.fsum(e.seconds for e in [*unlearn, *select])
    return Cost(_samples(unlearn), _samples(select), int(val_samples), seconds, flops_per_image)


FREE = Cost(0, 0, 0, 0.0, 0.0)  # a reference row (theta_0 itself): nothing spent


def forward_flops(module: Any, example: Any) -> float:
    """Forward FLOPs of ``module`` on one example (counted by torch, not looked up)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = module.training
    module.eval()
    try:
        with counter, torch.enable_grad():  # grad on: fused no-grad fast paths are invisible to the counter
            module(example)
    finally:
        module.train(was_training)
    return float(counter.get_total_flops())
