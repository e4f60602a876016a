"""Several control floors and the forget-free control-only rule (docs/metrics.md#selection): the
selection functions on constructed curves with known answers, and the config forms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from bench.cli import main
from bench.config import load_suite
from bench.errors import BenchError
from bench.selection import Criterion, Selection, best_single, criteria, pick, select_lambda

LAMBDAS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
CONTROL = [80.0, 79.0, 77.0, 76.5, 75.9, 70.0]  # zero-shot 80: floors 0.95 -> 76, 0.9 -> 72, 0.8 -> 64
FORGET = [50.0, 40.0, 30.0, 35.0, 20.0, 10.0]


class Poisoned(Sequence):
    """A forget column that fails the test on any read."""

    def __len__(self) -> int:
        return len(LAMBDAS)

    def __getitem__(self, i):
        raise AssertionError("the control-only rule read a forget number")


@pytest.mark.parametrize(("floor", "expected"), [(0.95, 0.3), (0.9, 0.4), (0.8, 0.5), (0.97, 0.1)])
def test_control_only_is_the_largest_lambda_above_the_floor(floor, expected):
    """Worked by hand: 0.95 x 80 = 76 keeps lambda <= 0.3 (76.5), 0.9 x 80 = 72 adds 0.4 (75.9), 0.8 x 80
    = 64 keeps all; 0.97 x 80 = 77.6 keeps 0.0 and 0.1."""
    sel = select_lambda(LAMBDAS, FORGET, CONTROL, 80.0, floor, rule="control_only")
    assert sel.lam == expected
    assert sel.control_val == CONTROL[LAMBDAS.index(expected)] and sel.forget_val == FORGET[LAMBDAS.index(expected)]
    assert sel.at_grid_edge == (expected == 0.5)


def test_control_only_differs_from_the_floor_rule_on_the_same_curve():
    # the floor rule at 0.95: feasible lambda <= 0.3, lowest forget there is 30 at 0.2
    assert select_lambda(LAMBDAS, FORGET, CONTROL, 80.0, 0.95).lam == 0.2
    assert select_lambda(LAMBDAS, FORGET, CONTROL, 80.0, 0.95, rule="control_only").lam == 0.3


def test_control_only_takes_the_largest_feasible_lambda_past_a_dip_and_in_any_order():
    control = [80.0, 75.0, 78.0]  # 0.1 dips below 76, 0.2 is back above: the largest feasible is 0.2
    assert select_lambda([0.0, 0.1, 0.2], [9.0, 8.0, 7.0], control, 80.0, 0.95, rule="control_only").lam == 0.2
    order = [3, 0, 5, 1, 4, 2]  # the grid given shuffled: the same choice
    shuffled = select_lambda(
        [LAMBDAS[i] for i in order], [FORGET[i] for i in order], [CONTROL[i] for i in order], 80.0, 0.9, "control_only"
    )
    assert shuffled.lam == 0.4


def test_control_only_reads_no_forget_data():
    nan = [math.nan] * len(LAMBDAS)
    for floor in (0.95, 0.9, 0.8):
        expected = select_lambda(LAMBDAS, FORGET, CONTROL, 80.0, floor, rule="control_only").lam
        for forget in (nan, FORGET[::-1], [0.0] * len(LAMBDAS)):
            assert select_lambda(LAMBDAS, forget, CONTROL, 80.0, floor, rule="control_only").lam == expected
        # the pick itself is never handed a forget number it could read
        assert LAMBDAS[pick("control_only", Poisoned(), CONTROL, 80.0, floor, along_lambda=True)] == expected
    with pytest.raises(AssertionError, match="read a forget number"):  # the poison works: the floor rule reads it
        pick("control-floor", Poisoned(), CONTROL, 80.0, 0.95, along_lambda=True)


def test_control_only_among_settings_spends_the_control_budget():
    """Points without a common lambda (trained settings, candidates): the feasible one with the lowest
    control Val, whatever their forget numbers; none feasible is None."""
    control = [79.0, 76.2, 75.0, 77.0]
    assert pick("control_only", Poisoned(), control, 80.0, 0.95, along_lambda=False) == 1
    assert pick("control_only", [], [70.0, 60.0], 80.0, 0.95, along_lambda=False) is None
    sels = [Selection(0.3, f, c, False) for f, c in [(10.0, 78.0), (50.0, 76.1), (5.0, 77.0)]]
    sels.append(Selection(None, None, None, False))  # infeasible: never chosen
    assert best_single(sels, "control_only") == 1
    assert best_single(sels) == 2  # the floor rule: the lowest forget


def test_criteria_are_rule_major_and_avg_gap_keeps_no_floor():
    assert criteria(["control-floor"], [0.95]) == [Criterion("control-floor", 0.95)]
    assert criteria(["floor", "avg_gap", "control_only"], [0.95, 0.8]) == [
        Criterion("floor", 0.95),
        Criterion("floor", 0.8),
        Criterion("avg_gap", 0.95),
        Criterion("control_only", 0.95),
        Criterion("control_only", 0.8),
    ]


def test_single_and_list_forms_of_the_config():
    one = load_suite("mini-clip-tiny").selection
    assert (one.floor_list, one.rule_list) == ([0.95], ["control-floor"])
    assert "floors" not in one.model_dump() and "rules" not in one.model_dump()  # an existing dump is unchanged
    many = load_suite("mini-clip-tiny", ["selection.floors=[0.95, 0.9, 0.8]", "selection.rules=[control_only]"])
    sel = many.selection
    assert (sel.floor_list, sel.rule_list, sel.floor, sel.rule) == (
        [0.95, 0.9, 0.8],
        ["control_only"],
        0.95,
        "control_only",
    )
    assert type(many).model_validate_json(many.model_dump_json()).selection == sel  # a worker reloads the dump
    classic = load_suite("mini-classic-tiny", ["selection.rules=[floor, avg_gap, control_only]"]).selection
    assert classic.rule_list == ["floor", "avg_gap", "control_only"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["selection.floors=[]"], "selection.floors: Value error, floors: give at least one floor"),
        (["selection.floors=[0.9, 1.5]"], "every floor must be in (0, 1], got 1.5"),
        (["selection.floors=[0.9, 0.9]"], "floors: a floor is listed twice"),
        (["selection.floors=0.9"], "selection.floors: Input should be a valid list"),
        (["selection.rules=[avg_gap]"], "selection.rules.0: Input should be 'control-floor' or 'control_only'"),
        (["selection.rules=[]"], "rules: give at least one rule"),
        (["selection.floor=0.9", "selection.floors=[0.9]"], "selection.floor and selection.floors: give one"),
        (["selection.rule=control_only", "selection.rules=[control_only]"], "give one of them, not both"),
    ],
)
def test_bad_floors_and_rules_are_one_error_line(overrides, message, tmp_path, capsys):
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["run", "mini-clip-tiny", *sets, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_a_file_giving_floor_and_floors_is_refused(tmp_path):
    text = (load_suite.__globals__["SUITES_DIR"] / "mini-clip-tiny.yaml").read_text()
    both = text.replace("floor: 0.95}", "floor: 0.95, floors: [0.95, 0.9]}")
    assert both != text
    path = tmp_path / "both.yaml"
    path.write_text(both)
    with pytest.raises(BenchError, match="selection: Value error, give floor or floors, not both"):
        load_suite(str(path))
    # a --set of the list form replaces the file's single form
    assert load_suite("mini-clip-tiny", ["selection.floors=[0.9, 0.8]"]).selection.floor_list == [0.9, 0.8]


# -- end to end: one run at several criteria against the single-criterion run -----------------------
FLOORS = "selection.floors=[0.95, 0.9, 0.8]"
CLIP_QUICK = ["methods=[zeroshot, single_best, negmerge, average, ga]", "mia.enabled=false"]
CLASSIC_QUICK = ["seeds=[0]", "methods=[original, retrain, ga, single_best, negmerge]"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _pair(suite: str, quick: list[str], rules: str, root, monkeypatch, seed_cache=None) -> tuple:
    """The suite run at its one criterion, then at three floors x two rules in a cache holding the
    first run's models and pool but no evaluation: both count their Val passes cold."""
    import shutil

    single_cache, multi_cache = root / "cache-single", root / "cache-multi"
    single_cache.mkdir()
    if seed_cache is not None:
        shutil.copytree(seed_cache, single_cache / seed_cache.name)
    monkeypatch.setenv("NEGMERGE_CACHE", str(single_cache))
    assert main(["run", suite, *_sets(quick), "--out", str(root / "single")]) == 0
    shutil.copytree(single_cache, multi_cache, ignore=lambda d, names: ["evals"] if d == str(single_cache) else [])
    monkeypatch.setenv("NEGMERGE_CACHE", str(multi_cache))
    assert main(["run", suite, *_sets([*quick, FLOORS, rules]), "--out", str(root / "multi")]) == 0
    return root / "single", root / "multi"


