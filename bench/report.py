"""``negmerge-bench report RUN_DIR``: tables, figures and a summary from a run's files alone.

Reads results.csv, curves.csv, manifest.json (and the ablation files if present); loads no model and
recomputes nothing, so it takes seconds. Writes RUN_DIR/report/: LaTeX tables (pandas Styler,
booktabs, a best entry bold only where it is beyond noise: bench.significance), figures as PDF and PNG
(matplotlib), significance.csv and summary.md. A run selected at several (rule, floor) criteria gets
its main table and figures at the first, and one table (``table_RULE_floorF.tex``), trade-off figure
and summary section per criterion.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.io import write_atomic, write_text_atomic  # noqa: E402
from bench.report_cost import cost_quality_figure  # noqa: E402
from bench.runfiles import load_run, read_table  # noqa: E402, F401  (load_run: the report's entry reads a run)
from bench.sanity import classic_sanity  # noqa: E402
from bench.selection import select_lambda  # noqa: E402
from bench.significance import (  # noqa: E402
    CLASSIC_METRICS,
    CLIP_METRICS,
    Settings,
    better_by_noise,
    classic_scores,
    clip_scores,
    compare_all,
    describe,
    references_of,
    summary_lines,
)
from bench.studies import POOLS_FILE, THRESHOLD_FILE  # noqa: E402

FALLBACK_COLOURS = ("tab:gray", "tab:brown", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")


def _method(name: str):
    """The registry entry of ``name``; a run can hold a method this checkout does not register (made
    by another version, or registered by a plugin): it is drawn with its name and a stable colour."""
    from baselines import Method, find_method

    found = find_method(name)
    if found is not None:
        return found
    base = find_method(_base(name))
    if base is not None:  # one setting of a registered method (SISA's sisa[S=5,R=4]): its colour and kind
        setting = name[len(base.name) :].strip("[]").replace(",", ", ")
        return Method(name, base.kind, f"{base.display} ({setting})", base.colour, protocols=base.protocols)
    colour = FALLBACK_COLOURS[zlib.crc32(name.encode()) % len(FALLBACK_COLOURS)]
    return Method(name, "single", name.replace("_", r"\_"), colour)


def _base(name: str) -> str:
    """The registered method a row name is a setting of: ``sisa[S=5,R=4]`` -> ``sisa``."""
    return name.split("[", 1)[0]


def display(name: str) -> str:
    return _method(name).display


def plain(name: str) -> str:
    return _method(name).plain if find_registered(name) else name


def colour(name: str) -> str:
    return _method(name).colour


def find_registered(name: str) -> bool:
    from baselines import find_method

    return find_method(_base(name)) is not None


def kind(name: str) -> str:
    return _method(name).kind if find_registered(name) else "unregistered"


def marker(name: str, default: str = "o") -> str:
    return "*" if _method(name).emphasis else default


def references(role: str) -> list[str]:
    """Registered reference rows with ``role`` (before: zero-shot / Original; target: Retrain)."""
    from baselines import all_methods

    return [m.name for m in all_methods("reference") if m.role == role]


def _ordered(methods) -> list[str]:
    """Registry order (references, training methods, SISA, single best, merges), a method's settings in
    the order the run wrote them; unregistered names last."""
    from baselines import all_methods

    order = [m.name for m in all_methods()]
    return sorted(methods, key=lambda m: order.index(_base(m)) if _base(m) in order else len(order))


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.pdf", out / f"{stem}.png"]
    fig.set_layout_engine("constrained")  # no title/label overlap between stacked panels
    write_atomic(paths[0], lambda f: fig.savefig(f, format="pdf"), mode="wb")
    write_atomic(paths[1], lambda f: fig.savefig(f, format="png", dpi=150), mode="wb")
    plt.close(fig)
    return paths


def _tex(text: str) -> str:
    """Plain text for a LaTeX caption."""
    return text.replace("%", "\\%").replace("^n", "$^n$").replace("_", "\\_")


def _method_point(ax, method: str, x: float, y: float) -> None:
    """One method as a point of a trade-off plot, in its registry colour and marker."""
    ax.scatter(
        x, y, color=colour(method), s=50, label=plain(method), marker=marker(method), edgecolor="k", linewidth=0.5
    )


def _bold(props_mask: pd.DataFrame) -> pd.DataFrame:
    return props_mask.replace({True: "textbf:--rwrap;", False: ""})


# -- Protocol A ----------------------------------------------------------------------------------
def clip_table(results: pd.DataFrame) -> pd.DataFrame:
    """method x (dataset, forget/control) test accuracy, mean over seeds, with an Avg. column."""
    test = results[(results.split == "test") & results.metric.isin(["forget_acc", "control_acc"])]
    table = test.pivot_table(index="method", columns=["dataset", "metric"], values="value", aggfunc="mean")
    for metric in ("forget_acc", "control_acc"):
        table[("Avg.", metric)] = table.xs(metric, axis=1, level=1).mean(axis=1)
    datasets = [d for d in table.columns.get_level_values(0).unique() if d != "Avg."] + ["Avg."]
    table = table.reindex(columns=pd.MultiIndex.from_product([datasets, ["forget_acc", "control_acc"]]))
    return table.reindex(_ordered(table.index))


def selection_floor(cfg: dict) -> float:
    """The first (main) floor of a run's config: ``floor``, or the first of ``floors``."""
    sel = cfg["selection"]
    return sel["floor"] if "floor" in sel else sel["floors"][0]


