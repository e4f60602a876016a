"""Run outputs: a tidy long table (one row per backbone x dataset x method x seed x split x metric),
the lambda curves behind every selection, and a manifest saying exactly what produced them."""

from __future__ import annotations

import platform
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from bench.io import write_json_atomic, write_text_atomic
from bench.selection import Selection

RESULT_COLUMNS = [
    "suite",
    "backbone",
    "dataset",
    "method",
    "seed",
    "split",
    "metric",
    "value",
    "lam",
    "feasible",
    "at_grid_edge",
    "floor",
    "selection_rule",
]
PACKAGES = [
    "negmerge-bench",
    "torch",
    "torchvision",
    "open_clip_torch",
    "clip-benchmark",
    "timm",
    "numpy",
    "scikit-learn",
    "pandas",
]


def git_commit(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        # dirty = uncommitted code or config; run outputs (results/, runs/) do not make a run dirty
        changes = git("status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)runs")
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changes)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class RunRecorder:
    def __init__(self, out: Path, cfg: Any, selection_rule: str = "control-floor") -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.selection_rule = selection_rule
        self.rows: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        self.pool: list[dict[str, Any]] = []
        self.selections: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.runtime: dict[str, str] = {}
        self.ablation: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.cache_entries: dict[str, list[str]] = {}
        self.unlearning: list[dict[str, Any]] = []  # SISA: what unlearning retrained, against Retrain
        self.bad_images: list[dict[str, Any]] = []  # damaged images data.bad_images=skip left out
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def _row(self, row: dict, method: str, split: str, metric: str, value: float, sel: Selection | None, floor) -> None:
        self.rows.append(
            {
                "suite": self.cfg.name,
                **row,
                "method": method,
                "split": split,
                "metric": metric,
                "value": value,
                "lam": sel.lam if sel else None,
                "feasible": sel.feasible if sel else None,
                "at_grid_edge": sel.at_grid_edge if sel else None,
                "floor": floor,
                "selection_rule": self.selection_rule,
            }
        )

    def result(
        self, row: dict, method: str, sel: Selection, test: dict[str, float], floor: float, chosen: str | None = None
    ) -> None:
        """Val numbers at the selected lambda, and the test metrics measured there."""
        self.selections.append(
            {
                **row,
                "method": method,
                "lam": sel.lam,
                "feasible": sel.feasible,
                "at_grid_edge": sel.at_grid_edge,
                "reason": sel.reason,
                "chosen_candidate": chosen,
            }
        )
        if not sel.feasible:
            self.notes.append(f"{row['dataset']} seed {row['seed']} {method}: no feasible lambda ({sel.reason})")
            self._row(row, method, "val", "forget_acc", float("nan"), sel, floor)
            return
        self._row(row, method, "val", "forget_acc", sel.forget_val, sel, floor)
        self._row(row, method, "val", "control_acc", sel.control_val, sel, floor)
        for metric, value in sorted(test.items()):  # fixed order: a cached rerun writes identical bytes
            self._row(row, method, "test", metric, value, sel, floor)

    def extra(self, row: dict, method: str, metric: str, value: float) -> None:
        self._row(row, method, "-", metric, value, None, None)

    def curve(self, row: dict, method: str, lambdas, forget, control, label: Any = None) -> None:
        for lam, f, c in zip(lambdas, forget, control):
            self.curves.append(
                {
                    **row,
                    "method": method,
                    "lam": lam,
                    "forget_val": f,
                    "control_val": c,
                    "label": str(label) if label is not None else "",
                }
            )

    def pool_member(self, entry, tag: str, label: str) -> None:
        """Record a pool entry once (a run made ahead in parallel meets its entries again later)."""
        if any(member["key"] == entry.key for member in self.pool):
            return
        self.pool.append(
            {
                "key": entry.key,
                "role": tag,
                "label": label,
                "status": entry.status,
                "seconds": round(entry.seconds, 2),
                "cached": entry.cached,
                "computed_by": entry.computed_by,  # host:pid of the process that computed it
                "error": entry.error,
                "dataset": entry.spec.get("dataset"),
                **({"files": entry.spec["from"]} if "from" in entry.spec else {}),  # pool.from: file and sha256
            }
        )

    def note(self, message: str) -> None:
        self.notes.append(message)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=RESULT_COLUMNS)

    def finish(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "results.csv", self.table().to_csv(index=False))
        write_text_atomic(self.out / "curves.csv", pd.DataFrame(self.curves).to_csv(index=False))
        if self.ablation:
            write_text_atomic(self.out / "ablation.csv", pd.DataFrame(self.ablation).to_csv(index=False))
        manifest = {
            "suite": self.cfg.name,
            "config": self.cfg.model_dump(),
            "git": git_commit(Path(__file__).resolve().parent.parent),
            "packages": package_versions(),
            "python": platform.python_version(),
            "host": {"machine": platform.machine(), "threads": getattr(self.cfg, "threads", None)},
            "runtime": self.runtime,  # device, its name, precision
            "started": self.started.isoformat(),
            "wall_seconds": round(time.perf_counter() - self._t0, 2),
            "timings_seconds": {k: round(v, 2) for k, v in self.timings.items()},
            "pool": self.pool,
            "failures": [p for p in self.pool if p["status"] != "ok"],
            "selections": self.selections,
            "notes": self.notes,
            "bad_images": self.bad_images,
            **({"unlearning_cost": self.unlearning} if self.unlearning else {}),
            "cache_entries": self.cache_entries,  # what `cache gc --keep` keeps for this run
        }
        write_json_atomic(self.out / "manifest.json", manifest)
