"""Property: any override of any field of a suite gives a validated config or one clear BenchError,
never a traceback (hypothesis over the schema's own field paths, with hostile values)."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from bench.config import ClassicSuite, ClipSuite, load_suite
from bench.errors import BenchError


def _paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field path of a pydantic model, nested sections included."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out += _paths(candidate, f"{path}.")
    return out


SUITES = {"mini-clip-tiny": _paths(ClipSuite), "mini-classic-tiny": _paths(ClassicSuite)}
EXTRA_PATHS = ["finetune.base.lr", "finetune.grid.steps", "pool.grid.epochs", "merge_params.ties.k", "bogus.x"]

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
        assert str(exc) and "Traceback" not in str(exc)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_the_schema_paths_are_found(suite):
    assert "selection.floor" in SUITES[suite] and "data.val_size" in SUITES["mini-classic-tiny"]


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
    try:
        load_suite(suite, [f"{paths[index % len(paths)]}={raw}"])
    except BenchError as exc:
        assert str(exc)
