"""A real single-node SLURM (Debian's slurmctld, slurmd, munge; started by the test): the reduced suite
as job arrays with dependencies, waited for and with ``--no-wait`` then a later assembly, a killed
array task reported by ``status`` and finished by a rerun; results identical to a single process.
Also, without SLURM: polling without accounting is one line, not a warning per poll."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.cluster import unit_status
from tests.slurm_cluster import ensure_slurm, single_node_slurm

# 4 fine-tunes + 1 gradient ascent, then 1 sweep: 6 jobs. The fine-tunes are long enough (seconds of
# training) that one is still running when the test kills it, however fast the machine
QUICK = ["--set", "forget=[sklearn-digits]", "--set", "finetune.grid.steps=[150, 300]"]
SLURM = ["--executor", "slurm", "--partition", "debug", "--gpus-per-node", "0", "--cpus-per-task", "1", "--mem-gb", "4"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, module_env):
    pytest.importorskip("submitit")
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    with single_node_slurm(tmp_path_factory.mktemp("slurm")) as env:
        module_env.setenv("SLURM_CONF", env["SLURM_CONF"])
        yield env


def _cold_cache(tiny_backbone: Path, path: Path) -> Path:
    shutil.copytree(tiny_backbone.parent, path / "backbones")
    return path


def _job_ids(run: Path) -> set[str]:
    return {json.loads(p.read_text())["job_id"] for p in (run / "units").glob("*/state.json")}


def _queue_empty(env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True, check=True)
        if not listed.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"jobs still queued after {timeout:.0f} s")


def _listed(env: dict[str, str], states: str) -> set[str]:
    """The jobs (array tasks as JOB_TASK) the queue lists in these states."""
    command = ["squeue", "--noheader", "--array", f"--states={states}", "--format=%i"]
    return set(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _job_record(env: dict[str, str], job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job], env=env, capture_output=True, text=True)
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)


def _kill_a_running_fine_tune(run: Path, env: dict[str, str], timeout: float = 300) -> tuple[str, str, int]:
    """``scancel`` (as a user would: SIGTERM, then SIGKILL after KillWait) one phase-1 array task that the
    queue lists as RUNNING and whose unit has started (state running, its process alive); wait until the
    process is gone and the queue no longer runs the task. Its unit label, job id and pid. A unit that
    finished before the cancel landed (only under extreme load) is not the killed one: the next is tried."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = _listed(env, "RUNNING")
        for state_file in sorted((run / "units").glob("finetune-*/state.json")):
            state = json.loads(state_file.read_text())
            job, pid = str(state["job_id"]), state["pid"]
            if state["state"] != "running" or job not in running or not _alive(pid):
                continue
            subprocess.run(["scancel", job], env=env, check=True)
            landed = time.monotonic() + 120
            while (_alive(pid) or job in _listed(env, "RUNNING,COMPLETING")) and time.monotonic() < landed:
                time.sleep(0.2)
            assert not _alive(pid), f"job {job}: its process outlived scancel by 120 s"
            after = json.loads(state_file.read_text())
            if after["state"] == "done":
                continue
            assert after["state"] == "killed" and after["pid"] == pid and "SIGTERM" in after["error"], after
            return state_file.parent.name, job, pid
        time.sleep(0.2)
    raise AssertionError("no fine-tuning unit could be killed while it ran")


