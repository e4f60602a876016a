"""What a finished run hands to an experiment tracker, read from the files the run wrote.

Why from the files: results.csv, curves.csv, manifest.json and report/ are the run's one source of
truth (a cluster run's assembly writes them exactly as a single-machine run does), so every tracker
logs the same numbers, and logging an old run folder again needs nothing but the folder.

Names: a result row is ``DATASET/METHOD/seedN/SPLIT/METRIC`` (``/floorF`` when the row has a floor);
a lambda curve point is ``curves/DATASET/METHOD/seedN/forget_val`` (and ``control_val``) at step i,
the i-th lambda of the run (the sorted lambdas of curves.csv; the series ``curves/lambda`` holds
their values; ``lambda`` in every tracker). Cost figures (``cost/...``) are the manifest's wall time and stage timings, and every
number of a ``cost`` section when the manifest has one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError

ALLOWED = re.compile(r"[^A-Za-z0-9_\-./ ]")  # what every tracker accepts in a metric name (MLflow's rule)
CURVE_VALUES = ("forget_val", "control_val")
LAMBDA = "lambda"  # the series that maps a curve step to its lambda


def metric_name(*parts: Any) -> str:
    return "/".join(ALLOWED.sub("_", str(p)) for p in parts if p is not None and str(p) != "")


def _floor(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"floor{float(value):g}"


@dataclass
class RunRecord:
    run_dir: Path
    name: str  # the run folder's name
    suite: str
    config: dict[str, Any]  # the suite config, as the manifest holds it
    params: dict[str, str]  # the same, flattened to dotted keys
    tags: dict[str, str]  # git commit, dirty, suite, protocol, backbone, device
    metrics: dict[str, float]  # every result row
    curves: dict[str, dict[int, float]]  # name -> {step: value}
    lambdas: list[float]  # step i is lambdas[i]
    costs: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)  # run files and report/ (table, summary, figures)

    @property
    def figures(self) -> list[Path]:
        return [p for p in self.artifacts if p.suffix == ".png"]

    @property
    def summary(self) -> Path | None:
        found = [p for p in self.artifacts if p.name == "summary.md"]
        return found[0] if found else None


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)}


def result_metrics(results: pd.DataFrame) -> dict[str, float]:
    many_backbones = results.backbone.nunique() > 1
    metrics: dict[str, float] = {}
    for row in results.itertuples(index=False):
        key = metric_name(
            row.backbone if many_backbones else None,
            row.dataset,
            row.method,
            f"seed{row.seed}",
            row.split,
            row.metric,
            _floor(row.floor),
        )
        if key in metrics:
            raise BenchError(f"results.csv: two rows are both logged as {key!r}")
        metrics[key] = float(row.value)
    return metrics


def curve_series(curves: pd.DataFrame) -> tuple[dict[str, dict[int, float]], list[float]]:
    if curves.empty:
        return {}, []
    lambdas = sorted(float(x) for x in curves.lam.unique())
    step = {lam: i for i, lam in enumerate(lambdas)}
    many_backbones = curves.backbone.nunique() > 1
    series: dict[str, dict[int, float]] = {}
    for row in curves.itertuples(index=False):
        for value in CURVE_VALUES:
            name = metric_name(
                "curves", row.backbone if many_backbones else None, row.dataset, row.method, f"seed{row.seed}", value
            )
            series.setdefault(name, {})[step[float(row.lam)]] = float(getattr(row, value))
    return series, lambdas


def cost_figures(manifest: dict[str, Any]) -> dict[str, float]:
    costs: dict[str, float] = {}
    if isinstance(manifest.get("wall_seconds"), (int, float)):
        costs["cost/wall_seconds"] = float(manifest["wall_seconds"])
    for stage, seconds in (manifest.get("timings_seconds") or {}).items():
        costs[metric_name("cost", "seconds", stage)] = float(seconds)
    for key, value in flatten(manifest.get("cost") or {}).items():  # device-hours, FLOPs ... when recorded
        try:
            costs[metric_name("cost", *key.split("."))] = float(value)
        except ValueError:
            continue
    return costs


def read_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    for needed in ("results.csv", "manifest.json"):
        if not (run_dir / needed).is_file():
            raise BenchError(f"{run_dir}: no {needed}; tracking logs a finished run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    results = pd.read_csv(run_dir / "results.csv")
    curves_file = run_dir / "curves.csv"
    curves = pd.read_csv(curves_file) if curves_file.is_file() and curves_file.stat().st_size > 1 else pd.DataFrame()
    series, lambdas = curve_series(curves)
    config = manifest.get("config", {})
    git = manifest.get("git") or {}
    tags = {
        "suite": str(manifest.get("suite", "")),
        "protocol": str(config.get("protocol", "")),
        "git_commit": str(git.get("commit") or "unknown"),
        "git_dirty": str(git.get("dirty")),
        "backbone": ",".join(str(b) for b in results.backbone.unique()),
        "device": str((manifest.get("runtime") or {}).get("device", "")),
    }
    names = (
        "results.csv",
        "curves.csv",
        "manifest.json",
        "ablation.csv",
        "ablation_thresholds.csv",
        "ablation_pools.csv",
    )
    files = [run_dir / n for n in names]
    report = run_dir / "report"
    report_files = sorted(p for p in report.iterdir() if p.is_file()) if report.is_dir() else []
    return RunRecord(
        run_dir=run_dir,
        name=run_dir.resolve().name,
        suite=tags["suite"],
        config=config,
        params=flatten(config),
        tags=tags,
        metrics=result_metrics(results),
        curves=series,
        lambdas=lambdas,
        costs=cost_figures(manifest),
        artifacts=[p for p in files if p.is_file()] + report_files,
    )
