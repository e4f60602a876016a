"""``negmerge-bench regress RUN_DIR --against REF_DIR``: did this commit make unlearning worse?

Compares test metrics per (dataset, method, metric, floor, selection rule), averaged over seeds: like
with like, a run with several floors or rules is compared criterion by criterion (a criterion only
the run has is not judged; one the reference has and the run lacks is MISSING). It asks whether a move is
beyond seed noise (docs/metrics.md#regress). The noise is the standard error of the difference of the
two means, ``sqrt(var * (1/n_ref + 1/n_new))``, with ``var`` the seed variance pooled over both runs; the
tolerance is ``max(minimum, sigmas x noise)``, the minimum per metric (``MIN_TOLERANCE``) covering what
seeds cannot show (a run with one seed, or two seeds that happen to agree). Which way is worse depends
on the metric:
- Protocol A: forget accuracy up, control accuracy down.
- Protocol B: Avg. Gap up, retain or test accuracy down (Df accuracy is judged through Avg. Gap).
- Reference rows (zero-shot, Original, Retrain) may not move either way: they define the baseline.
- A method or metric missing from the new run is a regression; other metrics are reported only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.runfiles import load_run

WORSE_IF = {
    "clip": {"forget_acc": +1, "control_acc": -1},
    "classic": {"avg_gap": +1, "retain_acc": -1, "test_acc": -1},
}
# points: the smallest move judged, whatever the seeds say. MIA-efficacy is the noisiest metric (an
# SVC on a one-dimensional feature; seed std of 2-4 points on the offline suites).
MIN_TOLERANCE = {"mia_efficacy": 5.0}
DEFAULT_MIN_TOLERANCE = 2.0


IDENTITY = ["dataset", "method", "metric", "floor", "selection_rule"]


def kind(method: str) -> str:
    """The registry's kind of ``method`` (a method this checkout does not register is no reference)."""
    from baselines import find_method

    found = find_method(method)
    return found.kind if found is not None else "unregistered"


def _per_metric(results: pd.DataFrame) -> pd.DataFrame:
    test = results[results.split == "test"].copy()
    test["floor"] = test.floor.round(6)  # a float read back from CSV: one key per floor
    grouped = test.groupby(IDENTITY, dropna=False).value
    return pd.DataFrame({"mean": grouped.mean(), "var": grouped.var(), "n": grouped.count()})


def seed_noise(ref: pd.Series, new: pd.Series) -> float:
    """Standard error of (new mean - reference mean) from the seed variance of both runs (pooled over
    those with two or more seeds); 0 when neither run has a spread to estimate it from."""
    variances = [(s["var"], s["n"] - 1) for s in (ref, new) if s["n"] > 1 and not np.isnan(s["var"])]
    if not variances:
        return 0.0
    pooled = sum(v * dof for v, dof in variances) / sum(dof for _, dof in variances)
    return math.sqrt(pooled * (1 / ref["n"] + 1 / new["n"]))


def compare(run_dir: Path, ref_dir: Path, abs_tol: float | None = None, sigmas: float = 3.0) -> pd.DataFrame:
    """One row per judged (dataset, method, metric); ``abs_tol`` overrides every metric's minimum."""
    new, _, manifest = load_run(run_dir)
    ref, _, _ = load_run(ref_dir)
    worse_if = WORSE_IF[manifest["config"]["protocol"]]
    a, b = _per_metric(ref), _per_metric(new)
    rows = []
    for key, r in a.iterrows():
        dataset, method, metric, floor, rule = key
        reference = kind(method) == "reference"
        if not (metric in worse_if or reference):
            continue
        minimum = abs_tol if abs_tol is not None else MIN_TOLERANCE.get(metric, DEFAULT_MIN_TOLERANCE)
        if key not in b.index or np.isnan(b.loc[key, "mean"]):
            rows.append((dataset, method, metric, floor, rule, r["mean"], np.nan, np.nan, minimum, np.nan, "MISSING"))
            continue
        noise = seed_noise(r, b.loc[key])
        tol = max(minimum, sigmas * noise)
        delta = b.loc[key, "mean"] - r["mean"]
        z = abs(delta) / noise if noise > 0 else np.nan
        why = f"{z:.1f}x seed noise" if noise > 0 else "no seed spread: beyond the minimum"
        if reference:
            status = f"REGRESSION (reference moved, {why})" if abs(delta) > tol else "ok"
        elif metric in worse_if and delta * worse_if[metric] > tol:
            status = f"REGRESSION ({why})"
        elif metric in worse_if and -delta * worse_if[metric] > tol:
            status = f"improved ({why})"
        else:
            status = "ok"
        rows.append((dataset, method, metric, floor, rule, r["mean"], b.loc[key, "mean"], delta, tol, noise, status))
    columns = [*IDENTITY, "reference", "new", "delta", "tolerance", "seed_noise", "status"]
    return pd.DataFrame(rows, columns=columns)


def is_regression(table: pd.DataFrame) -> bool:
    return bool(table.status.str.startswith(("REGRESSION", "MISSING")).any())
