"""The report's paired significance tests (bench.significance): the numbers are scipy.stats' own on the
same paired values, the tables' bold follows them, and the summary says what was tested."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.report import classic_latex, classic_table, clip_latex, clip_table, significance_table
from bench.results import RESULT_COLUMNS
from bench.significance import Settings, beyond_noise, paired_test
from tests.latex import bold_cells, classic_manifest


def _mean_diff(x, y, axis):
    return np.mean(x - y, axis=axis)


def _scipy(a, b, alpha=0.05):
    """The two tests, called here directly as the docs say."""
    perm = stats.permutation_test(
        (a, b), _mean_diff, permutation_type="samples", vectorized=True, rng=np.random.default_rng(0)
    )
    boot = stats.bootstrap(
        (a, b),
        _mean_diff,
        paired=True,
        vectorized=True,
        confidence_level=1 - alpha,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    return perm.pvalue, boot.confidence_interval.low, boot.confidence_interval.high


@pytest.mark.parametrize("n", [3, 5, 8, 16])
def test_paired_test_is_scipy_on_the_same_values(n):
    rng = np.random.default_rng(n)
    a = rng.normal(20, 2, n)
    b = a + rng.normal(0.8, 1.0, n)
    result = paired_test(a, b)
    p, low, high = _scipy(a, b)
    assert (result.n, result.p_value, result.ci_low, result.ci_high) == (n, p, low, high)
    assert result.mean_diff == pytest.approx(np.mean(a - b))
    assert result.exact == (2**n <= 9999)


def test_five_pairs_cannot_reach_alpha_005():
    """n = 5, every difference of one sign: the exact test's smallest p, 2/32, is above 0.05."""
    a, b = np.arange(5.0), np.arange(5.0) + 3.0
    result = paired_test(a, b)
    assert result.p_value == pytest.approx(2 / 32) and result.smallest_p == 2 / 32
    assert not beyond_noise(result, Settings())
    assert beyond_noise(result, Settings(test="bootstrap"))  # the CI [-3, -3] excludes 0
    assert beyond_noise(paired_test(np.arange(6.0), np.arange(6.0) + 3.0), Settings())  # 2/64


def _clip_rows(values: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """Test rows: method -> metric -> per-seed values on dataset A (the other metric's fixed)."""
    rows = []
    for method, metrics in values.items():
        for metric, per_seed in metrics.items():
            for seed, value in enumerate(per_seed):
                rows.append(
                    dict(suite="s", backbone="b", dataset="A", method=method, seed=seed, split="test", metric=metric)
                )
                rows[-1].update(value=value, lam=0.5, feasible=True, at_grid_edge=False, floor=0.95)
                rows[-1].update(selection_rule="control-floor")
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


CLIP_MANIFEST = {
    "config": {
        "name": "syn",
        "protocol": "clip",
        "backbone": {"name": "b"},
        "control": "c",
        "selection": {"floor": 0.95},
        "seeds": list(range(6)),
    }
}


def test_bold_disappears_when_the_best_is_within_noise():
    """Constructed: on forget, NegMerge's mean is best but TIES is within 0.2 points of it with seed
    noise of 1 point (signs of the differences mixed): no bold. On control NegMerge is 5 points above
    everyone on every seed: bold. Then TIES moved 5 points away on forget: bold appears."""
    noise = [1.0, -1.0, 0.8, -0.9, 1.1, -1.0]
    close = {
        "negmerge": {"forget_acc": [20 + e for e in noise], "control_acc": [75.0] * 6},
        "ties": {"forget_acc": [20.2 - e for e in noise], "control_acc": [70.0, 70.5, 69.5, 70, 70.2, 69.8]},
        "average": {"forget_acc": [30.0] * 6, "control_acc": [68.0] * 6},
    }
    results = _clip_rows(close)
    tex = clip_latex(clip_table(results), CLIP_MANIFEST, results)
    assert bold_cells(tex) == {("NegMerge", 1), ("NegMerge", 3)}  # control of A and of the Avg.
    assert "permutation" in tex and "alpha = 0.05" in tex  # the caption says what bold means

    apart = {**close, "ties": {**close["ties"], "forget_acc": [25.2 - e for e in noise]}}
    results = _clip_rows(apart)
    tex = clip_latex(clip_table(results), CLIP_MANIFEST, results)
    assert bold_cells(tex) == {("NegMerge", 0), ("NegMerge", 1), ("NegMerge", 2), ("NegMerge", 3)}


def test_summary_numbers_are_scipy_on_the_paired_values():
    """significance.csv's rows are scipy's tests on the (dataset, seed) pairs taken from results.csv."""
    rng = np.random.default_rng(1)
    values = {m: {"forget_acc": list(20 + i + rng.normal(0, 1, 6))} for i, m in enumerate(["negmerge", "ties", "ga"])}
    for m in values:
        values[m]["control_acc"] = list(70 + rng.normal(0, 1, 6))
    results = _clip_rows(values)
    table, lines = significance_table(results, CLIP_MANIFEST)
    pooled = table[table.scope == "all datasets"]
    assert set(pooled.reference) == {"negmerge"} and set(pooled.rival) == {"ties", "ga"}
    for row in pooled.itertuples():
        a = np.array(values["negmerge"][row.metric])
        b = np.array(values[row.rival][row.metric])
        p, low, high = _scipy(a, b)
        assert (row.n, row.p_value, row.ci_low, row.ci_high) == (6, p, low, high)
        assert row.verdict == ("within noise" if p > 0.05 else row.verdict)
    text = "\n".join(lines)
    assert "scipy.stats.permutation_test" in text and "n = 6 pairs" in text and "2/64" in text


def test_protocol_b_summary_says_five_seeds_cannot_be_beyond_noise():
    rows = []
    for seed in range(5):
        for method, shift in (("retrain", 0.0), ("negmerge", 1.0), ("ft", 4.0)):
            for metric in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap"):
                value = shift + seed if metric != "avg_gap" else shift
                common = dict(suite="s", backbone="r", dataset="fm", method=method, seed=seed, split="test")
                common.update(metric=metric, value=value, lam=None, feasible=True, at_grid_edge=False, floor=0.95)
                rows.append({**common, "selection_rule": "floor"})
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    manifest = classic_manifest(list(range(5)))
    manifest["config"]["protocol"] = "classic"
    table, lines = significance_table(results, manifest)
    text = "\n".join(lines)
    assert "2/32 = 0.0625, above alpha = 0.05: no difference at this n can be called beyond noise" in text
    assert set(table.verdict) == {"within noise"}
    assert (table.mean_diff == -3.0).all()  # NegMerge 1 point from Retrain on every metric and seed, FT 4
    mean, std, seeds = classic_table(results)
    assert bold_cells(classic_latex(mean, std, seeds, manifest, results)) == set()
    manifest["config"]["report"] = {"significance": {"test": "bootstrap"}}  # CI [-3, -3]: beyond noise
    tex = classic_latex(mean, std, seeds, manifest, results)
    assert bold_cells(tex) == {("NegMerge", col) for col in range(5)} and "bootstrap" in tex


def test_settings_come_from_the_manifest_and_old_manifests_default():
    assert Settings.from_manifest({"config": {}}) == Settings()
    given = {"config": {"report": {"significance": {"reference": ["ties"], "alpha": 0.1, "test": "bootstrap"}}}}
    assert Settings.from_manifest(given) == Settings(reference=("ties",), alpha=0.1, test="bootstrap")
