"""The threshold and sub-pool studies both protocols run on their pool (docs/protocols.md#studies):
which candidates a sub-pool holds, and the row each study point records. Nothing here trains: a
sub-pool is a subset of the pool's entries, so only merges and evaluations are new."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.config import PoolFilterCfg

THRESHOLD_FILE = "ablation_thresholds.csv"
POOLS_FILE = "ablation_pools.csv"


def pool_members(
    name: str,
    pool: PoolFilterCfg,
    entries: Sequence[Any],
    params_of: Callable[[Any], dict[str, Any] | None],
    forget_val: Callable[[], Sequence[float | None]],
) -> list[Any]:
    """The entries of sub-pool ``name``, in pool order. A filter keeps the entries whose
    hyperparameters (``params_of``) match; ``worst_forget_val: k`` keeps the k entries whose own
    selected forget Val (``forget_val()``, one per entry; None: no feasible lambda, the worst of all)
    is highest, ties to the earlier entry."""
    if pool.worst_forget_val is not None:
        k = pool.worst_forget_val
        if k > len(entries):
            raise BenchError(f"ablation.pools.{name}: worst_forget_val {k} is more than the {len(entries)} candidates")
        values = [math.inf if v is None else v for v in forget_val()]
        order = sorted(range(len(entries)), key=lambda i: (-values[i], i))
        keep = set(order[:k])
        return [e for i, e in enumerate(entries) if i in keep]
    members = []
    for entry in entries:
        params = params_of(entry)
        if params is None:
            raise BenchError(f"ablation.pools.{name}: candidate {entry.key} has no hyperparameters to filter")
        if pool.matches(params):
            members.append(entry)
    return members


def study_row(
    row: dict[str, Any],
    study: str,
    method: str,
    n: int,
    rate: float,
    sel,
    test: dict[str, float],
    forget_metric: str,
    control_metric: str,
    **tags: Any,
) -> dict[str, Any]:
    """One study point: its tags, the merge's consensus rate, the selection on Val, and the test
    metrics at the selected lambda (``forget_test`` / ``control_test`` named alike in both protocols)."""
    return {
        **row,
        "study": study,
        **tags,
        "method": method,
        "n": n,
        "consensus_rate": rate,
        "lam": sel.lam,
        "feasible": sel.feasible,
        "forget_val": sel.forget_val,
        "control_val": sel.control_val,
        "forget_test": test.get(forget_metric, math.nan),
        "control_test": test.get(control_metric, math.nan),
        **{f"test_{k}": v for k, v in sorted(test.items())},
    }
