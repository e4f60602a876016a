"""Project tasks. Every session runs in the one shared environment that ``./dev`` prepares
(torch is ~6 GB: one environment, not one per session), so call them as ``./dev nox -s NAME``.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

RUN_ROOT = os.environ.get("NEGMERGE_RUNS", "runs")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit, property and integration tests (reduced offline suites); what CI runs."""
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def perf(session: nox.Session) -> None:
    """Speed and memory benchmarks (pytest-benchmark); prints the figures the issues ask for."""
    session.run("python", "-m", "pytest", "benchmarks", "-q", "-s", "--benchmark-only", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: run the offline suites end to end and write their tables."""
    for suite in ("mini-clip",):
        session.run("negmerge-bench", "run", suite, "--out", f"{RUN_ROOT}/{suite}", *session.posargs)