def run_criteria(results: pd.DataFrame) -> list[tuple[str, float]]:
    """(selection rule, floor) of the selected rows, in the order the run wrote them: the first is the
    main table's (bench.selection.criteria)."""
    chosen = results[results.split.isin(["val", "test"]) & results.floor.notna()]
    pairs = zip(chosen.selection_rule, chosen.floor.astype(float))
    return list(dict.fromkeys(pairs))


def at_criterion(results: pd.DataFrame, rule: str, floor: float) -> pd.DataFrame:
    """The rows selected by (rule, floor), and the rows no selection made (consensus rates)."""
    selected = (results.selection_rule == rule) & np.isclose(results.floor.astype(float), floor)
    return results[selected | ~results.split.isin(["val", "test"])]


def _tag(rule: str, floor: float) -> str:
    return f"{rule.replace('-', '_')}_floor{floor:g}"


def clip_latex(
    table: pd.DataFrame, manifest: dict, results: pd.DataFrame, rule: str | None = None, floor: float | None = None
) -> str:
    """The table in LaTeX. A column's best entry (lowest forget, highest control) is bold only when a
    paired test (bench.significance) puts it beyond noise against every other method of the column."""
    shown = table.rename(index=display).rename(
        columns={"forget_acc": r"$D_f\downarrow$", "control_acc": r"$D_r$"}, level=1
    )
    settings = Settings.from_manifest(manifest)
    scores = clip_scores(results)
    candidates = [m for m in table.index if kind(m) != "reference"]  # a reference is never "best"
    mask = pd.DataFrame(False, index=shown.index, columns=shown.columns)
    for (dataset, metric), shown_col in zip(table.columns, shown.columns):
        values = table.loc[candidates, (dataset, metric)]
        if values.notna().sum() < 1:
            continue
        lower = CLIP_METRICS[metric]
        best = values.idxmin() if lower else values.idxmax()
        sub = scores[scores.metric == metric]
        units = ["dataset", "seed"] if dataset == "Avg." else ["seed"]
        if dataset != "Avg.":
            sub = sub[sub.dataset == dataset]
        if better_by_noise(sub, best, candidates, units, lower, settings):
            mask.loc[display(best), shown_col] = True
    cfg = manifest["config"]
    floor = selection_floor(cfg) if floor is None else floor
    how = (
        f"the largest $\\lambda$ keeping control Val $\\geq$ {floor}$\\times$ zero-shot (no forget data read)"
        if rule == "control_only"
        else f"$\\lambda$ chosen on Val with control floor {floor}$\\times$ zero-shot"
    )
    caption = (
        f"Task negation on {cfg['backbone']['name']}: test top-1 (\\%) on each forget dataset ($D_f$, lower is "
        f"better) and on the control {cfg['control']} ($D_r$); {how}. "
        f"Seeds: {', '.join(map(str, cfg['seeds']))}. "
        f"Bold: the best entry of a column, only where it is better than every other method there by "
        f"{_tex(describe(settings, 'seeds (Avg.: datasets x seeds)'))}; a column without bold has no such entry."
    )
    styler = shown.style.format("{:.2f}", na_rep="--").apply(lambda _: _bold(mask), axis=None)
    return styler.to_latex(
        hrules=True,
        caption=caption,
        label=f"tab:{cfg['name']}",
        multicol_align="c",
        column_format="l" + "r" * len(shown.columns),
        position_float="centering",
    )


