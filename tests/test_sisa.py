"""SISA (baselines/sisa.py) in Protocol B: the assignment, the unlearning plan counted by hand, the
aggregation on constructed logits, and on real (reduced) runs the checkpoints' lineage, exactly which
steps unlearning trains, and S=1, R=1 being Retrain."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from baselines import sisa
from bench.classic_train import SgdParams, samples_seen, train
from bench.config import load_suite
from bench.errors import BenchError

T = torch.tensor


def test_shards_and_slices_are_disjoint_and_cover_the_training_set():
    for n, shards, slices in [(100, 5, 4), (101, 10, 1), (7, 7, 1), (50, 3, 3)]:
        out = sisa.assign(n, shards, slices, seed=3)
        assert len(out) == shards and all(len(s) == slices for s in out)
        flat = torch.cat([piece for shard in out for piece in shard])
        assert sorted(flat.tolist()) == list(range(n))  # covering and disjoint: each index exactly once
        sizes = [sum(len(p) for p in shard) for shard in out]
        assert max(sizes) - min(sizes) <= 1
    assert [p.tolist() for p in sisa.assign(50, 3, 3, 1)[0]] == [p.tolist() for p in sisa.assign(50, 3, 3, 1)[0]]
    assert sisa.assign(50, 3, 3, 1)[0][0].tolist() != sisa.assign(50, 3, 3, 2)[0][0].tolist()  # the seed matters
    with pytest.raises(ValueError, match="need at least 12 training samples"):
        sisa.assign(11, 3, 4, 0)


def test_slice_epochs_total_the_retrain_budget():
    assert sisa.slice_epochs(20.0, 1) == 20.0
    assert sisa.slice_epochs(30.0, 4) == 12.0  # 12 x (1 + 2 + 3 + 4) slices = 30 x 4 slices


def test_unlearning_cost_matches_a_hand_count():
    assignment = [[T([0, 1]), T([2, 3])], [T([4, 5]), T([6, 7])], [T([8, 9]), T([10, 11])]]
    forget = T([3, 8])
    # by hand: shard 0 is first hit in slice 1 -> its step 1 retrains on {0, 1, 2} (3 samples);
    # shard 1 holds no forget sample; shard 2 is hit in slice 0 -> step 0 on {9}, step 1 on {9, 10, 11}
    cost = sisa.unlearning_cost(assignment, forget, samples_of=lambda n: 10 * n)
    assert (cost.shards, cost.slices, cost.samples) == (2, 3, 30 + 10 + 30)
    assert cost.per_shard == ((0, 1), (2, 0))
    steps = []
    chains = [sisa.train_chain(s, lambda parent, idx: (steps.append(idx.tolist()), len(steps))[1]) for s in assignment]
    assert [c[-1] for c in chains] == [2, 4, 6] and len(steps) == 6
    steps.clear()
    sisa.train_chain(assignment[0], lambda parent, idx: steps.append(idx.tolist()), forget)
    assert steps == [[0, 1], [0, 1, 2]]  # the first step sees what it saw before: a cache returns it


def test_vote_mean_softmax_and_what_the_attack_sees():
    big = 8.0
    a = T([[big, 0.0, 0.0], [0.0, big, 0.0], [0.0, 0.0, big]])  # labels 0, 1, 2
    b = T([[big, 0.0, 0.0], [0.0, 0.0, big], [0.0, big, 0.0]])  # labels 0, 2, 1
    c = T([[0.0, big, 0.0], [0.0, 0.0, big * 2], [0.0, 0.0, 0.0]])  # labels 1, 2, 0 (a flat row)
    members = [a, b, c]
    vote = sisa.aggregate(members, "vote").argmax(-1)
    # row 0: 2 votes for 0; row 1: 2 votes for 2; row 2: one vote each, the tie goes to the largest mean softmax
    probs = sisa.mean_softmax(members)
    assert vote.tolist() == [0, 2, int(probs[2].argmax())]
    assert torch.allclose(probs, sum(torch.softmax(z, -1) for z in members) / 3)
    assert sisa.aggregate(members, "mean_softmax").argmax(-1).tolist() == probs.argmax(-1).tolist()
    # the vote differs from the mean softmax when one confident constituent outweighs two hesitant ones
    hesitant = T([[1.0, 0.0]])
    sure = T([[0.0, 20.0]])
    assert sisa.aggregate([hesitant, hesitant, sure], "vote").argmax(-1).item() == 0
    assert sisa.aggregate([hesitant, hesitant, sure], "mean_softmax").argmax(-1).item() == 1
    # a tie of votes with equal mean softmax: the lower class
    assert sisa.aggregate([T([[1.0, 0.0]]), T([[0.0, 1.0]])], "vote").argmax(-1).item() == 0
    assert torch.allclose(torch.softmax(sisa.attack_logits(members), -1), probs)
    assert torch.isfinite(sisa.attack_logits([T([[0.0, 200.0]])])).all()
    with pytest.raises(ValueError, match="sisa.aggregate"):
        sisa.aggregate(members, "max")


def test_samples_seen_is_what_the_loop_processes():
    class Data:
        def to_input(self, x):
            return x

    for n, params in [(50, SgdParams(epochs=2, batch_size=16)), (50, SgdParams(epochs=1.3, batch_size=16))]:
        model = nn.Linear(3, 2)
        seen = []
        model.register_forward_hook(lambda m, inp, out, seen=seen: seen.append(len(inp[0])))
        train(model, Data(), torch.randn(n, 3), torch.randint(0, 2, (n,)), params, progress=False)
        assert sum(seen) == samples_seen(n, params)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sisa=null", "method 'sisa' needs settings under sisa"),
        ("sisa.shards=0", "sisa.shards must be integers >= 1"),
        ("sisa.slices=[]", "sisa.slices: give at least one value"),
        ("sisa.aggregate=max", "sisa.aggregate"),
    ],
)
def test_bad_sisa_settings_are_one_clear_error(override, message):
    base = ["methods=[original,retrain,sisa]", "sisa={shards: 2}"]
    with pytest.raises(BenchError, match=message):
        load_suite("mini-classic-tiny", [*base, override])


def test_sisa_runs_only_where_configured():
    assert "sisa" not in load_suite("mini-classic-tiny", ["sisa=null"]).methods
    cfg = load_suite("mini-classic-tiny", ["sisa={shards: [5, 10], slices: [1, 4]}"])
    assert "sisa" in cfg.methods
    assert [s.name for s in cfg.sisa.settings()] == [
        "sisa[S=5,R=1]",
        "sisa[S=5,R=4]",
        "sisa[S=10,R=1]",
        "sisa[S=10,R=4]",
    ]


# -- real reduced runs ---------------------------------------------------------------------------------
SMALL = [
    "seeds=[0]",
    "threads=1",
    "data.train_limit=240",
    "data.val_size=100",
    "data.test_limit=200",
    "train.base.epochs=2",
    "forget.fraction=0.02",
    "methods=[original,retrain,sisa]",
    "mia.n_members=50",
    "mia.n_nonmembers=50",
    "selection.retain_size=100",
]


def _run(tmp: Path, shards: int, slices: int):
    from bench.protocol_classic import ClassicRun

    cfg = load_suite("mini-classic-tiny", [*SMALL, f"sisa={{shards: {shards}, slices: {slices}}}"])
    out, cache = tmp / "run", tmp / "cache"
    ClassicRun(cfg, out, cache).run()
    records = {
        p.stem: json.loads(p.read_text())["spec"] for p in (cache / "classic-models").glob("*.json") if p.is_file()
    }
    manifest = json.loads((out / "manifest.json").read_text())
    forget = torch.tensor(json.loads((out / "forget_sets" / "seed0.json").read_text())["indices"])
    return out, cache, records, manifest, forget


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sisa-3x2"), shards=3, slices=2)


def test_lineage_after_unlearning_holds_no_forget_sample(sharded_run):
    _, _, records, manifest, forget = sharded_run
    (cost,) = manifest["unlearning_cost"]
    assert cost["affected"], "the forget set hits no shard: the test would show nothing"
    seen_by_members = []
    for key in cost["members"]:
        node, lineage = key, []
        while node is not None:  # the member and every checkpoint it was trained from
            lineage.append(torch.tensor(records[node]["train_indices"]))
            node = records[node]["parent"]
        for indices in lineage:
            assert not torch.isin(indices, forget).any()
        seen_by_members.append(lineage[0])
    # and they saw everything else: the members' data is Dr, split into disjoint shards
    everything = torch.cat(seen_by_members)
    assert len(everything) == len(set(everything.tolist())) == 240 - len(forget)
    assert not torch.isin(everything, forget).any()


def test_unlearning_trains_exactly_the_affected_shards_and_slices(sharded_run):
    out, _, records, manifest, forget = sharded_run
    (cost,) = manifest["unlearning_cost"]
    assignment = sisa.assign(240, 3, 2, seed=0)
    trained = {tuple(sisa.seen(s, r).tolist()) for s in assignment for r in range(2)}
    hand = {}  # shard -> first slice holding a forget sample, from the assignment
    for k, slices in enumerate(assignment):
        hits = [r for r in range(2) if set(slices[r].tolist()) & set(forget.tolist())]
        if hits:
            hand[k] = hits[0]
    retrained = {
        tuple(sisa.seen(assignment[k], r, forget).tolist()) for k, first in hand.items() for r in range(first, 2)
    }
    made = [tuple(spec["train_indices"]) for spec in records.values() if spec.get("role") == "sisa"]
    assert len(made) == len(set(made)) == 3 * 2 + len(retrained)  # a cold cache: each step trained once
    assert set(made) == trained | retrained
    assert [(a["shard"], a["first_slice"]) for a in cost["affected"]] == sorted(hand.items())
    rows = pd.read_csv(out / "results.csv")
    mine = rows[(rows.method == "sisa[S=3,R=2]") & (rows.split == "-")].set_index("metric").value
    assert mine["retrained_shards"] == len(hand)
    assert mine["retrained_slices"] == len(retrained) == cost["retrained_slices"]
    params = SgdParams(epochs=sisa.slice_epochs(2, 2), lr=0.1, momentum=0.9, weight_decay=0.0, batch_size=128)
    assert mine["retrained_samples"] == sum(samples_seen(len(s), params) for s in retrained)
    assert mine["speedup_samples"] == pytest.approx(cost["retrain_samples"] / mine["retrained_samples"])
    test = rows[(rows.method == "sisa[S=3,R=2]") & (rows.split == "test")].set_index("metric").value
    assert {"retain_acc", "forget_acc", "test_acc", "mia_efficacy", "avg_gap"} <= set(test.index)


def test_one_shard_one_slice_is_retrain(tmp_path):
    """S=1, R=1: one step, E epochs, on the sorted Dr from Retrain's seeded init: Retrain's training
    exactly (same loop, same data order, same seeds), so the unlearned member is Retrain's weights."""
    _, cache, records, manifest, _ = _run(tmp_path, shards=1, slices=1)
    (cost,) = manifest["unlearning_cost"]
    (member,) = cost["members"]
    (retrain,) = [k for k, spec in records.items() if spec.get("role") == "retrain"]
    a, b = (
        load_file(cache / "classic-models" / f"{member}.safetensors"),
        load_file(cache / "classic-models" / f"{retrain}.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cost["speedup_samples"] == 1.0


def test_a_setting_row_is_drawn_as_its_method():
    from bench.report import _ordered, colour, display, kind

    name = "sisa[S=5,R=4]"
    assert (display(name), kind(name), colour(name)) == ("SISA (S=5, R=4)", "sharded", "darkgoldenrod")
    assert _ordered(["negmerge", "sisa[S=10,R=1]", "retrain", "sisa[S=5,R=1]", "ft"]) == [
        "retrain",
        "ft",
        "sisa[S=10,R=1]",  # the run's order among a method's settings
        "sisa[S=5,R=1]",
        "negmerge",
    ]


def test_more_shards_than_samples_fail_before_any_training(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / "cache"))
    overrides = [*SMALL, "sisa={shards: 100, slices: 3}"]
    args = ["run", "mini-classic-tiny", "--out", str(tmp_path / "run"), "--no-report"]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 2
    assert "lower sisa.shards or sisa.slices" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
