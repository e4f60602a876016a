"""``negmerge-bench cache gc --keep RUN_DIR...``: remove the cache entries no kept run uses.

A run's manifest names every entry it read or made (``pool``: task vectors and trained models;
``cache_entries.evals``: cached evaluations), so the runs a user keeps define what the cache must
hold; the rest (old hyperparameter grids, abandoned suites, entries of edited code) can go. Pretrained
mini backbones, zero-shot heads and preprocessed images are shared by every run of a backbone and
cheap to keep relative to what they save: gc leaves them. An entry another process holds the lock of
is being written and is never touched; lock files stay (empty, and a process may wait on one).
"""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock, Timeout

from bench.errors import BenchError

MODEL_FOLDERS = ("pool", "classic-pool", "classic-models")  # <key>.json + <key>.safetensors (+ .lock)
EVAL_FOLDER = "evals"  # <key>.json (+ .lock)


def referenced(run_dirs: list[Path]) -> tuple[set[str], set[str]]:
    """(model and task-vector keys, evaluation keys) the manifests of ``run_dirs`` name."""
    models, evals = set(), set()
    for run in run_dirs:
        path = Path(run) / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BenchError(
                f"--keep {run}: no readable manifest.json ({exc}); give folders `negmerge-bench run` wrote"
            ) from None
        if "cache_entries" not in manifest:
            raise BenchError(f"--keep {run}: its manifest predates cache tracking; rerun it (cached: seconds) first")
        models |= {p["key"] for p in manifest.get("pool", [])}
        evals |= set(manifest["cache_entries"].get("evals", []))
    return models, evals


def _unused(folder: Path, keep: set[str]) -> dict[str, list[Path]]:
    entries: dict[str, list[Path]] = {}
    for path in folder.glob("*"):
        key = path.name.split(".", 1)[0]
        if path.is_file() and key not in keep:
            entries.setdefault(key, []).append(path)
    return entries


def collect_garbage(root: Path, run_dirs: list[Path], dry_run: bool = False) -> tuple[int, int]:
    """Remove (or with ``dry_run`` only count) unused entries; returns (entries, bytes)."""
    models, evals = referenced(run_dirs)
    removed, freed = 0, 0
    for name, keep in [*((f, models) for f in MODEL_FOLDERS), (EVAL_FOLDER, evals)]:
        for key, paths in sorted(_unused(Path(root) / name, keep).items()):
            lock = Path(root) / name / f"{key}.json.lock"
            try:
                with FileLock(lock, timeout=0):
                    size = sum(p.stat().st_size for p in paths if p.exists() and p != lock)
                    if not dry_run:
                        for p in paths:
                            if p != lock:
                                p.unlink(missing_ok=True)
            except Timeout:
                continue  # being computed right now by another run
            removed += 1  # its lock file stays: a process may be waiting on it
            freed += size
    return removed, freed
