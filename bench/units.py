"""A run split into work units that match its cost, for clusters.

Protocol A: one unit per (seed, dataset, candidate) fine-tune and per (seed, dataset, setting) of
gradient ascent, then one per (seed, dataset) for merges, sweeps and test metrics. Protocol B: one per
trained Original (one in all, or one per seed), one per (seed) Retrain, one per (seed, baseline,
setting) and per (seed, pool candidate), then one per seed for selection, the task-vector family and
the metrics. Units of a phase are independent; a phase needs the products of the phases before it.

Ordering is only about parallelism, never correctness: a unit that finds a product missing computes
it itself, under the entry's lock (``bench.locks``), so nothing is computed twice and nothing breaks
when a dependency was skipped or failed. After the last phase, the ordinary ``run`` assembles
results.csv, the manifest and the report from the cache in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PRODUCE = ("finetune", "original", "retrain", "baseline", "candidate")  # make one cache entry


@dataclass(frozen=True)
class Unit:
    kind: str  # finetune | baseline | sweep (A); original | retrain | baseline | candidate | family (B)
    seed: int
    dataset: str | None = None  # Protocol A's forget dataset
    method: str | None = None  # Protocol B's baseline
    index: int | None = None  # the grid point (candidate or setting)

    @property
    def label(self) -> str:
        parts = [
            self.kind,
            f"seed{self.seed}",
            self.dataset,
            self.method,
            None if self.index is None else str(self.index),
        ]
        return "-".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(**d)


def plan_units(cfg) -> list[list[Unit]]:
    """The phases of a suite's units (each a list of independent units)."""
    from bench.protocols import PROTOCOLS

    return PROTOCOLS[cfg.protocol].load("units")(cfg)


def uses_pool(methods: list[str]) -> bool:
    """Whether any of ``methods`` is built from the candidate pool (single best or a merge)."""
    from baselines import TASK_VECTOR_KINDS, get_method

    return any(get_method(m).kind in TASK_VECTOR_KINDS for m in methods)


def training_methods(cfg) -> list[str]:
    """The suite's training-based methods, in the order it lists them."""
    from baselines import get_method

    return [m for m in cfg.methods if get_method(m).kind == "training"]


def clip_units(cfg) -> list[list[Unit]]:
    produce, sweeps = [], []
    for seed in cfg.seeds:
        for dataset in cfg.forget:
            if uses_pool(cfg.methods) and cfg.finetune is not None:  # pool.from: no fine-tuning units
                n = len(cfg.finetune.points(seed, cfg.finetune_per_dataset.get(dataset)))
                produce += [Unit("finetune", seed, dataset, index=j) for j in range(n)]
            for method in training_methods(cfg):
                n = len(cfg.baselines[method].points(seed))
                produce += [Unit("baseline", seed, dataset, method=method, index=j) for j in range(n)]
            sweeps.append(Unit("sweep", seed, dataset))
    return [phase for phase in (produce, sweeps) if phase]


def classic_units(cfg) -> list[list[Unit]]:
    originals = [Unit("original", seed) for seed in (cfg.seeds if cfg.original_per_seed else cfg.seeds[:1])]
    first = originals + [Unit("retrain", seed) for seed in cfg.seeds]
    second = []
    for seed in cfg.seeds:
        for method in training_methods(cfg):
            second += [
                Unit("baseline", seed, method=method, index=j) for j in range(len(cfg.baselines[method].points(seed)))
            ]
        if uses_pool(cfg.methods) and cfg.pool.from_ is None:  # pool.from: no fine-tuning units
            second += [Unit("candidate", seed, index=j) for j in range(len(cfg.pool.points(seed)))]
    family = [Unit("family", seed) for seed in cfg.seeds]
    return [phase for phase in (first, second, family) if phase]


def describe_plan(phases: list[list[Unit]]) -> str:
    """How many units of which kind, phase by phase (the job layout a cluster run submits)."""
    lines = []
    for i, phase in enumerate(phases, start=1):
        counts: dict[str, int] = {}
        for unit in phase:
            key = unit.method if unit.kind == "baseline" else unit.kind  # name the training method
            counts[key] = counts.get(key, 0) + 1
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        lines.append(f"phase {i}: {len(phase)} units ({kinds})")
    total = sum(len(p) for p in phases)
    lines.append(f"total: {total} units, then one assembly run (all cached)")
    return "\n".join(lines)
