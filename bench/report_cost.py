"""The cost-quality figure: what each method achieves against the training it needed (bench.cost).

NegMerge does not save computation; it spends a sweep the user may run anyway. The figure puts every
method at its whole recipe's training samples (log x) against its quality, marks the methods no other
method beats on both axes (the Pareto front), and draws the pool-size ablation (a merge over N
candidates costs N candidates' training) as a curve, so "how many fine-tunes is NegMerge worth"
can be read off it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

QUALITY = {  # protocol -> (metric, split, axis label); lower is better for both
    "clip": ("forget_acc", "test", "forget accuracy (%), test, selected lambda"),
    "classic": ("avg_gap", "test", "Avg. Gap to Retrain (test metrics)"),
}


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.Index:
    """Rows no other row beats on both ``x`` and ``y`` (lower is better on both; ties kept)."""
    front = []
    for i, p in points.iterrows():
        dominated = ((points[x] <= p[x]) & (points[y] <= p[y]) & ((points[x] < p[x]) | (points[y] < p[y]))).any()
        if not dominated:
            front.append(i)
    return pd.Index(front)


def cost_points(results: pd.DataFrame, protocol: str, split: str | None = None) -> pd.DataFrame:
    """Per method: mean training samples of its recipe and mean quality, over datasets and seeds."""
    metric, default_split, _ = QUALITY[protocol]
    if protocol == "clip" and split == "val":
        metric = "forget_acc"
    rows = results[(results.metric == metric) & (results.split == (split or default_split))]
    rows = rows.dropna(subset=["value", "train_samples"])
    rows = rows[~rows.method.str.startswith("candidate:")]
    grouped = rows.groupby("method")
    return pd.DataFrame({"train_samples": grouped.train_samples.mean(), "quality": grouped.value.mean()})


def ablation_curve(ablation: pd.DataFrame, costs: pd.DataFrame, method: str) -> pd.DataFrame | None:
    """The pool-size ablation as (training samples, mean forget Val) per N: N candidates cost N times
    a candidate's mean training (the full pool's cost over its size, from the merge's own row)."""
    pool_cost = costs[costs.method == method].train_samples_unlearn.dropna()
    if ablation is None or ablation.empty or pool_cost.empty:
        return None
    n_full = ablation.n.max()
    per_candidate = float(pool_cost.mean()) / n_full
    curve = ablation.groupby("n").forget_val.mean()
    return pd.DataFrame({"train_samples": curve.index * per_candidate, "quality": curve.values, "n": curve.index})


def cost_quality_figure(
    results: pd.DataFrame,
    protocol: str,
    out: Path,
    save,
    label,
    colour,
    ablation: pd.DataFrame | None = None,
    ablated: str = "negmerge",
) -> list[Path]:
    """report/cost_quality.{pdf,png}; ``save(fig, out, stem)``, ``label`` and ``colour`` (of a method)
    from the report."""
    if "train_samples" not in results.columns or results.train_samples.isna().all():
        return []  # a run from before cost columns, or a pool from disk: nothing to draw
    panels = [(None, QUALITY[protocol][2])]
    curve = None
    if protocol == "clip" and ablation is not None:
        costs = results.drop_duplicates(["dataset", "seed", "method"])
        curve = ablation_curve(ablation, costs, ablated)
        if curve is not None:
            panels.append(("val", "forget accuracy (%), Val, selected lambda"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.0), squeeze=False)
    for ax, (split, ylabel) in zip(axes[0], panels):
        points = cost_points(results, protocol, split)
        drawn = points[points.train_samples > 0]
        front = pareto_front(drawn, "train_samples", "quality")
        for k, (method, p) in enumerate(drawn.sort_values("quality").iterrows()):
            on_front = method in front
            ax.scatter(
                p.train_samples,
                p.quality,
                s=50 if on_front else 25,
                zorder=3,
                color=colour(method),
                edgecolors="black" if on_front else "none",
            )
            offset = (4, 3) if k % 2 == 0 else (4, -9)  # alternate sides: methods at one cost sit close
            ax.annotate(
                label(method), (p.train_samples, p.quality), fontsize=7, xytext=offset, textcoords="offset points"
            )
        for method, p in points[points.train_samples == 0].iterrows():  # no training: a level, not a point
            ax.axhline(p.quality, color=colour(method), ls=":", lw=1, label=f"{label(method)} (no training)")
        line = drawn.loc[front].sort_values("train_samples")
        ax.step(line.train_samples, line.quality, where="post", color="black", lw=0.8, alpha=0.6, label="Pareto front")
        if split == "val" and curve is not None:
            ax.plot(
                curve.train_samples,
                curve.quality,
                "o--",
                color="tab:red",
                ms=4,
                label=f"{label(ablated)}, N candidates",
            )
            for _, c in curve.iterrows():
                ax.annotate(
                    f"N={int(c.n)}",
                    (c.train_samples, c.quality),
                    fontsize=6,
                    xytext=(2, -8),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor labels collide
        ax.set(xlabel="training samples of the whole recipe (forward + backward)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("cost against quality (lower is better on both axes; ringed: on the Pareto front)", fontsize=9)
    fig.tight_layout()
    return save(fig, out, "cost_quality")
