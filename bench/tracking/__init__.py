"""Experiment trackers (W&B offline, MLflow, TensorBoard): a finished run, logged once from its files.

Why after the run and from the files: the trackers then see exactly what the run folder holds, a
cluster run logs once (from its assembly, never from a unit), and a tracker that is missing or cannot
be reached changes nothing in the run: it is named in one warning line at start-up, and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bench.tracking.base import Tracker, TrackingSettings

TRACKERS = ("wandb", "mlflow", "tensorboard")


def _tracker_class(name: str) -> type[Tracker]:
    if name == "wandb":
        from bench.tracking.wandb_tracker import WandbTracker

        return WandbTracker
    if name == "mlflow":
        from bench.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker
    from bench.tracking.tensorboard_tracker import TensorboardTracker

    return TensorboardTracker


def settings_for(cfg, out: Path) -> TrackingSettings:
    """The suite's tracking fields; local stores default to ``tracking/`` beside the run folder (one
    store for every run under ``runs/``)."""
    store = Path(cfg.tracking_dir) if cfg.tracking_dir else Path(out).resolve().parent / "tracking"
    return TrackingSettings(store=store, uri=cfg.tracking_uri, project=cfg.tracking_project)


def start_trackers(names: Sequence[str], settings: TrackingSettings) -> list[Tracker]:
    """The trackers that can log; one warning line for each that cannot (the run goes on)."""
    usable = []
    for name in dict.fromkeys(names):
        tracker = _tracker_class(name)(settings)
        problem = tracker.problem()
        if problem:
            print(f"warning: tracking: {problem}; the run goes on without it", file=sys.stderr)
        else:
            usable.append(tracker)
    return usable


def log_run(trackers: Sequence[Tracker], run_dir: Path) -> list[str]:
    """Log the finished run in ``run_dir`` to every tracker; a tracker that fails is one warning line
    (the run folder is complete either way; ``negmerge-bench track RUN_DIR`` logs it again later)."""
    if not trackers:
        return []
    from bench.tracking.record import read_run

    record = read_run(run_dir)
    where = []
    for tracker in trackers:
        try:
            where.append(f"{tracker.name}: {tracker.log(record)}")
        except Exception as exc:  # a tracker's store or server failing must not fail a finished run
            print(
                f"warning: tracking: {tracker.name} could not log {run_dir} ({type(exc).__name__}: {exc}); "
                f"the run folder is complete: `negmerge-bench track {run_dir} --track {tracker.name}` retries",
                file=sys.stderr,
            )
    return where


__all__ = ["TRACKERS", "Tracker", "TrackingSettings", "log_run", "settings_for", "start_trackers"]
