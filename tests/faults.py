"""Fault injection for the resumability tests: SIGKILL a run (and its workers) once each stage is
reached, the way a cluster's OOM killer or a pre-empted node would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def count(folder: Path, pattern: str = "*.json") -> int:
    """Entries of a cache folder (0 before the run made it)."""
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def kill_at_stages(
    cmd: list[str], env: dict[str, str], stages: Sequence[tuple[str, Callable[[float], bool]]], timeout: float = 400.0
) -> None:
    """For each (stage, reached): start ``cmd``, wait until ``reached(start_time)`` holds, SIGKILL it.
    Each start resumes what the kill before it left; a run that ends first fails the test."""
    for stage, reached in stages:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        while not reached(started) and proc.poll() is None and time.monotonic() < started + timeout:
            time.sleep(0.05)  # polling for the stage, not timing anything
        assert proc.poll() is None, f"the run ended before the {stage} stage could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_to_completion(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
