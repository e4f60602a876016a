"""Run a suite on a cluster (SLURM through submitit): one job per seed, then a local assembly.

Why this shape: every expensive product of a run (backbones, candidate pools, Original/Retrain and
baseline models, evaluations) lands in the content-addressed cache, keyed by what it depends on. So
the per-seed jobs only have to fill the cache, in parallel; the final ``negmerge-bench run`` over all
seeds then finds everything cached and writes the one results.csv / manifest / report in seconds,
exactly as a single-machine run would. A job that is preempted or times out is resubmitted and
resumes from the cache. The cache and the log folder must be on a filesystem the nodes share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError

EXECUTORS = ("slurm", "local", "debug")


@dataclass
class ClusterOptions:
    executor: str = "slurm"  # "local" runs jobs as subprocesses here, "debug" in this process (tests)
    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more slurm_* parameters, e.g. {"slurm_account": "x"}


class SeedJob:
    """One seed of a suite, as a submitit job: fills the shared cache; checkpointable by requeueing."""

    def __init__(self, suite: str, overrides: list[str], seed: int, out: Path, cache: Path) -> None:
        self.suite, self.overrides, self.seed, self.out, self.cache = suite, overrides, seed, Path(out), Path(cache)

    def __call__(self) -> str:
        from bench.cli import main

        os.environ["NEGMERGE_CACHE"] = str(self.cache)  # the shared cache, whatever the node's default
        argv = ["run", self.suite, "--out", str(self.out), "--no-report"]
        for assignment in [*self.overrides, f"seeds=[{self.seed}]"]:  # last: the job's seed wins
            argv += ["--set", assignment]
        if main(argv) != 0:
            raise BenchError(f"seed {self.seed} of {self.suite} failed; see this job's log")
        return str(self.out)

    def checkpoint(self) -> Any:
        """Preempted or out of time: requeue the same job; it resumes from the cache."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit_seeds(suite: str, overrides: list[str], seeds: list[int], out: Path, cache: Path, opts: ClusterOptions):
    """Submit one SeedJob per seed as a job array; returns the submitit jobs."""
    try:
        import submitit
    except ImportError as exc:
        raise BenchError("cluster runs need submitit: pip install 'negmerge-bench[cluster]'") from exc
    if opts.executor not in EXECUTORS:
        raise BenchError(f"--executor: unknown executor {opts.executor!r}; known: {', '.join(EXECUTORS)}")
    if opts.executor == "slurm" and not opts.partition:
        raise BenchError("--partition: SLURM jobs need a partition, e.g. --partition gpu")
    executor = submitit.AutoExecutor(folder=str(out / "cluster-logs" / "%j"), cluster=opts.executor)
    params: dict[str, Any] = {
        "name": f"negmerge-{Path(suite).stem}",
        "timeout_min": opts.timeout_min,
        "gpus_per_node": opts.gpus_per_node,
        "cpus_per_task": opts.cpus_per_task,
        "slurm_array_parallelism": len(seeds),
        **opts.extra,
    }
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    executor.update_parameters(**params)
    jobs = []
    with executor.batch():
        for seed in seeds:
            jobs.append(executor.submit(SeedJob(suite, overrides, seed, out / "seeds" / f"seed{seed}", cache)))
    return jobs
