"""What a run must have written for a method, whichever way its selection went on this machine."""

from __future__ import annotations

import pandas as pd


def assert_reported(results: pd.DataFrame, manifest: dict, method: str, seed: int, metrics) -> bool:
    """``method``'s rows for ``seed`` (every dataset): the test ``metrics`` where its selection found a
    feasible setting, else one Val row marked infeasible (NaN) with the reason in the manifest's
    selections and notes. Which of the two happens can depend on the CPU's floating-point bits, so a
    test asserts this shape rather than one machine's outcome. Returns whether every dataset was feasible."""
    chosen = [s for s in manifest["selections"] if s["method"] == method and s["seed"] == seed]
    assert chosen, f"{method} seed {seed}: no selection recorded"
    notes = " ".join(manifest["notes"])
    for selection in chosen:
        rows = results[(results.method == method) & (results.seed == seed) & (results.dataset == selection["dataset"])]
        where = (method, seed, selection["dataset"])
        if selection["feasible"]:
            assert set(rows[rows.split == "test"].metric) >= set(metrics), where
            assert rows.value.notna().all() and rows.feasible.all(), where
            continue
        assert rows[["split", "metric"]].values.tolist() == [["val", "forget_acc"]], where
        assert rows.value.isna().all() and not rows.feasible.any() and selection["reason"], where
        assert f"seed {seed} {method}: no feasible lambda ({selection['reason']})" in notes, where
    return all(s["feasible"] for s in chosen)
