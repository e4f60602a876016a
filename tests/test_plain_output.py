"""What a user reads: progress in a log is plain lines, `plan` says when it cannot read a data root,
and a mean over one seed prints without a spread."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from bench.cli import main
from bench.progress import LogProgress, progress_bar
from bench.results import RESULT_COLUMNS
from tests.latex import classic_manifest


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_is_a_plain_line_every_period():
    stream, clock = io.StringIO(), _Clock()
    bar = LogProgress(range(100), desc="lambda: negmerge", stream=stream, period=30.0, clock=clock)
    for _ in bar:  # one second per item: lines at 30, 60 and 90 s, then the closing one
        clock.now += 1.0
        bar.set_postfix(loss="0.123", refresh=False)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == [
        "[progress] lambda: negmerge: 30/100 (30%) in 30 s, loss=0.123",
        "[progress] lambda: negmerge: 60/100 (60%) in 60 s, loss=0.123",
        "[progress] lambda: negmerge: 90/100 (90%) in 90 s, loss=0.123",
        "[progress] lambda: negmerge: done 100/100 (100%) in 100 s, loss=0.123",
    ]


def test_a_short_bar_in_a_log_prints_nothing():
    stream, clock = io.StringIO(), _Clock()
    with LogProgress(total=5, desc="preprocess", stream=stream, period=30.0, clock=clock) as bar:
        for _ in range(5):
            clock.now += 1.0
            bar.update()
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm_and_a_log_gets_lines(monkeypatch):
    monkeypatch.setenv("NEGMERGE_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="fine-tune", stream=log):
        pass
    assert log.getvalue().splitlines()[0] == "[progress] fine-tune: 1/3 (33%) in 0 s" and "\r" not in log.getvalue()
    terminal = _Terminal()
    for _ in progress_bar(range(3), desc="fine-tune", stream=terminal):
        pass
    assert "\r" in terminal.getvalue()  # tqdm's redrawn bar
    quiet = io.StringIO()
    for _ in progress_bar(range(3), desc="fine-tune", stream=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("root", ["MISSING", "EMPTY"])
def test_plan_warns_before_falling_back_to_official_sizes(root, tmp_path, capsys):
    """`run` on this config fails at the data; `plan` still plans, but says which dataset and why."""
    path = tmp_path / "nothing-here" if root == "MISSING" else tmp_path
    assert main(["plan", "mini-clip-tiny", "--set", "forget=[dtd]", "--set", f"data.root={path}"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    reason = "does not exist" if root == "MISSING" else "no torchvision copy of dtd"
    assert warnings[0].startswith("warning: dataset 'dtd': ") and reason in warnings[0] and str(path) in warnings[0]
    assert "official split sizes" in warnings[0]
    assert "dtd" in captured.out and "(official sizes)" in captured.out


def test_plan_warns_on_a_folder_it_may_not_read(tmp_path, capsys, monkeypatch):
    import bench.data

    load_task = bench.data.load_task

    def denied(name, **kwargs):
        if name == "dtd":
            raise PermissionError(13, "Permission denied", str(tmp_path / "dtd"))
        return load_task(name, **kwargs)

    monkeypatch.setattr(bench.data, "load_task", denied)
    assert main(["plan", "mini-clip-tiny", "--set", "forget=[dtd]", "--set", f"data.root={tmp_path}"]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:"))
    assert warning.startswith("warning: dataset 'dtd': cannot read its copy") and "Permission denied" in warning


def test_plan_is_silent_when_it_reads_the_data(capsys):
    assert main(["plan", "mini-clip-tiny"]) == 0
    captured = capsys.readouterr()
    assert "warning:" not in captured.err and "(data sizes)" in captured.out


def test_a_one_seed_mean_prints_without_a_spread(tmp_path):
    from bench.report import classic_latex, classic_markdown, classic_table

    rows = []
    for seed in (0, 1):
        for method in ("retrain", "negmerge", "rl"):
            if method == "rl" and seed == 1:
                continue  # no feasible setting on seed 1: RL's mean is one seed's number
            common = dict(suite="syn", backbone="r", dataset="fm", method=method, seed=seed, lam=None, floor=0.95)
            common.update(feasible=True, at_grid_edge=False, selection_rule="floor")
            for metric in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap"):
                rows.append({**common, "split": "test", "metric": metric, "value": 50.0 + 2 * seed})
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    mean, std, seeds = classic_table(results)
    markdown = classic_markdown(mean, std, seeds, 2)
    rl = next(line for line in markdown.splitlines() if "RL" in line)
    assert "(1/2 seeds)" in rl and "50.00" in rl and "±" not in rl and "nan" not in rl
    retrain = next(line for line in markdown.splitlines() if "Retrain" in line)
    assert "51.00 ± 1.41" in retrain  # two seeds: mean ± sample std of 50 and 52
    manifest = classic_manifest([0, 1])
    tex = classic_latex(mean, std, seeds, manifest, results)
    rl_tex = next(line for line in tex.splitlines() if line.startswith("RL"))
    assert "nan" not in tex and r"\pm" not in rl_tex and "50.00" in rl_tex
