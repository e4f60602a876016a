"""Run a suite on a cluster (SLURM through submitit): one job per work unit, then a local assembly.

Why this shape: every expensive product of a run (backbones, candidate pools, Original/Retrain and
baseline models, evaluations) lands in the content-addressed cache, keyed by what it depends on and
computed under a per-entry lock. So the jobs only fill the cache, in parallel, one unit each
(``bench.units``: a fine-tune, a trained model, a sweep); then the ordinary ``run`` over the whole
suite finds everything cached and writes the one results.csv / manifest / report, exactly as a
single-machine run would. Phases are job arrays; on SLURM each waits for the one before
(``--dependency=afterany``: a unit whose dependency failed computes it itself). A preempted or
timed-out job is requeued and resumes from the cache. The cache and the run folder must be on a
filesystem the nodes share.

Each unit leaves ``RUN_DIR/units/LABEL/state.json`` (running / done / failed / killed, host, pid, job
id), which ``negmerge-bench status RUN_DIR`` reads. A cancelled job (``scancel``) records its running
unit as killed and is not requeued; a rerun of the same command submits it again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.io import write_json_atomic
from bench.units import Unit

EXECUTORS = ("slurm", "local", "debug")


@dataclass
class ClusterOptions:
    executor: str = "slurm"  # "local" runs jobs as subprocesses here, "debug" in this process (tests)
    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int | None = None  # default: 1 on SLURM, 0 for local / debug jobs on this machine
    cpus_per_task: int = 8
    mem_gb: float | None = None
    array_parallelism: int | None = None  # at most this many jobs of an array at once (default: all)
    units_per_job: int = 1  # pack several small units into one job, run one after the other
    extra: dict[str, Any] = field(default_factory=dict)  # more slurm_* parameters, e.g. {"slurm_account": "x"}


def unit_dir(run_dir: Path, unit: Unit) -> Path:
    return Path(run_dir) / "units" / unit.label


def write_state(run_dir: Path, unit: Unit, state: str, **extra: Any) -> None:
    job_id = None
    try:
        import submitit

        job_id = submitit.JobEnvironment().job_id
    except Exception:  # not inside a submitit job (debug executor, tests)
        pass
    record = {
        "unit": unit.to_dict(),
        "state": state,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job_id,
        "updated": time.time(),
        **extra,
    }
    write_json_atomic(unit_dir(run_dir, unit) / "state.json", record)


def job_environment(cache: Path, expect_gpu: bool) -> dict[str, str]:
    """What a unit job sets before any work: the shared cache, whatever the node's default; torch.compile's
    inductor cache inside it (every job reuses the kernels the first one compiled, instead of compiling
    them again); and, for a job given GPUs, that one is expected (``device: auto`` then fails rather
    than running on the CPU)."""
    env = {"NEGMERGE_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(Path(cache) / "inductor")}
    if expect_gpu:
        env["NEGMERGE_EXPECT_GPU"] = "1"
    return env


class CancelRecorder:
    """While a job runs its units: SIGTERM (``scancel``, or a preemption's first signal) records the unit
    that is running as killed, then does what was done before (submitit logs and ignores it; Slurm's
    SIGKILL follows after ``KillWait``).

    Why: a cancelled job leaves no result and its process is gone, which ``status`` could only tell on
    the node that ran it (a dead pid); the recorded state says it from anywhere. Nothing is requeued on
    SIGTERM (submitit requeues only on its own timeout/preemption signal, USR2), so the cancel sticks:
    the unit stays killed until a rerun submits it again. Installed only in the main thread (signal
    handlers live there); the previous handler is put back after.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.current: Unit | None = None
        self.received: str | None = None
        self._previous: Any = None

    def __enter__(self) -> CancelRecorder:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        if self.current is not None:
            write_state(self.run_dir, self.current, "killed", error=f"{self.received}: cancelled or preempted")
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # no one else handles it: end as SIGTERM would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class UnitJob:
    """Units of a suite, as one submitit job: fills the shared cache; checkpointable by requeueing."""

    def __init__(
        self,
        suite: str,
        overrides: list[str],
        units: list[Unit],
        run_dir: Path,
        cache: Path,
        expect_gpu: bool = False,
    ) -> None:
        self.suite, self.overrides, self.units = suite, overrides, units
        self.run_dir, self.cache, self.expect_gpu = Path(run_dir), Path(cache), expect_gpu

    def __call__(self) -> list[str]:
        from bench.config import load_suite
        from bench.runner import run_suite

        os.environ.update(job_environment(self.cache, self.expect_gpu))
        cfg = load_suite(self.suite, self.overrides)
        done: list[str] = []
        with CancelRecorder(self.run_dir) as cancel:
            for unit in self.units:
                if cancel.received:
                    break  # cancelled between units: the rest stay unstarted, and a rerun submits them
                write_state(self.run_dir, unit, "running")
                cancel.current = unit
                if cancel.received:  # arrived while "running" was being written
                    write_state(self.run_dir, unit, "killed", error=f"{cancel.received}: cancelled or preempted")
                    break
                try:
                    run_suite(cfg, unit_dir(self.run_dir, unit), self.cache, unit)
                except BaseException as exc:
                    cancel.current = None
                    state = "killed" if cancel.received else "failed"  # e.g. its data workers were signalled
                    write_state(self.run_dir, unit, state, error=f"{type(exc).__name__}: {exc}"[:500])
                    raise
                cancel.current = None
                write_state(self.run_dir, unit, "done")
                done.append(unit.label)
        return done

    def checkpoint(self) -> Any:
        """Preempted or out of time: requeue the same job; it resumes from the cache."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def resolved_gpus(opts: ClusterOptions) -> int:
    """GPUs per job; jobs on this machine (local / debug) that ask for one fail here, before any
    submission, when torch sees none."""
    gpus = opts.gpus_per_node if opts.gpus_per_node is not None else (1 if opts.executor == "slurm" else 0)
    if gpus < 0:
        raise BenchError(f"--gpus-per-node must be >= 0, got {gpus}")
    if gpus >= 1 and opts.executor != "slurm":
        import torch

        if torch.cuda.device_count() < gpus:
            raise BenchError(
                f"--gpus-per-node {gpus}: {opts.executor} jobs run on this machine, where torch sees "
                f"{torch.cuda.device_count()} CUDA devices; pass --gpus-per-node 0 to run them on the CPU"
            )
    return gpus


def write_plan(run_dir: Path, suite: str, overrides: list[str], phases: list[list[Unit]]) -> None:
    write_json_atomic(Path(run_dir) / "units" / "plan.json", _plan(suite, overrides, phases))


def _plan(suite: str, overrides: list[str], phases: list[list[Unit]]) -> dict[str, Any]:
    return {"suite": suite, "overrides": overrides, "phases": [[u.to_dict() for u in p] for p in phases]}


def finished_units(run_dir: Path, suite: str, overrides: list[str], phases: list[list[Unit]]) -> set[Unit]:
    """The units a rerun of the same plan need not submit again (done last time), and (re)write the
    plan. Another plan in the run folder: none (its units' states belong to other work). Skipping is
    only about jobs: were a product gone from the cache, the unit that needs it recomputes it."""
    plan_file = Path(run_dir) / "units" / "plan.json"
    same = plan_file.is_file() and json.loads(plan_file.read_text()) == _plan(suite, overrides, phases)
    write_plan(run_dir, suite, overrides, phases)
    if not same:
        return set()
    done = {row["unit"] for row in unit_status(run_dir) if row["state"] == "done"}
    return {u for phase in phases for u in phase if u.label in done}


def submit_units(
    suite: str, overrides: list[str], phases: list[list[Unit]], out: Path, cache: Path, opts: ClusterOptions, wait: bool
) -> list[Any]:
    """Submit every phase as a job array (one job per ``units_per_job`` units); returns all jobs.

    SLURM: each phase depends on the one before (afterany), so everything is submitted at once and
    ``wait=False`` may return at once. Other executors run here: each phase is waited for."""
    try:
        import submitit
    except ImportError as exc:
        raise BenchError("cluster runs need submitit: pip install 'negmerge-bench[cluster]'") from exc
    if opts.executor not in EXECUTORS:
        raise BenchError(f"--executor: unknown executor {opts.executor!r}; known: {', '.join(EXECUTORS)}")
    if opts.executor == "slurm" and not opts.partition:
        raise BenchError("--partition: SLURM jobs need a partition, e.g. --partition gpu")
    if opts.executor != "slurm" and not wait:
        raise BenchError("--no-wait: only SLURM jobs outlive this command; drop --no-wait for --executor local/debug")
    if opts.units_per_job < 1:
        raise BenchError(f"--units-per-job must be >= 1, got {opts.units_per_job}")
    gpus = resolved_gpus(opts)
    finished = finished_units(out, suite, overrides, phases)
    if finished:
        print(
            f"[negmerge-bench] {len(finished)} units done by an earlier submission: not submitted again",
            file=sys.stderr,
        )
    phases = [todo for todo in ([u for u in phase if u not in finished] for phase in phases) if todo]
    if opts.executor == "slurm":
        from bench.slurm_queue import install

        install()  # one line, not a warning per poll, where sacct cannot answer; squeue instead
    executor = submitit.AutoExecutor(folder=str(Path(out) / "cluster-logs" / "%j"), cluster=opts.executor)
    base: dict[str, Any] = {
        "name": f"negmerge-{Path(suite).stem}",
        "timeout_min": opts.timeout_min,
        "gpus_per_node": gpus,
        "cpus_per_task": opts.cpus_per_task,
        **opts.extra,
    }
    if opts.partition:
        base["slurm_partition"] = opts.partition
    if opts.mem_gb:
        base["mem_gb"] = opts.mem_gb
    jobs: list[Any] = []
    previous: list[Any] = []
    for phase in phases:
        groups = [phase[i : i + opts.units_per_job] for i in range(0, len(phase), opts.units_per_job)]
        params = dict(base, slurm_array_parallelism=opts.array_parallelism or len(groups))
        if previous and opts.executor == "slurm":
            ids = sorted({str(j.job_id).split("_")[0] for j in previous})
            extra = dict(base.get("slurm_additional_parameters", {}), dependency="afterany:" + ":".join(ids))
            params["slurm_additional_parameters"] = extra
        elif previous:
            _wait(previous)
        executor.update_parameters(**params)
        with executor.batch():
            submitted = [executor.submit(UnitJob(suite, overrides, g, out, cache, gpus >= 1)) for g in groups]
        jobs += submitted
        previous = submitted
    if wait:
        _wait(previous if opts.executor == "slurm" else jobs)
    return jobs


def _wait(jobs: list[Any]) -> None:
    """Wait for every job; then one error naming the jobs that failed or were killed (their units are
    resumable: a rerun of the same command finds all that finished in the cache)."""
    failed = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # the job's traceback, or "has not produced any output" (killed)
            failed.append((job.job_id, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
    if failed:
        first_id, first_error = failed[0]
        raise BenchError(
            f"{len(failed)} of {len(jobs)} jobs failed or were killed (job {first_id}: {first_error}); "
            "`negmerge-bench status RUN_DIR` names each unit and its log; rerun the same command to resume from the cache"
        )


# -- status --------------------------------------------------------------------------------------------


def unit_status(run_dir: Path) -> list[dict[str, Any]]:
    """Every planned unit with its state: done, running, failed, killed (recorded on SIGTERM, or its
    process is gone), missing."""
    plan_file = Path(run_dir) / "units" / "plan.json"
    if not plan_file.is_file():
        raise BenchError(f"{run_dir}: no units/plan.json; status reads a run submitted with --executor")
    plan = json.loads(plan_file.read_text())
    rows, queue = [], _Queue()
    for phase_no, phase in enumerate(plan["phases"], start=1):
        for d in phase:
            unit = Unit.from_dict(d)
            state_file = unit_dir(run_dir, unit) / "state.json"
            row = {"phase": phase_no, "unit": unit.label, "state": "missing", "job": "", "log": ""}
            if state_file.is_file():
                s = json.loads(state_file.read_text())
                row.update(state=s["state"], job=s.get("job_id") or "", error=s.get("error", ""))
                if s.get("job_id"):
                    row["log"] = str(Path(run_dir) / "cluster-logs" / str(s["job_id"]))
                if s["state"] == "running" and _gone(s, queue):
                    row["state"] = "killed"
            rows.append(row)
    return rows


class _Queue:
    """The SLURM jobs still queued or running, asked of ``squeue`` once, and only when needed (a unit
    recorded running on another host); None where there is no ``squeue`` to ask."""

    def __init__(self) -> None:
        self._jobs: set[str] | None = None
        self._asked = False

    def jobs(self) -> set[str] | None:
        if not self._asked:
            self._asked = True
            command = ["squeue", "--noheader", "--array", "--format=%i"]
            try:
                listed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
                self._jobs = set(listed.stdout.split())
            except (OSError, subprocess.SubprocessError):
                self._jobs = None
        return self._jobs


def _gone(state: dict[str, Any], queue: _Queue) -> bool:
    """A unit recorded running whose process is gone (killed without a word: SIGKILL, out of memory, a
    lost node): on this host its pid is dead; on another, SLURM no longer lists its job."""
    if state["host"] == socket.gethostname():
        return not _alive(state["pid"])
    listed = queue.jobs() if state.get("job_id") else None
    return listed is not None and str(state["job_id"]) not in listed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