def clip_figures(
    results: pd.DataFrame,
    curves: pd.DataFrame,
    out: Path,
    floor: float,
    ablation: pd.DataFrame | None,
    ablation_method: str = "negmerge",
) -> list[Path]:
    paths: list[Path] = []
    test = results[results.split == "test"]
    datasets = sorted(test.dataset.unique())
    # 1. trade-off
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = test[test.dataset == ds].pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
        for m in _ordered(sub.index):
            _method_point(ax, m, sub.loc[m, "control_acc"], sub.loc[m, "forget_acc"])
        ax.set(title=ds, xlabel="control accuracy (%), test", ylabel="forget accuracy (%), test (lower is better)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Forgetting vs. retained control accuracy")
    paths += _save(fig, out, "tradeoff")
    # 2. lambda curves
    if not curves.empty:
        merges = [m for m in _ordered(curves.method.unique()) if not m.startswith("candidate:")]
        fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.2 * len(datasets)), squeeze=False)
        zs = results[(results.method.isin(references("before"))) & (results.split == "val")]
        for row, ds in zip(axes, datasets):
            c = curves[(curves.dataset == ds) & (curves.seed == curves.seed.min())]
            for m in merges:
                cm = c[c.method == m]
                row[0].plot(cm.lam, cm.forget_val, color=colour(m), label=plain(m), marker=".")
                row[1].plot(cm.lam, cm.control_val, color=colour(m), label=plain(m), marker=".")
            zc = zs[(zs.dataset == ds) & (zs.metric == "control_acc")].value
            if len(zc):
                row[1].axhline(floor * zc.iloc[0], color="k", ls="--", lw=1, label=f"floor ({floor} x zero-shot)")
            row[0].set(title=f"{ds}: forget (Val)", xlabel="lambda", ylabel="accuracy (%)")
            row[1].set(title=f"{ds}: control (Val)", xlabel="lambda", ylabel="accuracy (%)")
            for ax in row:
                ax.grid(alpha=0.3)
        axes[0][1].legend(fontsize=7)
        paths += _save(fig, out, "lambda_curves")
        paths += _sensitivity(results, curves, out, floor, "control_acc")
    # 3. per-dataset bars
    paths += _bars(test, "forget_acc", "forget accuracy (%), test", out, "per_dataset_forget")
    # 4. pool-size ablation
    if ablation is not None and not ablation.empty:
        paths += _ablation_figure(ablation, out, ablation_method)
    return paths


def _sensitivity(results: pd.DataFrame, curves: pd.DataFrame, out: Path, floor: float, ref_metric: str) -> list[Path]:
    """Every single candidate at its own selected lambda, beside the merges: the motivating picture."""
    val = results[results.split == "val"]
    datasets = sorted(curves.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        c = curves[(curves.dataset == ds) & (curves.seed == curves.seed.min())]
        ref = val[(val.dataset == ds) & (val.method.isin(references("before"))) & (val.metric == ref_metric)].value
        if ref.empty:
            continue
        singles = []
        for m in sorted(
            (m for m in c.method.unique() if m.startswith("candidate:")), key=lambda s: int(s.split(":")[1])
        ):
            cm = c[c.method == m].sort_values("lam")
            sel = select_lambda(list(cm.lam), list(cm.forget_val), list(cm.control_val), ref.iloc[0], floor)
            singles.append(sel.forget_val if sel.feasible else np.nan)
        ax.bar(range(len(singles)), singles, color="0.7", label="single candidates")
        shown = [v for v in singles if np.isfinite(v)]
        for m in [m for m in _ordered(val.method.unique()) if kind(m) == "merge"]:
            v = val[(val.dataset == ds) & (val.method == m) & (val.metric == "forget_acc")].value
            if len(v):
                ax.axhline(v.mean(), color=colour(m), lw=2, ls="-" if marker(m) == "*" else "--", label=plain(m))
                shown.append(v.mean())
        if shown:  # zoom to the values: the spread between settings is the point of this figure
            low, high = min(shown), max(shown)
            pad = max(1.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
        ax.set(
            title=ds, xlabel="candidate (hyperparameter setting)", ylabel="forget accuracy (%), Val, at selected lambda"
        )
        ax.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Hyperparameter sensitivity: each candidate alone vs. the merges")
    return _save(fig, out, "sensitivity")


def _bars(test: pd.DataFrame, metric: str, ylabel: str, out: Path, stem: str) -> list[Path]:
    sub = test[test.metric == metric]
    mean = sub.pivot_table(index="dataset", columns="method", values="value", aggfunc="mean")
    std = sub.pivot_table(index="dataset", columns="method", values="value", aggfunc="std").reindex_like(mean)
    methods = _ordered(mean.columns)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(mean) * len(methods) / 3), 3.8))
    width = 0.8 / len(methods)
    x = np.arange(len(mean))
    for i, m in enumerate(methods):
        err = std[m].fillna(0).values if std is not None else None
        ax.bar(x + i * width, mean[m].values, width, yerr=err, color=colour(m), label=plain(m), capsize=2)
    ax.set_xticks(x + 0.4 - width / 2, mean.index)
    ax.set(ylabel=ylabel)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out, stem)


