"""Protocol B end to end on real Fashion-MNIST (reduced suite), and its metric definitions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.metrics import GAP_METRICS as METRICS
from bench.metrics import avg_gap
from bench.sanity import HELD_OUT_SLACK
from tests.faults import count, kill_at_stages, run_to_completion
from tests.latex import assert_compiles

ALL_METHODS = {
    "original",
    "retrain",
    "ft",
    "ga",
    "rl",
    "l1_sparse",
    "salun",
    "single_best",
    "single_run",
    "average",
    "ties",
    "magmax",
    "dare",
    "iso_c",
    "negmerge",
}


def test_avg_gap_definition():
    retrain = {"retain_acc": 100.0, "forget_acc": 94.76, "test_acc": 94.26, "mia_efficacy": 12.88}
    method = {"retain_acc": 99.0, "forget_acc": 96.76, "test_acc": 93.26, "mia_efficacy": 16.88}
    assert METRICS == ("retain_acc", "forget_acc", "test_acc", "mia_efficacy")
    assert avg_gap(method, retrain) == pytest.approx((1 + 2 + 1 + 4) / 4)


@pytest.fixture(scope="module")
def classic_run(tmp_path_factory, module_env):
    cache = tmp_path_factory.mktemp("classic-cache")
    out = tmp_path_factory.mktemp("classic-run")
    module_env.setenv("NEGMERGE_CACHE", str(cache))
    assert main(["run", "mini-classic-tiny", "--out", str(out)]) == 0
    return out


def _table_label(method: str, feasible_seeds: int, seeds: int) -> str:
    from bench.report import display

    if feasible_seeds == 0:
        return f"{display(method)} (no feasible setting)"
    return display(method) + (f" ({feasible_seeds}/{seeds} seeds)" if feasible_seeds < seeds else "")


@pytest.mark.integration
def test_every_method_with_mean_and_std_over_seeds(classic_run):
    """Every method has a result for every seed: its test metrics, or, where no setting kept the
    floor on that seed's Val (which setting does can differ between CPUs: RL on seed 1 on another
    machine), a Val row marked infeasible, with the reason in the manifest and its notes. The table
    keeps every method, marks means over fewer seeds, and bolds nothing at 2 seeds."""
    from tests.latex import body_rows, bold_cells
    from tests.results_shape import assert_reported

    results = pd.read_csv(classic_run / "results.csv")
    manifest = json.loads((classic_run / "manifest.json").read_text())
    seeds = manifest["config"]["seeds"]
    assert seeds == [0, 1] and set(results.method) == ALL_METHODS
    feasible = {m: 0 for m in ALL_METHODS}
    for method in sorted(ALL_METHODS):
        for seed in seeds:
            feasible[method] += assert_reported(results, manifest, method, seed, {*METRICS, "avg_gap"})
    assert feasible["original"] == feasible["retrain"] == len(seeds)  # references are never infeasible

    table = (classic_run / "report" / "table.tex").read_text()
    assert r"$\pm$" in table and r"\toprule" in table
    labels = {m: _table_label(m, n, len(seeds)) for m, n in feasible.items()}
    assert set(body_rows(table)) == set(labels.values())
    # a column's closest to Retrain is bold only beyond noise (docs/metrics.md#significance): with 2
    # seeds a paired permutation test's smallest p is 2/4, so nothing is, and the caption says why
    assert len(seeds) == 2 and bold_cells(table) == set()
    assert "permutation" in table and "a column without bold has no such entry" in table


@pytest.mark.integration
def test_the_reduced_suite_measures_unlearning(classic_run):
    """The Original memorises its training data and Retrain does not, so doing nothing is far from
    Retrain and methods have a gap to close: the sanity report has no warning, and some method closes
    a visible part of the Original's Avg. Gap."""
    from bench.sanity import classic_sanity

    results = pd.read_csv(classic_run / "results.csv")
    assert classic_sanity(results) == []
    summary = (classic_run / "report" / "summary.md").read_text()
    assert "does not memorise" not in summary and "warning: the" not in summary
    gap = results[(results.split == "test") & (results.metric == "avg_gap")].groupby("method").value.mean()
    assert gap["original"] > 5.0
    assert gap.drop(["original", "retrain"]).min() < gap["original"] - 2.0


@pytest.mark.integration
def test_classic_table_compiles(classic_run, tmp_path):
    assert_compiles((classic_run / "report" / "table.tex").read_text(), tmp_path)


