"""``negmerge-bench regress RUN_DIR --against REF_DIR``: did this commit make unlearning worse?

Compares test metrics per (dataset, method, metric), averaged over seeds. The tolerance is
``max(abs_tol, sigmas x std)`` with std the reference's spread over seeds (when it has several), so
noisy metrics get wider bands. Which way is worse depends on the metric:
- Protocol A: forget accuracy up, control accuracy down.
- Protocol B: Avg. Gap up, retain or test accuracy down (Df accuracy is judged through Avg. Gap).
- Reference rows (zero-shot, Original, Retrain) may not move either way: they define the baseline.
- A method or metric missing from the new run is a regression; other metrics are reported only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import kind, load_run

WORSE_IF = {
    "clip": {"forget_acc": +1, "control_acc": -1},
    "classic": {"avg_gap": +1, "retain_acc": -1, "test_acc": -1},
}


def _per_metric(results: pd.DataFrame) -> pd.DataFrame:
    test = results[results.split == "test"]
    grouped = test.groupby(["dataset", "method", "metric"]).value
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(), "n": grouped.count()})


def compare(run_dir: Path, ref_dir: Path, abs_tol: float = 2.0, sigmas: float = 3.0) -> pd.DataFrame:
    new, _, manifest = load_run(run_dir)
    ref, _, _ = load_run(ref_dir)
    protocol = manifest["config"]["protocol"]
    worse_if = WORSE_IF[protocol]
    a, b = _per_metric(ref), _per_metric(new)
    rows = []
    for key, r in a.iterrows():
        dataset, method, metric = key
        reference = kind(method) == "reference"
        judged = metric in worse_if or reference
        if not judged:
            continue
        tol = max(abs_tol, sigmas * r["std"]) if r["n"] > 1 and not np.isnan(r["std"]) else abs_tol
        if key not in b.index or np.isnan(b.loc[key, "mean"]):
            rows.append((dataset, method, metric, r["mean"], np.nan, np.nan, tol, "MISSING"))
            continue
        delta = b.loc[key, "mean"] - r["mean"]
        if reference:
            status = "REGRESSION (reference moved)" if abs(delta) > tol else "ok"
        elif metric in worse_if and delta * worse_if[metric] > tol:
            status = "REGRESSION"
        elif metric in worse_if and -delta * worse_if[metric] > tol:
            status = "improved"
        else:
            status = "ok"
        rows.append((dataset, method, metric, r["mean"], b.loc[key, "mean"], delta, tol, status))
    return pd.DataFrame(
        rows, columns=["dataset", "method", "metric", "reference", "new", "delta", "tolerance", "status"]
    )


def is_regression(table: pd.DataFrame) -> bool:
    return bool(table.status.str.startswith(("REGRESSION", "MISSING")).any())
