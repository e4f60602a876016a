"""A real single-node SLURM cluster for the tests: Debian's munge, slurmctld and slurmd, started here.

Why: the cluster path (``bench/cluster.py``) is only trusted once real ``sbatch`` job arrays with
dependencies, ``squeue`` polling and ``scancel`` have run through it. Everything lives in one temporary
folder (munge key and socket, ``slurm.conf`` for this host, state, spool, logs); the daemons are this
process's children and are stopped after. ``SLURM_CONF`` points the client commands (and submitit) at
it. Needs root (the daemons run as root, the jobs as this user) and the Debian packages; ``ensure_slurm``
installs them with apt-get where it can, or says why not (the caller skips with that reason).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def ensure_slurm() -> str | None:
    """None when SLURM can be started here; else the reason it cannot (for pytest.skip)."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return None if os.geteuid() == 0 else "a single-node SLURM needs root to start slurmd"
    if os.geteuid() != 0:
        return f"SLURM is not installed and installing it needs root (apt-get install {' '.join(PACKAGES)})"
    if not shutil.which("apt-get"):
        return f"SLURM is not installed and there is no apt-get to install it ({' '.join(PACKAGES)})"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"could not install SLURM ({' '.join(cmd)}): {done.stderr.strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


def _node_line(host: str) -> str:
    """This machine as slurmd sees it (CPUs, sockets, memory), less a little memory for the daemons."""
    probe = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(f.split("=", 1) for f in probe.splitlines()[0].split() if "=" in f)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    memory = int(fields["RealMemory"]) * 9 // 10
    return f"NodeName={host} " + " ".join(f"{k}={fields[k]}" for k in keep if k in fields) + f" RealMemory={memory}"


def write_config(root: Path, host: str) -> Path:
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=negmerge-test",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",  # no sacct: the common small-cluster setup
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "SchedulerType=sched/backfill",
                "MpiDefault=none",
                "ReturnToService=2",
                "KillWait=2",  # scancel: SIGKILL 2 s after SIGTERM
                "SchedulerParameters=sched_interval=1",
                "MessageTimeout=20",
                _node_line(host),
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


@contextlib.contextmanager
def single_node_slurm(root: Path) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd in ``root``; yield the environment (``SLURM_CONF``) to run
    SLURM's commands with; stop the daemons after, whatever happened."""
    host = socket.gethostname().split(".")[0]
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    conf = write_config(root, host)
    munge = root / "munge"
    munge.chmod(0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(
            [
                _sbin("munged"),
                "--force",
                f"--socket={munge / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for daemon in ("slurmctld", "slurmd"):
            log = (root / "log" / f"{daemon}.out").open("w")
            procs.append(subprocess.Popen([_sbin(daemon), "-D", "-f", str(conf)], env=env, stdout=log, stderr=log))
        _wait_for_idle_node(env, procs, root)
        yield env
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            subprocess.run([_sbin("munged"), "--stop", f"--socket={munge / 'munge.socket'}"], timeout=20)


def _wait_for_idle_node(env: dict[str, str], procs: list[subprocess.Popen], root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a SLURM daemon exited at start: {_logs(root)}")
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if state.returncode == 0 and state.stdout.strip() in {"idle", "mix", "alloc"}:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the SLURM node did not come up in {timeout:.0f} s: {_logs(root)}")


def _logs(root: Path) -> str:
    return " | ".join(p.read_text()[-800:] for p in sorted((root / "log").glob("*")) if p.is_file())