@pytest.mark.integration
def test_a_real_slurm_runs_the_suite_as_job_arrays_and_resumes_a_killed_task(
    slurm, tiny_backbone, tmp_path, monkeypatch, capfd
):
    clock, times = time.perf_counter(), {}
    monkeypatch.setenv("NEGMERGE_CACHE", str(_cold_cache(tiny_backbone, tmp_path / "single-cache")))
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "single"), "--no-report", *QUICK]) == 0
    single = (tmp_path / "single" / "results.csv").read_bytes()
    times["single process"] = time.perf_counter() - clock

    # 1. submitted and waited for: two job arrays (5 fine-tuning jobs, then 1 sweep), then the assembly
    monkeypatch.setenv("NEGMERGE_CACHE", str(_cold_cache(tiny_backbone, tmp_path / "waited-cache")))
    capfd.readouterr()
    waited = tmp_path / "waited"
    start = time.perf_counter()
    assert main(["run", "mini-clip-tiny", "--out", str(waited), "--no-report", *QUICK, *SLURM]) == 0
    times["slurm, waited for (6 jobs)"] = time.perf_counter() - start
    err = capfd.readouterr().err
    assert err.count("sacct is unavailable") == 1 and "Bypassing sacct error" not in err  # said once, not per poll
    assert len(_job_ids(waited)) == 6 and {s["state"] for s in unit_status(waited)} == {"done"}
    tasks = [job for job in _job_ids(waited) if "_" in job]  # array tasks are JOB_TASK
    assert len(tasks) == 5 and len({job.split("_")[0] for job in tasks}) == 1  # phase 1: one array; phase 2: one job
    assert (waited / "results.csv").read_bytes() == single

    # 2. --no-wait returns at once; one running array task is killed; the later phase still runs
    monkeypatch.setenv("NEGMERGE_CACHE", str(_cold_cache(tiny_backbone, tmp_path / "later-cache")))
    later = tmp_path / "later"
    argv = ["run", "mini-clip-tiny", "--out", str(later), "--no-report", *QUICK, *SLURM]
    start = time.perf_counter()
    assert main([*argv, "--no-wait"]) == 0
    times["slurm --no-wait, submitting"] = time.perf_counter() - start
    assert not (later / "results.csv").exists()
    killed, job, pid = _kill_a_running_fine_tune(later, slurm)
    record = _job_record(slurm, job)  # the queue keeps an ended job for MinJobAge (300 s)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", record
    _queue_empty(slurm, timeout=900)
    times["slurm --no-wait, until the queue is empty"] = time.perf_counter() - start
    # the cancel stuck: neither Slurm nor submitit ran the task again (same process, still killed)
    state = json.loads((later / "units" / killed / "state.json").read_text())
    assert state["state"] == "killed" and state["pid"] == pid
    assert _job_record(slurm, job).get("Restarts", "0") == "0"
    capfd.readouterr()
    assert main(["status", str(later)]) == 0
    out = capfd.readouterr().out
    assert out.splitlines()[0] == "5 done, 0 running, 0 failed, 1 killed, 0 missing"
    killed_rows = [line for line in out.splitlines() if killed in line]
    assert len(killed_rows) == 1 and "killed" in killed_rows[0] and "SIGTERM" in killed_rows[0]
    start = time.perf_counter()
    assert main(["run", "mini-clip-tiny", "--out", str(later), "--no-report", *QUICK]) == 0  # the assembly
    times["later assembly"] = time.perf_counter() - start
    assembled = (later / "results.csv").read_bytes()

    # 3. the same command again: only the killed unit is submitted (one job); it finishes from the cache
    capfd.readouterr()
    before = {s["unit"]: s["job"] for s in unit_status(later)}
    start = time.perf_counter()
    assert main(argv) == 0
    times["rerun (1 job)"] = time.perf_counter() - start
    err = capfd.readouterr().err
    assert "5 units done by an earlier submission: not submitted again" in err and "] 1 jobs; logs in" in err
    states = {s["unit"]: s["state"] for s in unit_status(later)}
    assert set(states.values()) == {"done"}
    after = {s["unit"]: s["job"] for s in unit_status(later)}
    assert {u for u in after if after[u] != before[u]} == {killed}
    assert (later / "results.csv").read_bytes() == assembled  # the rerun found everything in the cache
    with capfd.disabled():
        print("\n" + "\n".join(f"{name}: {seconds:.1f} s" for name, seconds in times.items()))
        print(f"killed {killed} (job {job}, CANCELLED, Restarts=0), recovered by job {after[killed]}")
    # the killed fine-tune is made again by the sweep unit (afterany), while its membership attacks are
    # scored on a background thread: identical bytes need the attack to leave the global RNGs, which
    # RandAugment reads during that fine-tune, alone (bench.metrics)
    assert assembled == single


def _fake_command(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_without_accounting_the_queue_is_read_and_sacct_is_named_once(tmp_path, monkeypatch, capsys):
    """sacct failing as it does without accounting storage: one line, then squeue's states; a job the
    queue no longer lists has ended (so a killed job is not waited for forever)."""
    pytest.importorskip("submitit")
    from bench.slurm_queue import ENDED, QueueWatcher

    _fake_command(tmp_path, "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1\n")
    _fake_command(tmp_path, "squeue", "printf '7_0|RUNNING|vm\\n7_1|PENDING|\\n8|CANCELLED|vm\\n'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    watcher = QueueWatcher(delay_s=0)
    for job in ("7_0", "7_1", "8", "9"):
        watcher.register_job(job)
    states = [{j: watcher.get_state(j, mode="force") for j in ("7_0", "7_1", "8", "9")} for _ in range(3)]
    assert states[0] == {"7_0": "RUNNING", "7_1": "PENDING", "8": "CANCELLED", "9": ENDED}
    assert states[1] == states[0] == states[2]
    err = capsys.readouterr().err
    assert err.count("sacct is unavailable (Slurm accounting storage is disabled)") == 1
    assert watcher.is_done("8", mode="cache") and watcher.is_done("9", mode="cache")
    assert not watcher.is_done("7_0", mode="cache")


def test_run_help_says_the_executor_runs_work_units(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "run the suite's work units" in help_text and "per-seed" not in help_text
