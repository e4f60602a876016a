"""The one entry that runs a suite, or one work unit of it: the CLI, cluster jobs and tests call it."""

from __future__ import annotations

from pathlib import Path

from bench.results import RunRecorder
from bench.units import Unit


def run_suite(cfg, out: Path, cache: Path, unit: Unit | None = None) -> RunRecorder:
    from bench.config import ClipSuite

    if isinstance(cfg, ClipSuite):
        from bench.protocol_clip import ClipRun

        return ClipRun(cfg, out, cache, unit).run()
    from bench.protocol_classic import ClassicRun

    return ClassicRun(cfg, out, cache, unit).run()
