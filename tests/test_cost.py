"""What a method is charged (bench.cost): samples counted where training happens, kept in the cache
records, summed per method; the cost-quality figure's Pareto front."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from bench.cost import charge, metered, processed
from bench.pool import CandidatePool
from bench.report_cost import pareto_front


def test_metered_counts_what_the_block_processes_and_nests():
    processed(5)  # outside any meter: nothing to count, nothing fails
    with metered() as outer:
        processed(3)
        with metered() as inner:
            processed(4)
        processed(2)
    assert inner == [4]
    assert outer == [9]  # nested work also counts for the enclosing entry


def test_meters_are_per_thread():
    seen = {}

    def work(name: str, n: int) -> None:
        with metered() as box:
            for _ in range(n):
                processed(1)
        seen[name] = box[0]

    threads = [threading.Thread(target=work, args=(f"t{i}", 100 * (i + 1))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"t0": 100, "t1": 200, "t2": 300}


def test_a_cached_entry_is_charged_what_it_cost_when_made(tmp_path):
    pool = CandidatePool(tmp_path, version="test")

    def make():
        processed(64)
        processed(64)
        return {"w": torch.ones(3)}

    made = pool.get_or_create({"i": 1}, make)
    again = pool.get_or_create({"i": 1}, lambda: pytest.fail("recomputed"))
    assert (made.samples, made.cached) == (128, False)
    assert (again.samples, again.cached) == (128, True)  # from the record, not the zero of a cache hit


def _entry(key: str, samples: int | None, seconds: float = 1.0):
    return SimpleNamespace(key=key, samples=samples, seconds=seconds)


def test_charge_splits_unlearning_from_selection_and_counts_each_entry_once():
    a, b, c = _entry("a", 10), _entry("b", 20), _entry("c", 40)
    cost = charge(unlearn=[b], select=[a, b, c], val_samples=7, flops_per_image=2.0)
    assert (cost.unlearn_samples, cost.select_samples, cost.train_samples) == (20, 50, 70)
    assert cost.seconds == 3.0
    assert cost.gflops == pytest.approx(2.0 * (3 * 70 + 7) / 1e9)
    unknown = charge(unlearn=[_entry("d", None)])
    assert unknown.train_samples is None and unknown.columns()["train_samples"] is None


def test_pareto_front_keeps_only_undominated_points():
    points = pd.DataFrame(
        {"train_samples": [1, 10, 10, 100, 100], "quality": [5.0, 3.0, 4.0, 3.0, 1.0]},
        index=["cheap", "mid", "mid-worse", "dear-same", "dear-best"],
    )
    assert sorted(pareto_front(points, "train_samples", "quality")) == ["cheap", "dear-best", "mid"]


def test_the_paper_plan_states_each_methods_share_of_the_total():
    """clip-vit-b32: the shares add up to the whole, and the pool's share is its fine-tuning images
    (x 3) over the total, recomputed from the grid."""
    from bench.config import load_suite
    from bench.plan import format_plan, plan_clip

    cfg = load_suite("clip-vit-b32")
    plan = plan_clip(cfg, count_flops=False)
    shares = plan.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    pool = 0
    for name in cfg.forget:  # the paper's per-dataset epochs sit between the grid's base and its axes
        n = plan.sizes[name].train
        for seed in cfg.seeds:
            points = cfg.finetune.points(seed, cfg.finetune_per_dataset.get(name))
            pool += sum(p.total_steps(n) * p.batch_size * p.grad_accum for p in points)
    assert shares["candidate pool (fine-tuning)"] == pytest.approx(
        3 * pool / (plan.eval_images + 3 * plan.train_images)
    )
    assert set(cfg.methods) <= set(shares)  # every method has its line
    out = format_plan(plan, None, None, measured=False)
    assert "share of the total cost" in out and "candidate pool (fine-tuning)" in out
