"""Scale-out: one job per work unit, a cache that many processes share (per-entry locks), status."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bench.cli import main
from bench.cluster import unit_status, write_plan, write_state
from bench.pool import CandidatePool
from bench.units import Unit

QUICK = ["--set", "forget=[sklearn-digits]"]  # one forget dataset: 4 candidates, 1 gradient ascent


def _cold_cache(tiny_backbone: Path, path: Path) -> Path:
    """An empty cache except the pretrained tiny backbone."""
    shutil.copytree(tiny_backbone.parent, path / "backbones")
    return path


def _results(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv")


@pytest.mark.integration
def test_local_executor_runs_one_job_per_unit_and_assembles_the_same_results(tiny_backbone, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("NEGMERGE_CACHE", str(_cold_cache(tiny_backbone, tmp_path / "single-cache")))
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "single"), "--no-report", *QUICK]) == 0

    monkeypatch.setenv("NEGMERGE_CACHE", str(_cold_cache(tiny_backbone, tmp_path / "cluster-cache")))
    out = tmp_path / "cluster"
    argv = ["run", "mini-clip-tiny", "--out", str(out), "--no-report", "--executor", "local", *QUICK]
    tracked = ["--track", "tensorboard", "--set", f"tracking_dir={tmp_path / 'store'}"]
    assert main([*argv, "--array-parallelism", "2", *tracked]) == 0
    states = unit_status(out)
    kinds = [s["unit"].split("-")[0] for s in states]
    assert kinds.count("finetune") == 4 and kinds.count("baseline") == 1 and kinds.count("sweep") == 1
    assert {s["state"] for s in states} == {"done"}
    jobs = [d for d in (out / "cluster-logs").iterdir() if d.is_dir() and d.name != "%j"]  # %j: submitit's own
    assert len(jobs) == 4 + 1 + 1  # fine-tuning runs (gradient ascent included) + sweep units
    # each candidate was fine-tuned by its own job, not by the sweep or the assembly
    assembled = json.loads((out / "manifest.json").read_text())
    assert all(p["cached"] for p in assembled["pool"])
    computed_by = {p["computed_by"] for p in assembled["pool"]}
    assert len(computed_by) == 5  # five processes, one per fine-tuning unit
    pd.testing.assert_frame_equal(_results(out), _results(tmp_path / "single"))
    if importlib.util.find_spec("tensorboard"):  # logged once, by the assembly, not by the 6 jobs
        assert len(list((tmp_path / "store" / "tensorboard").rglob("events.out.tfevents.*"))) == 1


@pytest.mark.integration
def test_two_concurrent_runs_share_an_empty_cache(tmp_path):
    """Both finish; every pool entry (and the pretraining) is computed once between them."""
    env = {**os.environ, "NEGMERGE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench", "run", "mini-clip-tiny", "--out", str(tmp_path / name), "--no-report"]
            + QUICK,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-2000:]
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("a", "b")]
    computed = [{p["key"] for p in m["pool"] if not p["cached"]} for m in manifests]
    every = {p["key"] for p in manifests[0]["pool"]}
    assert computed[0] | computed[1] == every and not computed[0] & computed[1]
    # both runs name the same maker for every entry (a run's own process or one of its fine-tuning workers)
    makers = [{p["key"]: p["computed_by"] for p in m["pool"]} for m in manifests]
    assert makers[0] == makers[1]
    assert len(list((tmp_path / "cache" / "backbones").glob("*.safetensors"))) == 1
    pd.testing.assert_frame_equal(_results(tmp_path / "a"), _results(tmp_path / "b"))


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import bench.pool
    from bench.pool import CandidatePool

    root = Path(sys.argv[1])

    def stuck_save(state, path, metadata=None):  # killed halfway through writing the tensor file
        Path(str(path) + ".partial.tmp").write_bytes(b"\\0" * 64)
        (root / "writing").touch()
        time.sleep(600)

    bench.pool.save_state = stuck_save
    CandidatePool(root / "pool").get_or_create({"candidate": 1}, lambda: {"w": torch.ones(3)})
    """
)


def test_sigkill_while_writing_leaves_no_corrupt_entry_and_no_stale_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 120
    while not (tmp_path / "writing").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "writing").exists(), "the child never reached the write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    pool = CandidatePool(tmp_path / "pool")
    assert not list((tmp_path / "pool").glob("*.json"))  # no record: the entry does not count as done
    result: dict = {}
    rerun = threading.Thread(
        target=lambda: result.update(entry=pool.get_or_create({"candidate": 1}, lambda: {"w": torch.full((3,), 2.0)}))
    )
    rerun.start()
    rerun.join(timeout=30)
    assert not rerun.is_alive(), "the dead process's lock blocked the rerun"
    entry = result["entry"]
    assert entry.status == "ok" and not entry.cached
    assert torch.equal(load_file(entry.path)["w"], torch.full((3,), 2.0))


def test_a_waiting_process_gets_the_entry_computed_by_the_lock_holder(tmp_path):
    """The second caller blocks on the lock, then finds the entry: computed once."""
    pool = CandidatePool(tmp_path)
    started, calls = threading.Event(), []

    def slow():
        calls.append("first")
        started.set()
        time.sleep(1.0)
        return {"w": torch.ones(2)}

    first = threading.Thread(target=lambda: pool.get_or_create({"k": 1}, slow))
    first.start()
    started.wait(10)
    second = CandidatePool(tmp_path).get_or_create({"k": 1}, lambda: calls.append("second") or {"w": torch.zeros(2)})
    first.join()
    assert calls == ["first"] and second.cached and second.computed_by.endswith(f":{os.getpid()}")


