"""The one interface every experiment tracker implements: say at start-up why it cannot log, then
log a finished run's record once."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from bench.tracking.record import RunRecord

INSTALL_ALL = "pip install 'negmerge-bench[tracking]'"


@dataclass(frozen=True)
class TrackingSettings:
    store: Path  # local stores: the W&B offline runs, MLflow's SQLite file, TensorBoard's event files
    uri: str | None  # MLflow tracking URI (default: SQLite in ``store``)
    project: str  # W&B project and MLflow experiment


class Tracker:
    name: ClassVar[str]
    modules: ClassVar[tuple[str, ...]]  # what must be importable
    install: ClassVar[str]  # the pip command that provides it

    def __init__(self, settings: TrackingSettings) -> None:
        self.settings = settings

    def problem(self) -> str | None:
        """None when this tracker can log; else what is missing and how to get it (one line)."""
        missing = [m for m in self.modules if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            return f"{self.name} is not installed ({', '.join(missing)} missing): {self.install} (or {INSTALL_ALL})"
        return self.unreachable()

    def unreachable(self) -> str | None:
        return None

    def log(self, record: RunRecord) -> str:
        """Log ``record``; returns where it went (a folder or URI, and how to look at it)."""
        raise NotImplementedError
