"""A finished run's files read back (results.csv, curves.csv, manifest.json), each damaged file one
clear error naming it. Shared by the report and ``regress``, which share nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.results import RESULT_COLUMNS


def load_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    run_dir = Path(run_dir)
    for name in ("results.csv", "manifest.json"):
        if not (run_dir / name).is_file():
            raise BenchError(f"{run_dir} has no {name}: give the folder a `negmerge-bench run` wrote")
    results = read_table(run_dir / "results.csv", required=RESULT_COLUMNS)
    curves_file = run_dir / "curves.csv"
    curves = read_table(curves_file) if curves_file.is_file() and curves_file.stat().st_size > 1 else pd.DataFrame()
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"{run_dir / 'manifest.json'} is damaged ({exc}); rerun the suite to rewrite it") from None
    return results, curves, manifest


def read_table(path: Path, required: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """A run's CSV, or one clear error naming the file when it is damaged."""
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path} is damaged ({str(exc).splitlines()[0]}); rerun the suite to rewrite it") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise BenchError(f"{path} is damaged: column {missing[0]!r} is missing; rerun the suite to rewrite it")
    return table
