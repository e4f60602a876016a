"""Experiment trackers: a reduced run logged to W&B (offline), MLflow (SQLite) and TensorBoard, each
store read back with the tracker's own reader and compared with the run's files."""

from __future__ import annotations

import json
import math
import shutil
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from tests.wandb_records import read_offline_run

QUICK = ["--set", "forget=[sklearn-digits]"]  # one forget dataset: 4 candidates, 1 gradient ascent
REPO = Path(__file__).resolve().parents[1]


def expected_metrics(run: Path) -> dict[str, float]:
    """Every results.csv row under the documented name DATASET/METHOD/seedN/SPLIT/METRIC[/floorF]."""
    rows = pd.read_csv(run / "results.csv")
    out = {}
    for r in rows.to_dict("records"):
        name = f"{r['dataset']}/{r['method']}/seed{r['seed']}/{r['split']}/{r['metric']}"
        if not math.isnan(r["floor"]):
            name += f"/floor{r['floor']:g}"
        out[name] = r["value"]
    assert len(out) == len(rows)
    return out


def expected_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """curves/DATASET/METHOD/seedN/{forget_val,control_val} as (step, value): step i = i-th lambda."""
    curves = pd.read_csv(run / "curves.csv")
    lambdas = sorted(curves.lam.unique())
    out: dict[str, list[tuple[int, float]]] = {}
    for r in curves.to_dict("records"):
        for value in ("forget_val", "control_val"):
            name = f"curves/{r['dataset']}/{r['method'].replace(':', '_')}/seed{r['seed']}/{value}"
            out.setdefault(name, []).append((lambdas.index(r["lam"]), r[value]))
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def tracked(tiny_backbone, clip_cache, module_env, tmp_path_factory) -> Path:
    """One reduced run (with its report) logged to all three trackers; ``ROOT/run`` and ``ROOT/tracking``."""
    for module in ("wandb", "mlflow", "sqlalchemy", "tensorboard"):
        pytest.importorskip(module)
    module_env.setenv("NEGMERGE_CACHE", str(clip_cache))
    root = tmp_path_factory.mktemp("tracked")
    argv = ["run", "mini-clip-tiny", "--out", str(root / "run"), *QUICK]
    assert main([*argv, "--track", "wandb", "--track", "mlflow", "--track", "tensorboard"]) == 0
    return root