def _ablation_figure(ablation: pd.DataFrame, out: Path, method: str) -> list[Path]:
    datasets = sorted(ablation.dataset.unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ds in datasets:
        a = ablation[ablation.dataset == ds].groupby("n")
        for ax, col in zip(axes, ("consensus_rate", "forget_val")):
            mean, std = a[col].mean(), a[col].std().fillna(0)
            scale = 100 if col == "consensus_rate" else 1
            ax.errorbar(mean.index, mean * scale, yerr=std * scale, marker="o", capsize=3, label=ds)
    axes[0].set(
        xlabel="number of merged candidates N",
        ylabel="consensus rate (% of elements kept)",
        title=f"{plain(method)} consensus vs. pool size",
    )
    axes[1].set(
        xlabel="number of merged candidates N",
        ylabel="forget accuracy (%), Val, selected lambda",
        title=f"{plain(method)} forgetting vs. pool size",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, "consensus_vs_n")


# -- the threshold and sub-pool studies (both protocols) -------------------------------------------
def _study_panels(labels: tuple[str, str]) -> list[tuple[str, str, float]]:
    """(column, y label, scale) of a study figure's panels: forget, control, consensus rate."""
    return [
        ("forget_test", f"{labels[0]} (%), test, selected lambda", 1.0),
        ("control_test", f"{labels[1]} (%), test, selected lambda", 1.0),
        ("consensus_rate", "consensus rate (% of elements kept)", 100.0),
    ]


def threshold_figure(rows: pd.DataFrame, out: Path, labels: tuple[str, str]) -> list[Path]:
    """NegMerge's forget and control accuracy and consensus rate against the threshold t (mean over
    seeds, one line per dataset)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ds in sorted(rows.dataset.unique()):
        mean = rows[rows.dataset == ds].groupby("threshold")[["forget_test", "control_test", "consensus_rate"]].mean()
        for ax, (col, ylabel, scale) in zip(axes, _study_panels(labels)):
            ax.plot(mean.index, mean[col] * scale, marker="o", label=ds)
            ax.set(xlabel="consensus threshold t", ylabel=ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("NegMerge against its threshold t (full pool; t = 1.0 is the released rule)")
    return _save(fig, out, "threshold_study")


def pools_figure(rows: pd.DataFrame, out: Path, labels: tuple[str, str]) -> list[Path]:
    """Every merge over every sub-pool: forget and control accuracy at the selected lambda and the
    consensus rate (mean over seeds), one row of panels per dataset."""
    datasets = sorted(rows.dataset.unique())
    pools = list(dict.fromkeys(rows["pool"]))
    merges = _ordered(rows.method.unique())
    fig, axes = plt.subplots(len(datasets), 3, figsize=(13, 3.4 * len(datasets)), squeeze=False)
    width = 0.8 / max(1, len(merges))
    x = np.arange(len(pools))
    for row_axes, ds in zip(axes, datasets):
        mean = (
            rows[rows.dataset == ds]
            .groupby(["pool", "method"])[["forget_test", "control_test", "consensus_rate"]]
            .mean()
        )
        sizes = rows[rows.dataset == ds].groupby("pool").n.first()
        for ax, (col, ylabel, scale) in zip(row_axes, _study_panels(labels)):
            shown = []
            for i, m in enumerate(merges):
                values = [mean[col].get((p, m), np.nan) * scale for p in pools]
                ax.bar(x + i * width, values, width, color=colour(m), label=plain(m))
                shown += [v for v in values if np.isfinite(v)]
            if shown and col != "consensus_rate":  # zoom to the values: the differences are the point
                low, high = min(shown), max(shown)
                pad = max(1.0, 0.15 * (high - low))
                ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
            ax.set_xticks(x + 0.4 - width / 2, [f"{p}\n(N={sizes.get(p, '?')})" for p in pools], fontsize=7)
            ax.set(ylabel=ylabel, title=ds)
            ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("Merges over sub-pools of the same candidates")
    return _save(fig, out, "pool_study")


def studies_markdown(thresholds: pd.DataFrame | None, pools: pd.DataFrame | None) -> list[str]:
    """summary.md's study tables (means over datasets and seeds)."""
    lines: list[str] = []
    cols = ["n", "lam", "forget_test", "control_test", "consensus_rate"]
    if thresholds is not None and not thresholds.empty:
        table = thresholds.groupby("threshold")[cols].mean()
        table["consensus_rate"] *= 100
        lines += ["## Threshold study (NegMerge, full pool)", "", table.round(2).to_markdown(), ""]
    if pools is not None and not pools.empty:
        table = pools.assign(merge=pools.method.map(plain)).groupby(["pool", "merge"], sort=False)[cols].mean()
        table["consensus_rate"] *= 100
        lines += ["## Sub-pool study", "", table.round(2).reset_index().to_markdown(index=False), ""]
    return lines


def _studies(run_dir: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    files = [run_dir / THRESHOLD_FILE, run_dir / POOLS_FILE]
    return tuple(read_table(f) if f.is_file() else None for f in files)


# -- Protocol B ----------------------------------------------------------------------------------
CLASSIC_COLS = {
    "retain_acc": r"$D_r$",
    "forget_acc": r"$D_f$",
    "test_acc": r"$D_{test}$",
    "mia_efficacy": "MIA",
    "avg_gap": r"Avg. Gap$\downarrow$",
}


def classic_table(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Test metrics per method: mean and std over seeds, and how many seeds each mean covers.

    Every method of the run gets a row, also one whose selection found no feasible setting in some
    or all seeds (its cells are then NaN): a table that silently drops a method misleads.
    """
    test = results[(results.split == "test") & results.metric.isin(CLASSIC_COLS)]
    mean = test.pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
    # NaN where fewer than two seeds have the metric: a spread of one number is undefined, not zero
    std = test.pivot_table(index="method", columns="metric", values="value", aggfunc="std")
    seeds = test.groupby("method").seed.nunique()
    cols = [c for c in CLASSIC_COLS if c in mean.columns]
    order = _ordered(results.method.unique())
    return (
        mean.reindex(index=order, columns=cols),
        std.reindex(index=order, columns=cols),
        seeds.reindex(order).fillna(0).astype(int),
    )


def _row_labels(seeds: pd.Series, total: int, names: Callable[[str], str]) -> dict[str, str]:
    """Method names, marked where the mean covers fewer seeds than the run had."""
    labels = {}
    for method, n in seeds.items():
        name = names(method)
        if n == 0:
            name += " (no feasible setting)"
        elif n < total:
            name += f" ({n}/{total} seeds)"
        labels[method] = name
    return labels


def _mean_pm_std(mean: pd.DataFrame, std: pd.DataFrame, pm: str) -> pd.DataFrame:
    """'mean ± std'; a mean of one seed has no spread and prints alone (its row says n/N seeds)."""
    spread = (pm + std.map(lambda v: f"{v:.2f}")).where(std.notna(), "")
    cells = mean.map(lambda v: f"{v:.2f}") + spread
    return cells.where(mean.notna(), "--")


def classic_markdown(mean: pd.DataFrame, std: pd.DataFrame, seeds: pd.Series, total_seeds: int) -> str:
    """The summary's table: 'mean ± std' per method and metric, rows marked where seeds are missing."""
    return _mean_pm_std(mean, std, " ± ").rename(index=_row_labels(seeds, total_seeds, plain)).to_markdown()


def classic_latex(
    mean: pd.DataFrame,
    std: pd.DataFrame,
    seeds: pd.Series,
    manifest: dict,
    results: pd.DataFrame,
    rule: str | None = None,
    floor: float | None = None,
) -> str:
    """The table in LaTeX. A column's entry closest to Retrain (Avg. Gap: the lowest) is bold only when
    a paired test over seeds of the per-seed distance to Retrain puts it beyond noise against every
    other method (bench.significance)."""
    cfg = manifest["config"]
    settings = Settings.from_manifest(manifest)
    rule = cfg["selection"].get("rule", "floor") if rule is None else rule
    floor = selection_floor(cfg) if floor is None else floor
    cells = _mean_pm_std(mean, std, r" $\pm$ ")
    rivals = [m for m in mean.index if kind(m) != "reference"]
    mask = pd.DataFrame(False, index=mean.index, columns=mean.columns)
    target = next((m for m in references("target") if m in mean.index), None)
    if target is not None and rivals:
        scores = classic_scores(results, target)
        for col in mean.columns:
            closeness = (
                mean.loc[rivals, col] if col == "avg_gap" else (mean.loc[rivals, col] - mean.loc[target, col]).abs()
            )
            if not closeness.notna().any():
                continue
            best = closeness.idxmin()
            if better_by_noise(scores[scores.metric == col], best, rivals, ["seed"], True, settings):
                mask.loc[best, col] = True
    labels = _row_labels(seeds, len(cfg["seeds"]), display)
    shown = cells.rename(index=labels, columns=CLASSIC_COLS)
    mask = mask.rename(index=labels, columns=CLASSIC_COLS)
    forget = cfg["forget"]
    what = (
        f"Forgetting class{'es' if len(forget['classes']) > 1 else ''} {', '.join(map(str, forget['classes']))}"
        if forget.get("mode") == "class"
        else f"Random {100 * forget['fraction']:.0f}\\% forgetting"
    )
    caption = (
        f"{what} on {cfg['dataset']} with {cfg['model']['name']}: "
        f"accuracy (\\%) on $D_r$, $D_f$, $D_{{test}}$, MIA-efficacy, and the average gap to Retrain (lower is "
        f"better); mean $\\pm$ std over {len(cfg['seeds'])} seeds; selection: {rule.replace('_', ' ')} "
        f"(floor {floor}); BatchNorm: {cfg['bn']}. Bold: the entry closest to Retrain, only where its per-seed distance to "
        f"Retrain is smaller than every other method's by {_tex(describe(settings, 'seeds'))}; a column "
        "without bold has no such entry."
    )
    styler = shown.style.apply(lambda _: _bold(mask), axis=None)
    return styler.to_latex(
        hrules=True,
        caption=caption,
        label=f"tab:{cfg['name']}",
        column_format="l" + "r" * len(shown.columns),
        position_float="centering",
    )


def classic_figures(results: pd.DataFrame, curves: pd.DataFrame, out: Path, floor: float) -> list[Path]:
    paths: list[Path] = []
    test = results[results.split == "test"]
    mean, std, _ = classic_table(results)
    mean = mean.dropna(how="all")  # methods with no feasible setting have nothing to plot
    std = std.loc[mean.index].fillna(0.0)  # one seed: no error bar
    if "avg_gap" in mean:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        gap = mean["avg_gap"].drop(references("target"), errors="ignore")
        ax.bar(
            [plain(m) for m in gap.index],
            gap.values,
            yerr=std.loc[gap.index, "avg_gap"].values,
            capsize=3,
            color=[colour(m) for m in gap.index],
        )
        ax.set(ylabel="Avg. Gap to Retrain (points, lower is better)", title="Distance to Retrain")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3, axis="y")
        paths += _save(fig, out, "avg_gap")
        fig, ax = plt.subplots(figsize=(5, 4))
        for m in mean.index:
            ax.errorbar(
                mean.loc[m, "test_acc"],
                mean.loc[m, "forget_acc"],
                xerr=std.loc[m, "test_acc"],
                yerr=std.loc[m, "forget_acc"],
                fmt=marker(m),
                color=colour(m),
                label=plain(m),
            )
        ax.set(xlabel="test accuracy (%)", ylabel="forget-set accuracy (%)", title="Forgetting vs. utility")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths += _save(fig, out, "tradeoff")
    if not curves.empty:
        merges = [m for m in _ordered(curves.method.unique()) if not m.startswith("candidate:")]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        c = curves[curves.seed == curves.seed.min()]
        for m in merges:
            cm = c[c.method == m]
            axes[0].plot(cm.lam, cm.forget_val, marker=".", color=colour(m), label=plain(m))
            axes[1].plot(cm.lam, cm.control_val, marker=".", color=colour(m), label=plain(m))
        retrain = test[(test.method.isin(references("target"))) & (test.metric == "forget_acc")].value.mean()
        axes[0].axhline(retrain, color="k", ls=":", label="Retrain (test)")
        axes[0].set(xlabel="lambda", ylabel="forget-set accuracy (%)", title="Df accuracy vs lambda")
        axes[1].set(xlabel="lambda", ylabel="validation accuracy (%)", title="Val accuracy vs lambda")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        paths += _save(fig, out, "lambda_curves")
        paths += _sensitivity(results, curves, out, floor, "control_acc")
    return paths


# -- entry point ---------------------------------------------------------------------------------
def significance_table(results: pd.DataFrame, manifest: dict) -> tuple[pd.DataFrame, list[str]]:
    """Every reference method against every other method, per metric (bench.significance): Protocol A
    pooled over datasets x seeds and per dataset over seeds, Protocol B over seeds (the distance to
    Retrain); and the summary's section on the pooled comparisons."""
    settings = Settings.from_manifest(manifest)
    methods = [m for m in _ordered(results.method.unique()) if kind(m) != "reference"]
    refs = references_of(settings, methods)
    if manifest["config"]["protocol"] == "clip":
        scores = clip_scores(results)
        pooled = compare_all(scores, refs, methods, CLIP_METRICS, ["dataset", "seed"], settings, "all datasets")
        per_dataset = [
            compare_all(scores[scores.dataset == ds], refs, methods, CLIP_METRICS, ["seed"], settings, ds)
            for ds in sorted(scores.dataset.unique())
        ]
        table = pd.concat([pooled, *per_dataset], ignore_index=True)
        lines = summary_lines(
            pooled, settings, "datasets x seeds", "test accuracy (forget: lower is better, control: higher)"
        )
    else:
        target = next((m for m in references("target") if m in set(results.method)), None)
        scores = classic_scores(results, target)
        table = compare_all(scores, refs, methods, CLASSIC_METRICS, ["seed"], settings, "all seeds")
        lines = summary_lines(
            table,
            settings,
            "seeds",
            "the distance to Retrain per seed (|metric - Retrain's|; Avg. Gap itself; lower is better)",
        )
    return table, lines


def markdown_summary(
    results: pd.DataFrame, manifest: dict, table_md: str, significance: list[str] = (), studies: list[str] = ()
) -> str:
    cfg = manifest["config"]
    lines = [f"# {cfg['name']} ({cfg['protocol']} protocol)", "", cfg.get("description", ""), "", table_md, ""]
    lines += [*significance, *studies]
    sel = pd.DataFrame(manifest.get("selections", []))
    if not sel.empty:
        edge = sel[sel.get("at_grid_edge", False) == True]  # noqa: E712
        tagged = "floor" in sel and len(sel[["floor", "selection_rule"]].drop_duplicates()) > 1
        for _, r in edge.iterrows():
            where = f" [{r['selection_rule']}, floor {r['floor']:g}]" if tagged else ""
            lines.append(
                f"- warning: {r['dataset']} seed {r['seed']} {r['method']}: lambda {r['lam']} is at the grid's edge{where}"
            )
    if cfg["protocol"] == "classic":
        lines += [f"- warning: {problem}" for problem in classic_sanity(results)]
    for note in manifest.get("notes", []):
        lines.append(f"- {note}")
    for bad in manifest.get("bad_images", []):
        lines.append(f"- left out ({bad['split']}): {bad['problem']}")
    git = manifest.get("git", {})
    lines += ["", f"commit {git.get('commit')} (dirty: {git.get('dirty')}), wall time {manifest.get('wall_seconds')} s"]
    return "\n".join(lines) + "\n"


def _tables(results: pd.DataFrame, manifest: dict, rule: str | None, floor: float | None) -> tuple[str, str]:
    """(LaTeX, markdown) of the test table of ``results`` (already at one criterion)."""
    cfg = manifest["config"]
    if cfg["protocol"] == "clip":
        table = clip_table(results)
        md = table.rename(index=plain).round(2)
        md.columns = [f"{d} {'forget' if m == 'forget_acc' else 'control'}" for d, m in md.columns]
        return clip_latex(table, manifest, results, rule, floor), md.to_markdown()
    mean, std, seeds = classic_table(results)
    tex = classic_latex(mean, std, seeds, manifest, results, rule, floor)
    return tex, classic_markdown(mean, std, seeds, len(cfg["seeds"]))


def build_report(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    results, curves, manifest = load_run(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = manifest["config"]
    found = run_criteria(results)
    several = len(found) > 1
    main_rule, floor = found[0] if found else (None, selection_floor(cfg))
    main = at_criterion(results, main_rule, floor) if several else results  # one criterion: every row
    written: list[Path] = []
    tex, table_md = _tables(main, manifest, main_rule if several else None, floor if several else None)
    written.append(write_text_atomic(out / "table.tex", tex))
    if cfg["protocol"] == "clip":
        ablation = pd.read_csv(run_dir / "ablation.csv") if (run_dir / "ablation.csv").is_file() else None
        ablated = (cfg.get("ablation") or {}).get("method", "negmerge")  # runs before the option: NegMerge
        written += clip_figures(main, curves, out, floor, ablation, ablated)
        written += cost_quality_figure(main, "clip", out, _save, plain, colour, ablation, ablated)
    else:
        written += classic_figures(main, curves, out, floor)
        written += cost_quality_figure(main, "classic", out, _save, plain, colour)
    if several:  # one table, trade-off figure and summary section per criterion
        sections = [f"Selection: {main_rule}, floor {floor:g} (the main table; the other criteria below)", "", table_md]
        for i, (rule, f) in enumerate(found):
            rows = at_criterion(results, rule, f)
            tex, md = _tables(rows, manifest, rule, f)
            written.append(write_text_atomic(out / f"table_{_tag(rule, f)}.tex", tex))
            written += _criterion_figure(rows, cfg["protocol"], out, _tag(rule, f), f"{rule}, floor {f:g}")
            if i:
                sections += ["", f"## Selection: {rule}, floor {f:g}", "", md]
        table_md = "\n".join(sections)
    thresholds, pools = _studies(run_dir)
    labels = ("forget accuracy", "control accuracy") if cfg["protocol"] == "clip" else ("Df accuracy", "test accuracy")
    if thresholds is not None and not thresholds.empty:
        written += threshold_figure(thresholds, out, labels)
    if pools is not None and not pools.empty:
        written += pools_figure(pools, out, labels)
    significance, significance_md = significance_table(main, manifest)
    written.append(write_text_atomic(out / "significance.csv", significance.to_csv(index=False)))
    summary = markdown_summary(main, manifest, table_md, significance_md, studies_markdown(thresholds, pools))
    written.append(write_text_atomic(out / "summary.md", summary))
    return written


def _criterion_figure(results: pd.DataFrame, protocol: str, out: Path, tag: str, title: str) -> list[Path]:
    """Test forget vs. control accuracy per method at one criterion (Protocol A: per dataset)."""
    test = results[results.split == "test"]
    control = "control_acc" if protocol == "clip" else "test_acc"
    groups = sorted(test.dataset.unique()) if protocol == "clip" else [None]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], groups):
        sub = test if ds is None else test[test.dataset == ds]
        means = sub.pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
        for m in _ordered(means.index):
            if {control, "forget_acc"} <= set(means.columns) and means.loc[m, [control, "forget_acc"]].notna().all():
                _method_point(ax, m, means.loc[m, control], means.loc[m, "forget_acc"])
        ax.set(title=ds or title, xlabel=f"{control.replace('_', ' ')} (%), test", ylabel="forget accuracy (%), test")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Forgetting vs. retained accuracy ({title})")
    return _save(fig, out, f"tradeoff_{tag}")