@pytest.fixture(scope="module")
def clip_pair(tiny_backbone, tmp_path_factory, module_env):
    rules = "selection.rules=[control-floor, control_only]"
    return _pair(
        "mini-clip-tiny", CLIP_QUICK, rules, tmp_path_factory.mktemp("floors-clip"), module_env, tiny_backbone.parent
    )


@pytest.fixture(scope="module")
def classic_pair(tmp_path_factory, module_env):
    rules = "selection.rules=[floor, control_only]"
    return _pair("mini-classic-tiny", CLASSIC_QUICK, rules, tmp_path_factory.mktemp("floors-classic"), module_env)


def _load(run):
    import json

    import pandas as pd

    return pd.read_csv(run / "results.csv"), json.loads((run / "manifest.json").read_text())


def _check_pair(single, multi, first_rule: str, second_rule: str) -> None:
    import pandas as pd

    one, m1 = _load(single)
    many, m2 = _load(multi)
    # every floor is selected from the same Val curves: not one Val pass more
    assert m1["forward_passes"]["val"] == m2["forward_passes"]["val"] > 0
    # the first criterion's rows (and the rows no selection made) are the single run's, byte for byte
    first = many[((many.floor == 0.95) & (many.selection_rule == first_rule)) | many.floor.isna()]
    pd.testing.assert_frame_equal(first.reset_index(drop=True), one)
    # every method at every criterion
    selected = many[many.split == "val"]
    wanted = {(rule, f) for rule in (first_rule, second_rule) for f in (0.95, 0.9, 0.8)}
    for method, rows in selected.groupby("method"):
        assert set(zip(rows.selection_rule, rows.floor)) == wanted, method
    # one test evaluation per distinct selected point: criteria that agree share it
    for manifest in (m1, m2):
        feasible = pd.DataFrame(manifest["selections"]).query("feasible")
        assert manifest["forward_passes"]["test"] == _distinct_points(feasible)
    assert _distinct_points(feasible) < len(feasible)  # here some criteria do agree


