"""The method registry is the only place a method is added: a toy merge and a toy training-based method,
registered through the public API from this file alone, run through both reduced suites and show up in
results, tables, figures and regress; the registry refuses what it cannot run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch

from baselines import MERGES, Method, Recipe, TrainingMethod, get_merge, get_method, register, unregister
from baselines.training import FORGET, UnlearningSets
from bench.cli import main
from negmerge.sources import SourceLike
from negmerge.streaming import Where, merge_elementwise
from tests.results_shape import assert_reported

pytestmark = pytest.mark.integration


def _median(tensors: list[torch.Tensor], where: Where) -> torch.Tensor:
    return torch.stack(tensors).median(dim=0).values


def median_merge(task_vectors: Sequence[SourceLike], *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Toy merge: the element-wise median of the candidates, times ``scale``."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return {k: v * scale for k, v in merge_elementwise(task_vectors, _median).items()}


class ForgetAscent(TrainingMethod):
    """Toy training method: gradient ascent on the forget set, needing only what both protocols supply."""

    name = "toy_ascent"
    needs = frozenset({FORGET})
    defaults = {"strength": 1.0}

    def check(self) -> None:
        if self.params["strength"] not in (1.0,):
            raise ValueError("toy_ascent.strength must be 1.0")

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        return Recipe(sets.forget, direction=-1)


TOYS = (
    Method("toy_median", "merge", "Median merge", "tab:gray", merge=median_merge),
    Method("toy_ascent", "training", "Toy ascent", "#123456", training=ForgetAscent),
)


@pytest.fixture(scope="module")
def toys():
    for method in TOYS:
        register(method)
    yield
    for method in TOYS:
        unregister(method.name)


def _run(suite: str, out: Path, overrides: list[str]) -> None:
    assert main(["run", suite, "--out", str(out), *(a for o in overrides for a in ("--set", o))]) == 0


def _check_run(out: Path, rows: set[str], metrics: set[str]) -> None:
    """Every method has its results (or, where its selection found nothing feasible on this machine,
    a row saying so), and the report and regress show the toys."""
    results = pd.read_csv(out / "results.csv")
    manifest = json.loads((out / "manifest.json").read_text())
    assert rows == set(results.method), set(results.method)
    for method in rows:
        for seed in manifest["config"]["seeds"]:
            assert_reported(results, manifest, method, seed, metrics)
    report = out / "report"
    table = (report / "table.tex").read_text()
    assert "Median merge" in table and "Toy ascent" in table
    assert "Median merge" in (report / "summary.md").read_text()
    assert list(report.glob("*.png")), "figures drawn"
    assert main(["regress", str(out), "--against", str(out)]) == 0  # regress reads the new rows too


def test_toy_methods_run_through_the_clip_suite(toys, clip_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGMERGE_CACHE", str(clip_cache))
    out = tmp_path / "clip"
    overrides = [
        "methods=[zeroshot, ga, toy_ascent, single_best, negmerge, toy_median]",
        "baselines.toy_ascent={base: {batch_size: 64, warmup_steps: 0, weight_decay: 0.0}, grid: {lr: [0.0001], steps: [5]}}",
        "merge_params.toy_median={scale: 1.0}",
    ]
    _run("mini-clip-tiny", out, overrides)
    _check_run(
        out, {"zeroshot", "ga", "toy_ascent", "single_best", "negmerge", "toy_median"}, {"forget_acc", "control_acc"}
    )
    curves = pd.read_csv(out / "curves.csv")
    assert "toy_median" in set(curves.method)  # swept over lambda like any merge


def test_toy_methods_run_through_the_classic_suite(toys, tmp_path, monkeypatch):
    monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "classic"
    overrides = [
        "seeds=[0]",
        "methods=[original, retrain, ga, toy_ascent, negmerge, toy_median]",
        "baselines.toy_ascent={base: {schedule: constant, weight_decay: 0.0}, grid: {lr: [0.001], epochs: [1]}}",
        "pool.grid={epochs: [1, 2]}",
    ]
    _run("mini-classic-tiny", out, overrides)
    metrics = {"retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap"}
    _check_run(out, {"original", "retrain", "ga", "toy_ascent", "negmerge", "toy_median"}, metrics)


def test_registered_merge_is_validated_and_callable(toys, capsys):
    merge = get_merge("toy_median")
    assert merge is median_merge and MERGES["toy_median"] is median_merge  # found by its registered name
    pool = [
        {"w": torch.tensor([1.0, 5.0, 2.0]), "b": torch.tensor([[0.5, -2.0]])},
        {"w": torch.tensor([3.0, -1.0, 0.0]), "b": torch.tensor([[1.5, 4.0]])},
        {"w": torch.tensor([2.0, 0.0, 7.0]), "b": torch.tensor([[-1.0, 1.0]])},
    ]
    merged = merge(pool, scale=2.0)  # element-wise medians (2, 0, 2) and (0.5, 1), doubled
    assert merged["w"].tolist() == [4.0, 0.0, 4.0] and merged["b"].tolist() == [[1.0, 2.0]]
    assert get_method("toy_median").parameters() == ("scale",)
    assert main(["run", "mini-clip-tiny", "--out", "unused", "--set", "merge_params.toy_median={scale: -1}"]) == 2
    assert "toy_median: scale must be > 0, got -1" in capsys.readouterr().err
    assert main(["run", "mini-clip-tiny", "--out", "unused", "--set", "baseline_params.toy_ascent={strength: 2}"]) == 2
    assert "toy_ascent.strength must be 1.0" in capsys.readouterr().err
    assert main(["list", "methods"]) == 0
    assert "toy_median" in capsys.readouterr().out


def test_registry_refuses_mistakes():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("negmerge", "merge", "Again", "red", merge=median_merge))
    with pytest.raises(ValueError, match="a merge needs merge="):
        register(Method("broken", "merge", "Broken", "red"))
    with pytest.raises(KeyError, match="did you mean 'negmerge'"):
        get_method("negmrge")
    with pytest.raises(ValueError, match="unknown ga parameter 'lr'"):
        get_method("ga").check_params({"lr": 0.1})


def test_one_gradient_ascent_for_both_protocols():
    """GA is one class with one name: both protocols run the same recipe (the forget set, ascended)."""
    from bench.protocols import offered_methods

    assert "ga" in offered_methods("clip") and "ga" in offered_methods("classic")
    assert "rl" not in offered_methods("clip")  # RL needs a retain set, which Protocol A has not
    recipe = get_method("ga").training().recipe(type("Sets", (), {"forget": "Df"})(), seed=0)
    assert recipe == Recipe("Df", direction=-1)