@pytest.mark.integration
def test_mlflow_store_holds_every_result_curve_config_and_report(tracked):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tracked / 'tracking' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("negmerge-bench").experiment_id])
    assert len(runs) == 1, "the run is logged once"
    run = runs[0]
    run_dir = tracked / "run"
    expected = expected_metrics(run_dir)
    logged = {k: v for k, v in run.data.metrics.items() if not k.startswith(("curves/", "cost/")) and k != "lambda"}
    assert logged == expected  # the same numbers, copied (no arithmetic in between)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert run.data.tags["git_commit"] == manifest["git"]["commit"]
    assert run.data.params["name"] == "mini-clip-tiny" and run.data.params["forget"] == '["sklearn-digits"]'
    assert run.data.metrics["cost/wall_seconds"] == manifest["wall_seconds"]
    curves = expected_curves(run_dir)
    assert {k for k in run.data.metrics if k.startswith("curves/")} == set(curves)
    for name in (
        "curves/sklearn-digits/negmerge/seed0/forget_val",
        "curves/sklearn-digits/candidate_0/seed0/control_val",
    ):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == curves[name]
    lambdas = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lambda"))
    assert [v for _, v in lambdas] == sorted(pd.read_csv(run_dir / "curves.csv").lam.unique())
    report = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"table.tex", "summary.md", "lambda_curves.png", "tradeoff.pdf"} <= report
    assert {"results.csv", "curves.csv", "manifest.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.integration
def test_wandb_offline_run_holds_every_result_curve_config_and_report(tracked):
    (folder,) = (tracked / "tracking" / "wandb").glob("offline-run-*")
    logged = read_offline_run(folder)
    run_dir = tracked / "run"
    expected = expected_metrics(run_dir)
    assert {k: logged["summary"][k] for k in expected} == expected
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert logged["config"]["git_commit"] == manifest["git"]["commit"]
    assert logged["config"]["suite_config"]["forget"] == ["sklearn-digits"]
    curves = expected_curves(run_dir)
    for name, points in curves.items():
        assert [(row["_step"], row[name]) for row in logged["history"] if name in row] == points
    lambdas = [row["lambda"] for row in logged["history"]]
    assert lambdas == sorted(pd.read_csv(run_dir / "curves.csv").lam.unique())
    (artifact,) = logged["artifacts"]
    files = {entry.path for entry in artifact.manifest.contents}
    assert {"results.csv", "manifest.json", "report/table.tex", "report/lambda_curves.png"} <= files


@pytest.mark.integration
def test_tensorboard_events_hold_every_result_curve_and_figure(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = (tracked / "tracking" / "tensorboard" / "run").iterdir()
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    run_dir = tracked / "run"
    for name, value in expected_metrics(run_dir).items():
        (event,) = events.Scalars(name)
        assert event.step == 0 and event.value == pytest.approx(value, rel=1e-6)  # TensorBoard keeps float32
    for name, points in expected_curves(run_dir).items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)
    tags = events.Tags()
    assert {"report/lambda_curves", "report/tradeoff"} <= set(tags["images"])
    assert {"run/text_summary", "config/text_summary", "report/summary/text_summary"} <= set(tags["tensors"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released at once: nothing listens there


@pytest.mark.integration
def test_a_missing_or_unreachable_tracker_is_one_start_up_warning_and_changes_no_result(tracked, monkeypatch, capsys):
    """W&B not installed, MLflow's server unreachable: one line each, before the run starts; the
    run's results.csv is the same as the tracked run's, and no store gets a second run."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed
    capsys.readouterr()
    out = tracked / "untracked"
    argv = ["run", "mini-clip-tiny", "--out", str(out), "--no-report", *QUICK, "--track", "wandb", "--track", "mlflow"]
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main([*argv, "--set", f"tracking_uri={uri}"]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning: tracking:")]
    assert len(warnings) == 2
    assert "wandb is not installed" in warnings[0] and "pip install wandb" in warnings[0]
    assert f"the tracking server {uri} cannot be reached" in warnings[1]
    start = next(i for i, line in enumerate(err) if line.startswith("[negmerge-bench] suite"))
    assert all(err.index(w) < start for w in warnings), "the warnings come at start-up"
    assert (out / "results.csv").read_bytes() == (tracked / "run" / "results.csv").read_bytes()
    assert len(list((tracked / "tracking" / "wandb").glob("offline-run-*"))) == 1


def test_record_of_a_protocol_b_run_names_every_row_and_its_costs(tmp_path):
    """From a committed Protocol B run folder: one distinct name per result row (floor only where the
    row has one), the manifest's timings and any `cost` section as cost figures."""
    from bench.tracking.record import read_run

    run = tmp_path / "mini-classic-tiny"
    shutil.copytree(REPO / "results" / "mini-classic-tiny", run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["cost"] = {"device_hours": 0.25, "flops": {"total": 3.0e12}, "device": "cpu"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    record = read_run(run)
    assert record.metrics == expected_metrics(run)
    assert any("/floor" not in k for k in record.metrics) and any("/floor0.95" in k for k in record.metrics)
    assert record.costs["cost/device_hours"] == 0.25 and record.costs["cost/flops/total"] == 3.0e12
    assert record.costs["cost/wall_seconds"] == manifest["wall_seconds"] and "cost/device" not in record.costs
    assert set(record.curves) == set(expected_curves(run))
    assert record.tags["git_commit"] == manifest["git"]["commit"] and record.tags["protocol"] == "classic"


def test_track_logs_an_existing_run_folder_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "mini-classic-tiny"
    shutil.copytree(REPO / "results" / "mini-classic-tiny", run)
    assert main(["track", str(run), "--track", "tensorboard", "--tracking-dir", str(tmp_path / "store")]) == 0
    (logdir,) = (tmp_path / "store" / "tensorboard" / "mini-classic-tiny").iterdir()
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    expected = expected_metrics(run)
    assert set(expected) <= set(events.Tags()["scalars"])
    name = next(iter(expected))
    assert events.Scalars(name)[0].value == pytest.approx(expected[name], rel=1e-6)


def test_track_without_a_tracker_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(REPO / "results" / "mini-classic-tiny", run)
    assert main(["track", str(run)]) == 2
    assert "its config names no tracker; give --track" in capsys.readouterr().err


def test_an_unknown_tracker_is_one_error_line_before_any_work(tmp_path, capsys):
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "run"), "--set", "tracking=[neptune]"]) == 2
    err = capsys.readouterr().err
    assert "tracking.0: Input should be 'wandb', 'mlflow' or 'tensorboard'" in err
    assert not (tmp_path / "run").exists()