def test_status_names_done_running_killed_and_missing_units(tmp_path, capsys):
    units = [Unit("finetune", 0, "mnist", index=i) for i in range(4)]
    write_plan(tmp_path, "mini-clip-tiny", [], [units, [Unit("sweep", 0, "mnist")]])
    write_state(tmp_path, units[0], "done")
    write_state(tmp_path, units[1], "running")  # this process: alive
    write_state(tmp_path, units[2], "failed", error="RuntimeError: boom")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(tmp_path, units[3], "running")
    state_file = tmp_path / "units" / units[3].label / "state.json"
    record = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**record, "pid": dead.pid}))
    states = {s["unit"]: s["state"] for s in unit_status(tmp_path)}
    assert list(states.values()) == ["done", "running", "failed", "killed", "missing"]
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "1 done, 1 running, 1 failed, 1 killed, 1 missing"
    assert "RuntimeError: boom" in out


def test_status_of_a_suite_prints_its_job_layout(capsys):
    assert main(["status", "clip-vit-b32"]) == 0
    out = capsys.readouterr().out
    assert "phase 1: 312 units (240 finetune, 72 ga)" in out and "phase 2: 8 units (8 sweep)" in out


def test_no_wait_needs_slurm(tmp_path, capsys):
    pytest.importorskip("submitit")
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path), "--executor", "local", "--no-wait"]) == 2
    assert "--no-wait: only SLURM jobs outlive this command" in capsys.readouterr().err


def test_a_rerun_of_the_same_plan_skips_the_units_that_are_done(tmp_path):
    from bench.cluster import finished_units

    units = [Unit("finetune", 0, "mnist", index=i) for i in range(3)]
    phases = [units, [Unit("sweep", 0, "mnist")]]
    assert finished_units(tmp_path, "mini-clip-tiny", [], phases) == set()  # first submission
    write_state(tmp_path, units[0], "done")
    write_state(tmp_path, units[1], "failed", error="RuntimeError: boom")
    assert finished_units(tmp_path, "mini-clip-tiny", [], phases) == {units[0]}
    # another plan in the same folder (other overrides): its states say nothing about this one
    assert finished_units(tmp_path, "mini-clip-tiny", ["seeds=[1]"], phases) == set()
    assert json.loads((tmp_path / "units" / "plan.json").read_text())["overrides"] == ["seeds=[1]"]


def test_a_cancelled_job_records_its_running_unit_as_killed_and_stops(tmp_path):
    """SIGTERM (what ``scancel`` sends first) to a job running its units: the running unit is recorded
    killed (status says so from any host), the next unit is not started, and the process then ends as
    SIGTERM would have (here no submitit handler was installed before ours)."""
    units = [Unit("finetune", 0, "mnist", index=i) for i in range(2)]
    write_plan(tmp_path, "mini-clip-tiny", [], [units])
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import bench.runner
        from bench.cluster import UnitJob
        from bench.units import Unit

        def slow(cfg, out, cache, unit):
            Path({str(tmp_path)!r}, "started").write_text(unit.label)
            time.sleep(60)

        bench.runner.run_suite = slow
        units = [Unit("finetune", 0, "mnist", index=i) for i in range(2)]
        UnitJob("mini-clip-tiny", [], units, Path({str(tmp_path)!r}), Path({str(tmp_path / "cache")!r}))()
        """
    )
    job = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "NEGMERGE_CACHE": str(tmp_path / "c")})
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == -signal.SIGTERM
    rows = {s["unit"]: s for s in unit_status(tmp_path)}
    assert rows[units[0].label]["state"] == "killed" and "SIGTERM" in rows[units[0].label]["error"]
    assert rows[units[1].label]["state"] == "missing"  # never started after the cancel


def test_the_cancel_recorder_hands_sigterm_on_to_the_handler_before_it(tmp_path):
    """Inside a submitit job SIGTERM is submitit's (it logs and ignores it, so a preempted job can still
    checkpoint on USR2): the recorder records the unit, then calls that handler, then puts it back."""
    from bench.cluster import CancelRecorder

    unit = Unit("finetune", 0, "mnist", index=0)
    write_plan(tmp_path, "mini-clip-tiny", [], [[unit]])
    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        handler = signal.getsignal(signal.SIGTERM)
        with CancelRecorder(tmp_path) as cancel:
            cancel.current = unit
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert seen == [signal.SIGTERM] and cancel.received == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is handler
        assert unit_status(tmp_path)[0]["state"] == "killed"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_status_asks_the_queue_about_units_running_on_another_host(tmp_path, monkeypatch):
    """From a login node a compute node's pid says nothing: a unit recorded running there is killed once
    SLURM no longer lists its job (SIGKILL, out of memory, a lost node), running while it does, and
    running where squeue cannot answer."""
    units = [Unit("finetune", 0, "mnist", index=i) for i in range(2)]
    write_plan(tmp_path, "mini-clip-tiny", [], [units])
    for unit, job in zip(units, ("7_0", "7_1"), strict=True):
        write_state(tmp_path, unit, "running")
        state_file = tmp_path / "units" / unit.label / "state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "host": "node-17", "job_id": job}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\nprintf '7_0\\n8\\n'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert [s["state"] for s in unit_status(tmp_path)] == ["running", "killed"]
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n")
    assert [s["state"] for s in unit_status(tmp_path)] == ["running", "running"]
