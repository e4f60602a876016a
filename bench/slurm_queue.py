"""Follow SLURM jobs with ``squeue`` where ``sacct`` cannot answer (no accounting storage).

Why: submitit asks ``sacct`` for job states. On the many small clusters without accounting storage
that fails on every poll, and submitit logs a warning each time ("Bypassing sacct error ... Slurm
accounting storage is disabled") and never learns a state: a job that was cancelled or killed before
writing its result would be waited for forever. This watcher asks ``sacct`` once; if it cannot answer,
it says so in one line and reads the queue instead: ``squeue --states=all`` lists queued, running and
recently finished jobs (for ``MinJobAge``, 300 s by default); a job the queue no longer lists has
ended, and submitit then reads its result or reports that it left none.
"""

from __future__ import annotations

import subprocess
import sys
import time
import typing as tp

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

ENDED = "ENDED"  # not listed any more: finished one way or another (not one of submitit's incomplete states)


class QueueWatcher(SlurmInfoWatcher):
    """submitit's SLURM watcher, falling back to ``squeue`` (once, with one message) without ``sacct``."""

    def __init__(self, delay_s: int = 30) -> None:
        super().__init__(delay_s=delay_s)
        self.use_squeue = False

    def update(self) -> None:
        if self._make_command() is None:
            return
        if not self.use_squeue:
            try:
                self._num_calls += 1
                self._output = subprocess.check_output(self._make_command(), stderr=subprocess.PIPE)
                self._info_dict.update(self.read_info(self._output))
            except (OSError, subprocess.CalledProcessError) as exc:
                why = getattr(exc, "stderr", b"") or str(exc)
                why = why.decode(errors="replace") if isinstance(why, bytes) else why
                print(
                    f"[negmerge-bench] sacct is unavailable ({why.strip() or exc}); following the jobs with squeue",
                    file=sys.stderr,
                )
                self.use_squeue = True
        if self.use_squeue:
            self._read_queue()
        self._after_update()

    def _read_queue(self) -> None:
        self._num_calls += 1
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N"]
        try:
            output = subprocess.check_output(command, stderr=subprocess.DEVNULL, text=True)
        except (OSError, subprocess.CalledProcessError):
            return  # the controller is busy or restarting: keep the states we had, ask again next time
        listed: dict[str, dict[str, str]] = {}
        for line in output.splitlines():
            job_id, _, rest = line.strip().partition("|")
            state, _, nodes = rest.partition("|")
            if job_id:
                listed[job_id] = {"JobID": job_id, "State": state, "NodeList": nodes}
        for job_id in self._registered - self._finished:
            self._info_dict[job_id] = listed.get(job_id, {"JobID": job_id, "State": ENDED, "NodeList": ""})

    def _after_update(self) -> None:
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


def install() -> QueueWatcher:
    """Make every SLURM job submitit creates (single jobs and array tasks) use one ``QueueWatcher``."""
    watcher = SlurmJob.watcher
    if not isinstance(watcher, QueueWatcher):
        watcher = QueueWatcher()
        SlurmJob.watcher = watcher  # submitit shares one watcher per job class; array tasks are SlurmJobs
    return tp.cast(QueueWatcher, watcher)
