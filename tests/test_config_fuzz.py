"""Property: any override of any field of a suite gives a validated config or one clear BenchError,
never a traceback (hypothesis over the schema's own field paths, with hostile values)."""

from __future__ import annotations

import math
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from bench.config import load_suite, suite_path
from bench.errors import BenchError
from bench.protocols import PROTOCOLS


def _paths(config: BaseModel, prefix: str = "") -> list[str]:
    """Every dotted field path of a loaded config: nested sections, and the sections under each key of
    a mapping of sections (``baselines.ga.grid``), as a user would type them after ``--set``."""
    out = []
    for name in type(config).model_fields:
        path, value = f"{prefix}{name}", getattr(config, name)
        out.append(path)
        sections = {"": value} if isinstance(value, BaseModel) else value if isinstance(value, dict) else {}
        for key, section in sections.items():
            if isinstance(section, BaseModel):
                here = f"{path}.{key}" if key else path
                out += [here] if key else []
                out += _paths(section, f"{here}.")
    return out


SUITES = {name: _paths(load_suite(name)) for name in ("mini-clip-tiny", "mini-classic-tiny")}
EXTRA_PATHS = ["finetune.base.lr", "finetune.grid.steps", "pool.grid.epochs", "merge_params.ties.k", "bogus.x"]


def _value_at(config: BaseModel, path: str):
    """The value at ``path`` as dumped; a field the dump leaves out is unset (selection's list forms
    ``floors`` / ``rules`` when the single form is used): None."""
    node = config.model_dump(mode="json")
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def assert_names_the_culprit(suite: str, overrides: list[str], exc: BenchError) -> None:
    """The error is one line and says where: the ``--set`` it could not apply, or the suite file and
    the field that failed, one of those the overrides set (a check across fields may name it in its
    text instead). Setting ``protocol`` to another protocol changes every field's meaning: exempt."""
    message = str(exc)
    assert message and "\n" not in message, message
    if message.startswith("--set "):
        assert any(message.startswith(f"--set {o!r}") for o in overrides), message
        return
    where = message.removeprefix(f"{suite_path(suite)}: ")
    assert where != message, message
    if any(o.split("=", 1) in ([["protocol", p] for p in PROTOCOLS]) for o in overrides):
        return
    fields = {re.escape(o.split("=", 1)[0].split(".")[0]) for o in overrides}
    at_field = any(re.search(rf"(^|; ){f}[.:]", where) for f in fields)
    in_text = where.startswith("(top level): ") and any(re.search(rf"\b{f}\b", where) for f in fields)
    assert at_field or in_text, (overrides, message)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=4,
)


def _yaml(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suite=st.sampled_from(sorted(SUITES)),
    picks=st.lists(st.tuples(st.integers(0, 10**6), values), min_size=1, max_size=3),
)
def test_random_overrides_never_raise_anything_but_a_clear_error(suite, picks):
    paths = SUITES[suite] + EXTRA_PATHS
    overrides = [f"{paths[i % len(paths)]}={_yaml(v)}" for i, v in picks]
    try:
        load_suite(suite, overrides)
    except BenchError as exc:
        assert_names_the_culprit(suite, overrides, exc)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_fuzzed_path_is_a_field_the_override_reaches(suite):
    """The paths the fuzzing draws from are real: setting each to its current value gives the same
    config (a made-up path would be refused as an extra input), and they reach every depth."""
    base = load_suite(suite)
    assert {"selection.floor", "data.train_limit", "baselines.ga.grid"} <= set(SUITES[suite])
    for path in SUITES[suite]:
        assert load_suite(suite, [f"{path}={_yaml(_value_at(base, path))}"]) == base, path


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_numeric_override_takes_effect_or_names_its_field(suite):
    """Each number of the suite set to another value: the loaded config holds the new value at that
    path, or the one-line error names the field."""
    base = load_suite(suite)
    changed = 0
    for path in SUITES[suite]:
        current = _value_at(base, path)
        if isinstance(current, bool) or not isinstance(current, int | float):
            continue
        new = current + 1 if isinstance(current, int) else current / 2
        override = f"{path}={_yaml(new)}"
        try:
            loaded = load_suite(suite, [override])
        except BenchError as exc:
            assert_names_the_culprit(suite, [override], exc)
            continue
        assert _value_at(loaded, path) == new, path
        changed += 1
    assert changed >= 10


@pytest.mark.parametrize(
    ("suite", "override", "message"),
    [
        ("mini-clip-tiny", "selection.lambda_start=5", "lambda_start 5.0 is above lambda_stop 1.0"),
        ("mini-clip-tiny", "selection.lambda_stop=.inf", "lambda_start and lambda_stop must be finite"),
        ("mini-clip-tiny", "pretrain.datasets={nope: 0.1}", "unknown pretraining dataset 'nope'"),
        ("mini-clip-tiny", "ablation.sizes=[1, 4]", "a merge needs at least 2 candidates, got size 1"),
        ("mini-classic-tiny", "pool.grid.epochs=[-1]", "invalid SGD setting: epochs must be > 0, got -1"),
        ("mini-classic-tiny", "train.base.lr=-1", "invalid SGD setting: lr must be > 0, got -1"),
        ("mini-classic-tiny", "baselines.ft.base.batch_size=0", "batch_size must be >= 1, got 0"),
        ("mini-classic-tiny", "pool.grid.schedule=[weird]", "schedule must be cosine or constant, got 'weird'"),
        ("mini-classic-tiny", "model.name=nope", "unknown classifier 'nope'"),
        ("mini-classic-tiny", "model.widths=[0]", "widths: give positive layer widths"),
    ],
)
def test_values_that_used_to_fail_late_fail_at_load(suite, override, message):
    with pytest.raises(BenchError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_suite(suite, [override])


@settings(max_examples=100, deadline=None)
@given(suite=st.sampled_from(sorted(SUITES)), index=st.integers(0, 10**6), raw=st.text(max_size=12))
def test_raw_override_text_never_raises_anything_but_a_clear_error(suite, index, raw):
    """What a user types after ``--set key=``, unquoted: broken YAML included."""
    paths = SUITES[suite] + EXTRA_PATHS
    override = f"{paths[index % len(paths)]}={raw}"
    try:
        load_suite(suite, [override])
    except BenchError as exc:
        assert_names_the_culprit(suite, [override], exc)


def test_a_key_with_a_newline_is_quoted_so_the_error_stays_one_line():
    """Found by the fuzzing above: a YAML key holding a newline was echoed raw into the field path."""
    override = 'baselines={"q\\n": [null]}'
    with pytest.raises(BenchError) as err:
        load_suite("mini-clip-tiny", [override])
    assert "baselines.'q\\n': Input should be a valid dictionary" in str(err.value)
    assert_names_the_culprit("mini-clip-tiny", [override], err.value)
