"""Paired significance tests between methods, for the report (docs/metrics.md#significance).

A difference between two methods' means is "beyond noise" only when a paired test over the units both
were measured on says so: Protocol A pairs over (dataset, seed), or over seeds within one dataset;
Protocol B pairs over seeds. Both tests are ``scipy.stats``' own, never hand-written:

- ``permutation``: ``scipy.stats.permutation_test`` with ``permutation_type="samples"`` (the sign of
  each paired difference is flipped), statistic the mean difference, two-sided. It is exact when
  ``2**n <= resamples``, and then its smallest possible p is ``2 / 2**n`` (n = 5: 2/32 = 0.0625).
- ``bootstrap``: ``scipy.stats.bootstrap`` with ``paired=True``, the percentile CI of the mean
  difference at ``1 - alpha``; beyond noise when the CI excludes 0.

Both are computed for every comparison (p and CI are reported); ``test`` says which one decides.
``regress`` keeps its own noise model (docs/metrics.md#regress) and does not use this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

TESTS = ("permutation", "bootstrap")


@dataclass(frozen=True)
class Settings:
    """``report.significance`` of a suite (bench.config.SignificanceCfg), read back from a manifest."""

    reference: tuple[str, ...] | None = None  # None: NegMerge, where the run has it
    alpha: float = 0.05
    test: str = "permutation"
    resamples: int = 9999
    seed: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict) -> Settings:
        raw = dict(((manifest.get("config") or {}).get("report") or {}).get("significance") or {})
        if raw.get("reference") is not None:
            raw["reference"] = tuple(raw["reference"])
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PairedTest:
    n: int  # pairs
    mean_diff: float  # mean of (a - b)
    p_value: float  # two-sided permutation p (1.0 for no pairs or all differences 0)
    ci_low: float  # paired bootstrap CI of the mean difference (NaN below 2 pairs)
    ci_high: float
    exact: bool  # the permutation test enumerated every sign assignment

    @property
    def smallest_p(self) -> float:
        """The smallest p the exact test can give at this n: both all-same-sign assignments."""
        return min(1.0, 2.0 / 2.0**self.n) if self.n else 1.0


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def paired_test(a, b, alpha: float = 0.05, resamples: int = 9999, seed: int = 0) -> PairedTest:
    """Both tests of ``mean(a - b) == 0`` on paired values ``a[i]``, ``b[i]`` (seeded, so a report is
    the same bytes every time)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired values must be two 1-D arrays of the same length")
    n = len(a)
    if n == 0:
        return PairedTest(0, float("nan"), 1.0, float("nan"), float("nan"), True)
    diff = float(np.mean(a - b))
    if n == 1:  # one pair: both sign flips give the same |mean|, p = 1 (scipy needs two observations)
        return PairedTest(1, diff, 1.0, float("nan"), float("nan"), True)
    if np.all(a == b):  # no difference at all: nothing to test (scipy would give p = 1 too)
        return PairedTest(n, 0.0, 1.0, 0.0, 0.0, True)
    perm = stats.permutation_test(
        (a, b),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    boot = stats.bootstrap(
        (a, b),
        _mean_diff,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=1 - alpha,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return PairedTest(n, diff, float(perm.pvalue), low, high, 2**n <= resamples)


def beyond_noise(result: PairedTest, settings: Settings) -> bool:
    """The deciding test's verdict: the difference is larger than its noise."""
    if settings.test == "bootstrap":
        return bool(np.isfinite(result.ci_low) and (result.ci_low > 0 or result.ci_high < 0))
    return result.n > 0 and result.mean_diff != 0 and result.p_value <= settings.alpha


def paired_values(scores: pd.DataFrame, a: str, b: str, units: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """The values of methods ``a`` and ``b`` on the units both have (``scores``: one row per method and
    unit, columns ``method``, *units, ``score``), in the units' order; and how many units one of them lacks."""
    wide = scores[scores.method.isin([a, b])].pivot_table(index=units, columns="method", values="score")
    if a not in wide or b not in wide:
        return np.array([]), np.array([]), len(wide)
    both = wide[[a, b]].dropna()
    return both[a].to_numpy(), both[b].to_numpy(), len(wide) - len(both)


def better_by_noise(
    scores: pd.DataFrame, best: str, rivals: list[str], units: list[str], lower_is_better: bool, settings: Settings
) -> bool:
    """``best`` is better than every one of ``rivals`` (that has any paired value) beyond noise."""
    for rival in rivals:
        if rival == best:
            continue
        x, y, _ = paired_values(scores, best, rival, units)
        if len(x) == 0:
            continue  # the rival has no value where best has one: nothing to beat
        result = paired_test(x, y, settings.alpha, settings.resamples, settings.seed)
        favours_best = result.mean_diff < 0 if lower_is_better else result.mean_diff > 0
        if not (favours_best and beyond_noise(result, settings)):
            return False
    return True


def compare_all(
    scores: pd.DataFrame,
    references: list[str],
    rivals: list[str],
    metrics: dict[str, bool],
    units: list[str],
    settings: Settings,
    scope: str,
) -> pd.DataFrame:
    """One row per (reference, rival, metric): n, mean difference (reference - rival), CI, p and the
    verdict. ``scores`` has a ``metric`` column; ``metrics``: metric -> lower is better."""
    rows: list[dict[str, Any]] = []
    for metric, lower in metrics.items():
        sub = scores[scores.metric == metric]
        for ref in references:
            for rival in rivals:
                if rival == ref:
                    continue
                x, y, unpaired = paired_values(sub, ref, rival, units)
                result = paired_test(x, y, settings.alpha, settings.resamples, settings.seed)
                noise = beyond_noise(result, settings)
                better = result.mean_diff < 0 if lower else result.mean_diff > 0
                verdict = "within noise" if not noise else (f"{ref} better" if better else f"{rival} better")
                rows.append(
                    {
                        "scope": scope,
                        "metric": metric,
                        "better": "lower" if lower else "higher",
                        "reference": ref,
                        "rival": rival,
                        **asdict(result),
                        "unpaired": unpaired,
                        "smallest_p": result.smallest_p,
                        "verdict": verdict,
                    }
                )
    return pd.DataFrame(rows)


# -- the two protocols' paired values ------------------------------------------------------------
CLIP_METRICS = {"forget_acc": True, "control_acc": False}  # metric -> lower is better
CLASSIC_METRICS = dict.fromkeys(("retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap"), True)


def clip_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Protocol A: each method's test accuracy per (dataset, seed)."""
    test = results[(results.split == "test") & results.metric.isin(list(CLIP_METRICS))]
    return test[["method", "dataset", "seed", "metric", "value"]].rename(columns={"value": "score"})


def classic_scores(results: pd.DataFrame, target: str | None) -> pd.DataFrame:
    """Protocol B: each method's distance to Retrain per seed, the quantity its table ranks by:
    ``|metric - Retrain's metric|`` of the same seed, and Avg. Gap itself (already a distance)."""
    test = results[(results.split == "test") & results.metric.isin(list(CLASSIC_METRICS))]
    test = test[["method", "seed", "metric", "value"]]
    gaps = test[test.metric == "avg_gap"].rename(columns={"value": "score"})
    if target is None:
        return gaps
    retrain = test[test.method == target].set_index(["seed", "metric"]).value
    others = test[test.metric != "avg_gap"].copy()
    keys = pd.MultiIndex.from_frame(others[["seed", "metric"]])
    others["score"] = (others.value.to_numpy() - retrain.reindex(keys).to_numpy()).__abs__()
    return pd.concat([others.drop(columns="value"), gaps], ignore_index=True)


def references_of(settings: Settings, methods: list[str]) -> list[str]:
    """The methods every other is compared with: the configured ones, or NegMerge where the run has it."""
    if settings.reference is not None:
        return [m for m in settings.reference if m in methods]
    return ["negmerge"] if "negmerge" in methods else []


def describe(settings: Settings, pairs: str) -> str:
    """One sentence saying which test decides, at which alpha, paired over what."""
    if settings.test == "bootstrap":
        how = f"a paired bootstrap {100 * (1 - settings.alpha):g}% CI of the mean difference excluding 0"
        tool = "scipy.stats.bootstrap, paired, percentile"
    else:
        how = f"a two-sided paired permutation test of the mean difference at alpha = {settings.alpha:g}"
        tool = "scipy.stats.permutation_test, sign flips"
    return f"{how} ({tool}; {settings.resamples} resamples, exact when 2^n is fewer), paired over {pairs}"


def summary_lines(table: pd.DataFrame, settings: Settings, pairs: str, what: str) -> list[str]:
    """summary.md's significance section for the comparisons ``table`` (``compare_all``)."""
    lines = ["## Significance", ""]
    if table.empty:
        return lines + ["No reference method in this run (report.significance.reference): nothing compared.", ""]
    lines += [
        f"Each reference is compared with every other method on {what} by {describe(settings, pairs)}. "
        "A difference is beyond noise only when that test says so; otherwise it is within noise, "
        "whatever the means say.",
        "",
    ]
    for n in sorted(set(table.n)):
        smallest = 2.0 / 2.0**n if n else 1.0
        line = (
            f"- n = {n} pairs: the smallest p an exact two-sided permutation test can give is 2/{2**n} = {smallest:.4g}"
        )
        if settings.test == "permutation" and smallest > settings.alpha:
            line += f", above alpha = {settings.alpha:g}: no difference at this n can be called beyond noise"
        lines.append(line)
    lines.append("")
    shown = table.assign(
        diff=table.mean_diff.map(lambda v: f"{v:+.2f}"),
        ci=[f"[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else "--" for lo, hi in zip(table.ci_low, table.ci_high)],
        p=table.p_value.map(lambda v: f"{v:.4g}"),
    )[["reference", "rival", "metric", "better", "n", "diff", "ci", "p", "verdict"]]
    shown.columns = ["reference", "vs", "metric", "better", "n", "mean diff (ref - vs)", "CI", "p", "verdict"]
    beyond = table[table.verdict != "within noise"]
    lines += [shown.to_markdown(index=False), ""]
    if beyond.empty:
        lines.append("No difference is beyond noise.")
    else:
        said = [
            f"{r.verdict} than {r.rival if r.verdict == f'{r.reference} better' else r.reference} on {r.metric}"
            for r in beyond.itertuples()
        ]
        lines.append("Beyond noise: " + "; ".join(said) + ".")
    return [*lines, ""]