@pytest.mark.integration
def test_forget_set_really_held_out(classic_run):
    """Retrain never saw Df: its Df accuracy sits near its test accuracy. The Original trained on
    Df: its Df accuracy sits near its Dr accuracy."""
    results = pd.read_csv(classic_run / "results.csv")
    test = results[results.split == "test"].pivot_table(
        index="method", columns="metric", values="value", aggfunc="mean"
    )
    retrain, original = test.loc["retrain"], test.loc["original"]
    # the sanity check's own slack: 4.0 here sat 0.37 points above the committed reference's 3.63
    assert abs(retrain.forget_acc - retrain.test_acc) <= HELD_OUT_SLACK
    assert abs(original.forget_acc - original.retain_acc) < 3.0
    assert original.forget_acc > retrain.forget_acc  # the held-out gap exists
    forget_sets = json.loads((classic_run / "forget_sets" / "seed0.json").read_text())
    assert len(forget_sets["indices"]) == 300  # 10% of the 3,000 training images


@pytest.mark.integration
def test_report_and_regress_on_the_run(classic_run, tmp_path):
    assert main(["regress", str(classic_run), "--against", str(classic_run)]) == 0
    degraded = tmp_path / "degraded"
    degraded.mkdir()
    for name in ("manifest.json", "curves.csv"):
        (degraded / name).write_bytes((classic_run / name).read_bytes())
    results = pd.read_csv(classic_run / "results.csv")
    hit = (results.method == "negmerge") & (results.metric == "avg_gap") & (results.split == "test")
    # beyond regress's tolerance, max(2 points, 3 x seed std), whatever this machine's seed noise is
    tolerance = max(2.0, 3.0 * results.loc[hit, "value"].std())
    results.loc[hit, "value"] += tolerance + 1.0
    results.to_csv(degraded / "results.csv", index=False)
    assert main(["regress", str(degraded), "--against", str(classic_run)]) == 1


@pytest.mark.integration
def test_cluster_path_fills_the_cache_per_seed_then_assembles_the_same_run(classic_run, tmp_path):
    """`run --executor debug`: the submitit code path of a SLURM run, in process. One job per work
    unit (Original, Retrains, each baseline setting and pool candidate, then each seed's family) runs
    against the shared cache (here the fixture's, so nothing is retrained), then the assembly writes
    the same results as the single-machine run."""
    pytest.importorskip("submitit")
    from bench.cluster import unit_status

    out = tmp_path / "cluster-run"
    assert main(["run", "mini-classic-tiny", "--out", str(out), "--executor", "debug", "--no-report"]) == 0
    states = unit_status(out)
    kinds = [s["unit"].split("-")[0] for s in states]
    # mini-classic-tiny: per seed an Original (original_per_seed), a Retrain, 4 pool candidates and the family
    assert kinds.count("original") == 2 and kinds.count("retrain") == 2 and kinds.count("family") == 2
    assert kinds.count("candidate") == 2 * 4
    assert {s["state"] for s in states} == {"done"}
    family = pd.read_csv(out / "units" / "family-seed1" / "results.csv")
    assert set(family.seed) == {1}
    cols = ["method", "seed", "split", "metric", "value"]
    assembled = pd.read_csv(out / "results.csv")[cols].sort_values(cols[:4]).reset_index(drop=True)
    single = pd.read_csv(classic_run / "results.csv")[cols].sort_values(cols[:4]).reset_index(drop=True)
    pd.testing.assert_frame_equal(assembled, single)


def test_cluster_run_needs_a_partition_on_slurm(tmp_path, capsys):
    pytest.importorskip("submitit")
    assert main(["run", "mini-classic-tiny", "--out", str(tmp_path), "--executor", "slurm", "--no-wait"]) == 2
    assert "--partition: SLURM jobs need a partition" in capsys.readouterr().err


def test_selection_never_reads_a_test_image(tmp_path):
    """Every selection (lambda, baseline setting, single best; floor and avg_gap rules) is made on the
    full=False metrics. Replacing the test images must not move them, while the reported ones move."""
    import torch

    from bench.config import load_suite
    from bench.data.classic import load_classic
    from bench.device import CPU
    from bench.protocol_classic import ClassicRun

    cfg = load_suite("mini-classic-tiny", ["selection.rule=avg_gap"])
    run = ClassicRun(cfg, tmp_path, tmp_path / "cache")
    run.rt = CPU
    d = cfg.data
    run.data = load_classic(
        cfg.dataset, test_limit=d.test_limit, train_limit=d.train_limit, val_size=d.val_size, split_seed=d.split_seed
    )
    run._setup_seed(0)
    model = run._new_model().eval()
    selection, reported = run._metrics(model, 0, full=False), run._metrics(model, 0, full=True)
    assert "mia_efficacy" in selection  # avg_gap selects on all four terms, MIA included
    run.data.test_x = torch.randint(0, 256, run.data.test_x.shape, dtype=torch.uint8)
    assert run._metrics(model, 0, full=False) == selection
    assert run._metrics(model, 0, full=True) != reported


