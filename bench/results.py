"""Run outputs: a tidy long table (one row per backbone x dataset x method x seed x split x metric),
the lambda curves behind every selection, and a manifest saying exactly what produced them."""

from __future__ import annotations

import platform
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from bench.cost import COST_COLUMNS, Cost
from bench.io import write_json_atomic, write_text_atomic
from bench.selection import Selection
from bench.studies import POOLS_FILE, THRESHOLD_FILE

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
ROW_FIELDS = ("backbone", "dataset", "seed")  # what identifies a (dataset, seed) of a row, with the method


def _row_key(row: dict, method: str) -> tuple:
    return (*(row.get(k) for k in ROW_FIELDS), method)


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
        self.thresholds: list[dict[str, Any]] = []  # the threshold study (bench.studies)
        self.pools: list[dict[str, Any]] = []  # the sub-pool study
        self.study_pools: list[dict[str, Any]] = []  # which pool entries each sub-pool merged
        self.timings: dict[str, float] = {}
        self.cache_entries: dict[str, list[str]] = {}
        self.unlearning: list[dict[str, Any]] = []  # SISA: what unlearning retrained, against Retrain
        self.bad_images: list[dict[str, Any]] = []  # damaged images data.bad_images=skip left out
        # forward passes this run computed (cache hits are none): Val = one point of a lambda curve or
        # one scored setting; test = one test evaluation at a selected point. Selection criteria share them.
        self.passes = {"val": 0, "test": 0}
        self._passes_lock = threading.Lock()  # lanes and the scoring thread count concurrently
        self.costs: dict[tuple, tuple[dict, str, Cost, tuple]] = {}  # (row, method) -> what the method spent
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def count_pass(self, split: str) -> None:
        with self._passes_lock:
            self.passes[split] += 1

    def _row(
        self,
        row: dict,
        method: str,
        split: str,
        metric: str,
        value: float,
        sel: Selection | None,
        floor,
        rule: str | None = None,
    ) -> None:
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
                "selection_rule": rule or self.selection_rule,
            }
        )

    def result(
        self,
        row: dict,
        method: str,
        sel: Selection,
        test: dict[str, float],
        floor: float,
        chosen: str | None = None,
        rule: str | None = None,
    ) -> None:
        """Val numbers at the selected lambda, and the test metrics measured there; ``floor`` and
        ``rule``: the criterion that selected it (rule: the run's first when not given)."""
        rule = rule or self.selection_rule
        self.selections.append(
            {
                **row,
                "method": method,
                "lam": sel.lam,
                "feasible": sel.feasible,
                "at_grid_edge": sel.at_grid_edge,
                "reason": sel.reason,
                "chosen_candidate": chosen,
                "floor": floor,
                "selection_rule": rule,
            }
        )
        if not sel.feasible:
            where = "" if (floor, rule) == self.first_criterion else f" [{rule} at floor {floor}]"
            self.notes.append(f"{row['dataset']} seed {row['seed']} {method}: no feasible lambda ({sel.reason}){where}")
            self._row(row, method, "val", "forget_acc", float("nan"), sel, floor, rule)
            return
        self._row(row, method, "val", "forget_acc", sel.forget_val, sel, floor, rule)
        self._row(row, method, "val", "control_acc", sel.control_val, sel, floor, rule)
        for metric, value in sorted(test.items()):  # fixed order: a cached rerun writes identical bytes
            self._row(row, method, "test", metric, value, sel, floor, rule)

    @property
    def first_criterion(self) -> tuple[float, str]:
        """(floor, rule) of the main table: a note about it needs no tag."""
        return (self.cfg.selection.floor, self.selection_rule)

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

    def study_pool(self, row: dict, name: str, keys: list[str]) -> None:
        self.study_pools.append({**row, "pool": name, "candidates": keys})

    def _studies_manifest(self) -> dict[str, Any]:
        """What the studies merged, and the proof that they trained nothing: every sub-pool's members
        are entries of the pool, whose fine-tunes this run counted (made now or found in the cache)."""
        tuned = [p for p in self.pool if p["role"] == "fine-tune"]
        keys = {p["key"] for p in tuned}
        return {
            "pools": self.study_pools,
            "fine_tunes": {
                "pool_entries": len(tuned),
                "computed": sum(not p["cached"] for p in tuned),
                "sub_pool_members_outside_the_pool": sorted(
                    {k for pool in self.study_pools for k in pool["candidates"]} - keys
                ),
            },
        }

    def charge(self, row: dict, method: str, cost: Cost, criterion: Any = None) -> None:
        """What ``method`` spent for this row's (dataset, seed): its cost columns (bench.cost). Where
        the selection criterion changes what is charged (which setting was chosen), per ``criterion``;
        otherwise one charge stands for every criterion."""
        crit = (None, None) if criterion is None else (float(criterion.floor), criterion.rule)
        self.costs[(*_row_key(row, method), *crit)] = (row, method, cost, crit)

    def cost_table(self) -> pd.DataFrame:
        """costs.csv: each method's cost per (dataset, seed), with the wall seconds of its training as
        the cache records measured it and the device it ran on (not in results.csv: seconds differ
        between machines and runs, results.csv must not)."""
        device = self.runtime.get("device", "")
        records = [
            {
                "suite": self.cfg.name,
                **row,
                "method": method,
                "floor": crit[0],
                "selection_rule": crit[1],
                **cost.columns(),
                "train_seconds": round(cost.seconds, 2),
                "device": device,
            }
            for row, method, cost, crit in self.costs.values()
        ]
        return pd.DataFrame(records)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def table(self) -> pd.DataFrame:
        rows = []
        first: dict[tuple, Cost] = {}  # (row, method) -> its first charge: for rows of no criterion
        for key, (_, _, cost, _) in self.costs.items():
            first.setdefault(key[:-2], cost)
        for row in self.rows:
            key = _row_key({k: row[k] for k in ROW_FIELDS if k in row}, row["method"])
            floor = None if row["floor"] is None else float(row["floor"])
            spent = self.costs.get((*key, floor, row["selection_rule"])) or self.costs.get((*key, None, None))
            cost = spent[2] if spent else first.get(key)
            rows.append({**row, **(cost.columns() if cost else {})})
        table = pd.DataFrame(rows, columns=RESULT_COLUMNS + COST_COLUMNS)
        counts = [c for c in COST_COLUMNS if c != "gflops"]
        table[counts] = table[counts].astype("Int64")  # integers, blank where unknown (not 1234.0)
        return table

    def finish(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "results.csv", self.table().to_csv(index=False))
        write_text_atomic(self.out / "curves.csv", pd.DataFrame(self.curves).to_csv(index=False))
        if self.costs:
            write_text_atomic(self.out / "costs.csv", self.cost_table().to_csv(index=False))
        if self.ablation:
            write_text_atomic(self.out / "ablation.csv", pd.DataFrame(self.ablation).to_csv(index=False))
        for name, rows in ((THRESHOLD_FILE, self.thresholds), (POOLS_FILE, self.pools)):
            if rows:
                write_text_atomic(self.out / name, pd.DataFrame(rows).to_csv(index=False))
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
            "forward_passes": dict(self.passes),  # computed this run (bench.results.RunRecorder.passes)
        }
        if self.thresholds or self.pools or self.study_pools:
            manifest["studies"] = self._studies_manifest()
        write_json_atomic(self.out / "manifest.json", manifest)
