"""Project tasks. Every session runs in the one shared environment that ``./dev`` prepares
(torch is ~6 GB: one environment, not one per session), so call them as ``./dev nox -s NAME``.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

RUNS = os.environ.get("NEGMERGE_RUNS", "runs")
DEMO_SUITES = ("mini-clip", "mini-classic")
REGRESSION_SUITES = ("mini-clip-tiny", "mini-classic-tiny")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (reduced offline suites); what CI runs."""
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(name="other-cpu")
def other_cpu(session: nox.Session) -> None:
    """The test suite with this CPU computing the way another CPU would (bench.numerics:
    NEGMERGE_EMULATE_CPU=other): no test may depend on one machine's bits."""
    env = {"NEGMERGE_EMULATE_CPU": "other"}
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check, and the architecture contracts (import-linter, pyproject.toml)."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: both offline suites end to end, each with its report (tables, figures, summary)."""
    for suite in session.posargs or DEMO_SUITES:
        session.run("negmerge-bench", "run", suite, "--out", f"{RUNS}/{suite}")


@nox.session
def paper(session: nox.Session) -> None:
    """Rebuild every report from existing runs (no model is loaded; seconds)."""
    for suite in session.posargs or DEMO_SUITES:
        session.run("negmerge-bench", "report", f"{RUNS}/{suite}")


@nox.session
def regression(session: nox.Session) -> None:
    """Fresh reduced runs (empty cache: everything recomputed), compared with the committed references;
    fails on a regression. ``NEGMERGE_EMULATE_CPU=other`` in the environment reruns them as another
    CPU would compute them (bench.numerics)."""
    import shutil

    cache = f"{RUNS}/regression/cache"
    shutil.rmtree(cache, ignore_errors=True)
    for suite in session.posargs or REGRESSION_SUITES:
        out = f"{RUNS}/regression/{suite}"
        session.run("negmerge-bench", "run", suite, "--out", out, "--no-report", env={"NEGMERGE_CACHE": cache})
        session.run("negmerge-bench", "regress", out, "--against", f"results/{suite}")


@nox.session
def perf(session: nox.Session) -> None:
    """Speed and memory benchmarks (pytest-benchmark): every merge against one plain read at K=10 ViT-B-32
    and K=30 ViT-L/14, lambda sweeps over file-backed vs in-memory splits, harness overheads. Arguments
    pick files or tests (``-- benchmarks/test_merge_perf.py``)."""
    targets = session.posargs or ["benchmarks"]
    session.run("python", "-m", "pytest", *targets, "-q", "-s", "-p", "no:cacheprovider", "--benchmark-only")


@nox.session
def gpu(session: nox.Session) -> None:
    """The prepared GPU check (<= 10 minutes, fresh temporary caches): the reduced ViT-B-32 suite on CUDA in
    bf16 twice (byte for byte) with device memory per stage, fp16 vs bf16 (regress), strict determinism
    (the ops without a deterministic kernel), host syncs per step and per lambda point, fp32 GPU-vs-CPU
    logits with TF32 off and on, ViT-B-32 eval/train images/s in fp32 and bf16. Figures in
    ``--out DIR`` (gpu_check.json / .md). Says so and passes where there is no GPU."""
    session.run("python", "benchmarks/gpu_check.py", *session.posargs)
