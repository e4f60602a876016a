"""SISA (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): exact unlearning by sharded, sliced
training. The training set is split into S disjoint shards, each shard into R slices; constituent k is
trained incrementally, step r on the union of its slices 1..r, with a checkpoint after every step.
Forgetting retrains only the shards that hold a forget sample, from the checkpoint before the first
slice that holds one. Prediction aggregates the S constituents.

This module holds what SISA *is* (assignment, lineage, unlearning plan, aggregation); the protocol
supplies the training step (``fit``) and owns its loop, cache and cost of one step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

AGGREGATES = ("vote", "mean_softmax")


@dataclass(frozen=True)
class SisaSetting:
    """One SISA configuration: S shards, R slices per shard, the aggregation and the assignment seed."""

    shards: int
    slices: int
    aggregate: str = "vote"
    seed: int = 0  # the shard/slice assignment's seed (recorded on the manifest)

    def __post_init__(self) -> None:
        check(self.shards, self.slices, self.aggregate)

    @property
    def name(self) -> str:
        """The result row's method name: one row per (S, R) of a grid."""
        return f"sisa[S={self.shards},R={self.slices}]"


def check(shards: int, slices: int, aggregate: str) -> None:
    """Raise ValueError naming the field when a value cannot describe a SISA ensemble."""
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"sisa.shards must be integers >= 1, got {shards!r}")
    if not isinstance(slices, int) or slices < 1:
        raise ValueError(f"sisa.slices must be integers >= 1, got {slices!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"sisa.aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")


def assign(n: int, shards: int, slices: int, seed: int) -> list[list[torch.Tensor]]:
    """``out[k][r]``: the training indices of slice r of shard k. A seeded permutation of 0..n-1 is cut
    into S shards (sizes differ by at most one) and each shard into R slices; every slice is sorted, so
    the data a step sees is a set, not an order. Disjoint and covering by construction."""
    if shards * slices > n:
        raise ValueError(
            f"sisa: {shards} shards x {slices} slices need at least {shards * slices} training samples, got {n}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [[s.sort().values for s in shard.tensor_split(slices)] for shard in order.tensor_split(shards)]


def slice_epochs(epochs: float, slices: int) -> float:
    """Epochs of each incremental step, as SISA prescribes: step r trains on slices 1..r, so with
    e' = 2E / (R + 1) per step the samples processed, e' x (1 + 2 + ... + R) x |slice|, equal E epochs
    over the whole shard; R = 1 is plain training for E epochs."""
    return 2.0 * epochs / (slices + 1)


def seen(slices: Sequence[torch.Tensor], r: int, forget: torch.Tensor | None = None) -> torch.Tensor:
    """The data step ``r`` (0-based) trains on: the union of slices 0..r, less ``forget``, sorted."""
    union = torch.cat(list(slices[: r + 1])).sort().values
    return union if forget is None else union[~torch.isin(union, forget)]


def first_affected(slices: Sequence[torch.Tensor], forget: torch.Tensor) -> int | None:
    """The first slice (0-based) holding a forget sample, or None when the shard holds none."""
    return next((r for r, s in enumerate(slices) if torch.isin(s, forget).any()), None)


def train_chain(slices: Sequence[torch.Tensor], fit: Callable[[Any, torch.Tensor], Any], forget=None) -> list[Any]:
    """One constituent's checkpoints, one per slice: ``fit(previous or None, indices)`` trains the
    previous checkpoint on ``seen(slices, r, forget)``. Unlearning is the same chain with ``forget``
    given: the steps before the first affected slice see the same data, so a cache keyed by the data
    returns them untouched and only the steps from that slice on are trained. A step with no data left
    keeps the previous checkpoint (None while nothing was trained)."""
    state, out = None, []
    for r in range(len(slices)):
        data = seen(slices, r, forget)
        if len(data):
            state = fit(state, data)
        out.append(state)
    return out


@dataclass(frozen=True)
class UnlearningCost:
    """What unlearning retrains: shards, incremental steps (slices) and samples processed."""

    shards: int
    slices: int
    samples: int
    per_shard: tuple[tuple[int, int], ...]  # (shard, first affected slice), for the affected shards


def unlearning_cost(
    assignment: Sequence[Sequence[torch.Tensor]], forget: torch.Tensor, samples_of: Callable[[int], int]
) -> UnlearningCost:
    """Counted from the assignment alone (a cached rerun counts the same): each affected shard retrains
    its steps from the first affected slice to the last; ``samples_of(n)`` is what the protocol's loop
    processes in one step on n samples."""
    affected, steps, samples = [], 0, 0
    for k, slices in enumerate(assignment):
        first = first_affected(slices, forget)
        if first is None:
            continue
        affected.append((k, first))
        for r in range(first, len(slices)):
            n = len(seen(slices, r, forget))
            steps += 1 if n else 0
            samples += samples_of(n) if n else 0
    return UnlearningCost(len(affected), steps, samples, tuple(affected))


# -- prediction --------------------------------------------------------------------------------------
def mean_softmax(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.softmax(z.float(), dim=-1) for z in member_logits]).mean(0)


def aggregate(member_logits: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Scores whose argmax is the ensemble's label. ``vote``: each constituent's label is one vote; a
    tie between classes with equal votes goes to the larger mean softmax (added at half weight, so it
    never outweighs one vote), then to the lower class index (argmax takes the first maximum).
    ``mean_softmax``: the mean of the constituents' softmax."""
    check(1, 1, how)
    probs = mean_softmax(member_logits)
    if how == "mean_softmax":
        return probs
    votes = torch.zeros_like(probs)
    for z in member_logits:
        votes.scatter_add_(1, z.argmax(-1, keepdim=True), torch.ones_like(probs[:, :1]))
    return votes + 0.5 * probs


def attack_logits(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """What the membership attack reads: log of the mean softmax (its softmax is the mean softmax; a zero
    probability is clamped to the smallest float so a loss stays finite)."""
    return mean_softmax(member_logits).clamp_min(torch.finfo(torch.float32).tiny).log()


@dataclass(frozen=True)
class Ensemble:
    """SISA's model: the constituents and how their outputs combine (the protocol evaluates each one)."""

    members: tuple[Any, ...]
    how: str
