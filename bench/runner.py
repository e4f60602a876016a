"""The one entry that runs a suite, or one work unit of it: the CLI, cluster jobs and tests call it."""

from __future__ import annotations

from pathlib import Path

from bench.protocols import PROTOCOLS
from bench.results import RunRecorder
from bench.units import Unit


def run_suite(cfg, out: Path, cache: Path, unit: Unit | None = None) -> RunRecorder:
    runner = PROTOCOLS[cfg.protocol].load("runner")
    return runner(cfg, out, cache, unit).run()