def _distinct_points(sel) -> int:
    """Distinct (dataset, seed, evaluated model, lambda) among selections: what a test pass measures."""
    from bench.report import kind

    # Protocol A's references are all theta_0; a merge is its method; a chosen model is its key
    model = [
        c if isinstance(c, str) else ("theta_0" if kind(m) == "reference" else m)
        for m, c in zip(sel.method, sel.chosen_candidate)
    ]
    return len(set(zip(sel.dataset, sel.seed, model, sel.lam.fillna(-1.0))))  # no lambda: one key, not NaN != NaN


@pytest.mark.integration
def test_clip_several_floors_cost_no_val_pass_and_keep_the_single_floor_rows(clip_pair):
    single, multi = clip_pair
    _check_pair(single, multi, "control-floor", "control_only")


@pytest.mark.integration
def test_classic_several_floors_cost_no_val_pass_and_keep_the_single_floor_rows(classic_pair):
    single, multi = classic_pair
    _check_pair(single, multi, "floor", "control_only")


@pytest.mark.integration
def test_clip_control_only_is_the_largest_lambda_on_the_recorded_curves(clip_pair):
    """Recomputed here from curves.csv and the zero-shot Val row alone."""
    import pandas as pd

    _, multi = clip_pair
    results, curves = pd.read_csv(multi / "results.csv"), pd.read_csv(multi / "curves.csv")
    val = results[(results.split == "val") & (results.selection_rule == "control_only")]
    for (dataset, floor), rows in val.groupby(["dataset", "floor"]):
        reference = rows.query("method == 'zeroshot' and metric == 'control_acc'").value.iloc[0]
        for method in ("negmerge", "average"):
            curve = curves[(curves.dataset == dataset) & (curves.method == method)]
            expected = curve[curve.control_val + 1e-9 >= floor * reference].lam.max()
            got = rows[(rows.method == method) & (rows.metric == "control_acc")]
            assert got.lam.iloc[0] == pytest.approx(expected), (dataset, floor, method)
            assert got.value.iloc[0] >= floor * reference - 1e-9


@pytest.mark.integration
def test_classic_control_only_is_the_largest_lambda_on_the_recorded_curves(classic_pair):
    import pandas as pd

    _, multi = classic_pair
    results, curves = pd.read_csv(multi / "results.csv"), pd.read_csv(multi / "curves.csv")
    val = results[(results.split == "val") & (results.selection_rule == "control_only")]
    for floor, rows in val.groupby("floor"):
        reference = rows.query("method == 'original' and metric == 'control_acc'").value.iloc[0]
        curve = curves[curves.method == "negmerge"]
        expected = curve[curve.control_val + 1e-9 >= floor * reference].lam.max()
        assert rows.query("method == 'negmerge'").lam.iloc[0] == pytest.approx(expected), floor


@pytest.mark.integration
def test_report_and_regress_per_criterion(clip_pair, classic_pair):
    from bench.regress import compare, is_regression

    for single, multi in (clip_pair, classic_pair):
        for run in (single, multi):
            assert main(["report", str(run)]) == 0
        # the main table is the first criterion's: the single run's table, word for word
        assert (multi / "report" / "table.tex").read_text() == (single / "report" / "table.tex").read_text()
        tables = sorted(p.name for p in (multi / "report").glob("table_*.tex"))
        assert len(tables) == 6 and any("control_only_floor0.8" in t for t in tables), tables
        assert "floor 0.9" in (multi / "report" / "summary.md").read_text()
        assert not list((single / "report").glob("table_*.tex"))
        # like with like: the single run's criterion is found in the multi run, the others are not in the single
        assert not is_regression(compare(multi, single))
        missing = compare(single, multi).query("status == 'MISSING'")
        assert set(zip(missing.selection_rule, missing.floor)) >= {("control_only", 0.8)}