@pytest.mark.integration
def test_a_truncated_trained_model_is_recomputed(classic_run, tmp_path):
    """A Protocol B model (here a Retrain) truncated on disk is set aside, retrained, and the run ends
    with the same results.csv (training is deterministic, so everything downstream stays cached)."""
    import os

    cache = Path(os.environ["NEGMERGE_CACHE"])
    records = sorted((cache / "classic-models").glob("*.json"))
    retrain = next(r for r in records if json.loads(r.read_text())["spec"]["role"] == "retrain")
    tensor = retrain.with_suffix(".safetensors")
    tensor.write_bytes(tensor.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="is damaged"):
        assert main(["run", "mini-classic-tiny", "--out", str(tmp_path), "--no-report"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results.csv"), pd.read_csv(classic_run / "results.csv"))
    assert (cache / "quarantine" / "classic-models").is_dir()


@pytest.mark.integration
def test_sigkill_at_every_stage_loses_nothing(classic_run, tmp_path):
    """SIGKILL a cold run of the reduced suite during the Retrain trainings, the baselines, the pool and
    the lambda sweeps in turn (each kill resumes the run before it); the last rerun's results.csv equals
    the uninterrupted run's, and every entry finished before a kill was reused, not recomputed."""
    cache = tmp_path / "cache"
    env = {**os.environ, "NEGMERGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "bench", "run", "mini-classic-tiny", "--no-report", "--out", str(tmp_path / "run")]
    stages = [  # (what the cache holds when the kill comes, in the order a run makes it)
        ("retrain", lambda _: count(cache / "classic-models") >= 2),  # the Original and one Retrain done
        ("baselines", lambda _: count(cache / "classic-models") >= 5),
        ("pool", lambda _: count(cache / "classic-pool") >= 2),
        ("sweeps", lambda _: count(cache / "evals") >= count(cache / "classic-models") + 30),
    ]
    kill_at_stages(cmd, env, stages, timeout=300)
    finished = {p.stem for folder in ("classic-models", "classic-pool") for p in (cache / folder).glob("*.json")}
    run_to_completion(cmd, env)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    reused = {p["key"] for p in manifest["pool"] if p["cached"]}
    assert finished <= reused  # nothing finished before a kill was trained again
    resumed = pd.read_csv(tmp_path / "run" / "results.csv")
    uninterrupted = pd.read_csv(classic_run / "results.csv")
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def _sgd_samples(n: int, params) -> int:
    """Samples SGD steps through: round(epochs x batches per epoch) steps, the last batch of an epoch short."""
    import math

    per_epoch = max(1, math.ceil(n / params.batch_size))
    sizes = [min(params.batch_size, n - b * params.batch_size) for b in range(per_epoch)]
    total = max(1, int(round(params.epochs * per_epoch)))
    return sum(sizes[s % per_epoch] for s in range(total))


@pytest.mark.integration
def test_each_methods_training_cost_recomputed_from_the_config_equals_its_row(classic_run):
    from bench.config import load_suite

    cfg = load_suite("mini-classic-tiny")
    results = pd.read_csv(classic_run / "results.csv")
    costs = results.drop_duplicates(["seed", "method"]).set_index(["seed", "method"])
    n = cfg.data.train_limit
    n_forget = round(cfg.forget.fraction * n)
    for seed in cfg.seeds:
        row = costs.loc[seed]
        train = cfg.train.points(seed)[0]
        assert row.loc["original", "train_samples"] == _sgd_samples(n, train)
        assert row.loc["retrain", "train_samples"] == _sgd_samples(n - n_forget, train)
        pool = [_sgd_samples(n_forget, p) for p in cfg.pool.points(seed)]
        assert row.loc["negmerge", "train_samples_unlearn"] == sum(pool)
        assert row.loc["single_run", "train_samples"] == pool[cfg.pool.default_index]
        assert row.loc["single_best", "train_samples"] == sum(pool)
        ga = [_sgd_samples(n_forget, p) for p in cfg.baselines["ga"].points(seed)]  # ascent on Df
        ft = [_sgd_samples(n - n_forget, p) for p in cfg.baselines["ft"].points(seed)]  # descent on Dr
        assert row.loc["ga", "train_samples"] == sum(ga)
        assert row.loc["ft", "train_samples"] == sum(ft)
        assert row.loc["ft", "train_samples_unlearn"] in ft
