"""Selection, for both protocols (docs/metrics.md#selection). Everything is chosen on validation
numbers, never on test data.

The floor rule: among the points (lambdas of a sweep, settings of a trained method, candidates of the
pool) whose control Val top-1 >= floor x the reference's, the lowest forget Val top-1; ties go to the
first point (the smaller lambda); none feasible is an explicit outcome, never a silent fallback.
The avg-gap rule (Protocol B): the lowest Avg. Gap to Retrain on Val; ties go to the first point.
The control-only rule reads no forget data: along a lambda grid, the largest lambda whose control Val
top-1 >= floor x the reference's; among points without a common lambda (settings, candidates), the
feasible one with the lowest control Val (the one that spends most of the control budget; ties: first).
Several (rule, floor) criteria select from the same Val numbers (``criteria``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FLOOR_RULES = ("control-floor", "floor")  # the floor rule's name in Protocol A and in Protocol B
CONTROL_ONLY = "control_only"


@dataclass(frozen=True)
class Criterion:
    """One way to select: a rule and the control floor it keeps (avg_gap keeps none; its rows carry
    the first floor, as they always have)."""

    rule: str
    floor: float


def criteria(rules: Sequence[str], floors: Sequence[float]) -> list[Criterion]:
    """Every (rule, floor) a run reports, rule-major, in the order given: the first is the main table's."""
    out = []
    for rule in rules:
        out += [Criterion(rule, floors[0])] if rule == "avg_gap" else [Criterion(rule, f) for f in floors]
    return out


@dataclass(frozen=True)
class Selection:
    lam: float | None  # None: no lambda (a method without one, or none feasible)
    forget_val: float | None  # None: nothing was selected (no feasible lambda / setting)
    control_val: float | None
    at_grid_edge: bool  # the chosen lambda is the grid's largest: the grid may be too small
    reason: str = ""

    @property
    def feasible(self) -> bool:
        return self.forget_val is not None


def lambda_grid(start: float, stop: float, step: float) -> list[float]:
    """Inclusive grid, rounded so 0.05 steps give 0.35, not 0.35000000000000003."""
    n = int(round((stop - start) / step))
    return [round(start + i * step, 10) for i in range(n + 1)]


def lowest(values: Sequence[float | None]) -> int | None:
    """Index of the smallest value, ignoring None; ties go to the first; None when all are None."""
    best: int | None = None
    for i, value in enumerate(values):
        if value is not None and (best is None or value < values[best] - 1e-12):
            best = i
    return best


def floor_pick(forget: Sequence[float], control: Sequence[float], reference: float, floor: float) -> int | None:
    """The floor rule: the lowest ``forget`` among points whose ``control`` >= floor x ``reference``."""
    minimum = floor * reference
    return lowest([f if c + 1e-9 >= minimum else None for f, c in zip(forget, control)])


def control_only_pick(control: Sequence[float], reference: float, floor: float, along_lambda: bool) -> int | None:
    """The control-only rule; it is given no forget numbers. ``along_lambda``: ``control`` is in
    increasing lambda and the last feasible point wins; otherwise the feasible point with the lowest
    control (ties: the first)."""
    minimum = floor * reference
    feasible = [c + 1e-9 >= minimum for c in control]
    if along_lambda:
        return max((i for i, ok in enumerate(feasible) if ok), default=None)
    return lowest([c if ok else None for c, ok in zip(control, feasible)])


def pick(
    rule: str,
    forget: Sequence[float],
    control: Sequence[float],
    reference: float,
    floor: float,
    along_lambda: bool,
) -> int | None:
    """The point a floor-keeping rule selects (``FLOOR_RULES`` or ``CONTROL_ONLY``)."""
    if rule == CONTROL_ONLY:
        return control_only_pick(control, reference, floor, along_lambda)
    if rule in FLOOR_RULES:
        return floor_pick(forget, control, reference, floor)
    raise ValueError(f"unknown selection rule {rule!r}")


def select_lambda(
    lambdas: Sequence[float],
    forget_val: Sequence[float],
    control_val: Sequence[float],
    control_zero_shot: float,
    floor: float,
    rule: str = "control-floor",
) -> Selection:
    if not (len(lambdas) == len(forget_val) == len(control_val)) or not lambdas:
        raise ValueError("lambdas, forget_val and control_val must be non-empty and of equal length")
    order = sorted(range(len(lambdas)), key=lambda j: lambdas[j])
    forget, control = [forget_val[j] for j in order], [control_val[j] for j in order]
    chosen = pick(rule, forget, control, control_zero_shot, floor, along_lambda=True)
    best = None if chosen is None else order[chosen]
    if best is None:
        return Selection(None, None, None, False, f"no lambda keeps control Val >= {floor} x {control_zero_shot:.2f}")
    return Selection(
        float(lambdas[best]), float(forget_val[best]), float(control_val[best]), bool(lambdas[best] == max(lambdas))
    )


def best_single(selections: Sequence[Selection], rule: str = "control-floor") -> int | None:
    """Index of the candidate whose selected point has the lowest forget Val (feasible only; ties: first);
    the control-only rule: the lowest control Val instead, reading no forget number."""
    if rule == CONTROL_ONLY:
        return lowest([s.control_val if s.feasible else None for s in selections])
    return lowest([s.forget_val for s in selections])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
