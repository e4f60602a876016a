"""lambda selection rule, the SVC MIA and the loss-attack AUC against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench.metrics import loss_attack_auc, membership_metrics, mia_efficacy
from bench.selection import best_single, floor_pick, lambda_grid, lowest, select_lambda


def test_grid_is_inclusive_and_clean():
    grid = lambda_grid(0.0, 1.0, 0.05)
    assert len(grid) == 21 and grid[7] == 0.35 and grid[-1] == 1.0


def test_selects_lowest_forget_among_feasible():
    lambdas = [0.0, 0.5, 1.0]
    sel = select_lambda(lambdas, forget_val=[50, 20, 5], control_val=[80, 77, 60], control_zero_shot=80, floor=0.95)
    assert sel.lam == 0.5 and sel.forget_val == 20 and not sel.at_grid_edge  # 1.0 breaks the floor (76)


def test_ties_go_to_the_smaller_lambda_and_edge_is_flagged():
    sel = select_lambda([0.0, 0.5, 1.0], [50, 10, 10], [80, 80, 80], 80, 0.95)
    assert sel.lam == 0.5
    edge = select_lambda([0.0, 0.5, 1.0], [50, 30, 10], [80, 80, 80], 80, 0.95)
    assert edge.lam == 1.0 and edge.at_grid_edge


def test_no_feasible_lambda_is_explicit():
    sel = select_lambda([0.5, 1.0], [10, 5], [10, 5], control_zero_shot=80, floor=0.95)
    assert not sel.feasible and sel.lam is None and "no lambda" in sel.reason


def test_best_single_skips_infeasible():
    a = select_lambda([1.0], [30], [80], 80, 0.95)
    b = select_lambda([1.0], [5], [10], 80, 0.95)  # infeasible
    c = select_lambda([1.0], [20], [80], 80, 0.95)
    assert best_single([a, b, c]) == 2
    assert best_single([b]) is None


def test_mia_efficacy_hand_case():
    # Members sit at prob ~1, non-members at ~0.2: a perfectly separable 1-D problem.
    members = torch.full((50,), 0.99) + torch.linspace(0, 0.005, 50)
    nonmembers = torch.full((50,), 0.2) + torch.linspace(0, 0.05, 50)
    # Targets: 3 look like members, 1 like a non-member -> 25% called non-member.
    targets = torch.tensor([0.99, 0.995, 0.992, 0.21])
    assert mia_efficacy(members, nonmembers, targets) == pytest.approx(25.0)
    assert mia_efficacy(members, nonmembers, torch.tensor([0.2, 0.22])) == pytest.approx(100.0)


def test_the_membership_attack_leaves_the_global_rngs_alone():
    """The attack is scored on a background thread while a fine-tune may run: RandAugment reads
    Python's and numpy's global RNGs, so a draw from them here would change that candidate's bytes."""
    import random

    import numpy as np

    from bench.metrics import preload

    preload()  # importing sklearn draws from Python's RNG: a scoring process imports it up front
    np.random.seed(11)
    random.seed(11)
    numpy_before, python_before = np.random.get_state(), random.getstate()
    members, nonmembers = torch.rand(40, generator=torch.Generator().manual_seed(1)), torch.rand(40) * 0.5
    mia_efficacy(members, nonmembers, torch.rand(10))
    numpy_after = np.random.get_state()
    assert (numpy_after[1] == numpy_before[1]).all() and numpy_after[2] == numpy_before[2]  # keys, position
    assert random.getstate() == python_before


def test_mia_balances_member_and_nonmember_counts():
    """Overlapping members (many) and non-members (few): unbalanced, the SVC would call everything a
    member; balanced, it learns the boundary and calls the non-member-like targets non-members."""
    g = torch.Generator().manual_seed(0)
    members = (0.6 + 0.15 * torch.randn(2000, generator=g)).clamp(0, 1)
    nonmembers = (0.4 + 0.15 * torch.randn(40, generator=g)).clamp(0, 1)
    targets = torch.full((20,), 0.3)
    assert mia_efficacy(members, nonmembers, targets, max_per_class=2000) == pytest.approx(100.0)


def test_mia_attacker_trains_on_equal_random_draws_of_both_classes(monkeypatch):
    """What the SVC is fitted on: as many members as non-members (the smaller class, or
    ``max_per_class``), each a seeded random draw from its own class, never the first rows."""
    import numpy as np
    import sklearn.svm

    fitted = []

    class Recorded(sklearn.svm.SVC):
        def fit(self, x, y, sample_weight=None):
            fitted.append((x.ravel().copy(), y.copy()))
            return super().fit(x, y, sample_weight)

    monkeypatch.setattr(sklearn.svm, "SVC", Recorded)
    members, nonmembers = torch.linspace(0.5, 1.0, 300), torch.linspace(0.0, 0.4, 40)
    targets = torch.tensor([0.1, 0.9])

    def draw(**kwargs) -> tuple[np.ndarray, np.ndarray]:
        assert mia_efficacy(members, nonmembers, targets, **kwargs) == pytest.approx(50.0)
        x, y = fitted.pop()
        return x[y == 1], x[y == 0]

    m, n = draw(max_per_class=2000)
    assert len(m) == len(n) == 40  # the smaller class's size
    assert np.isin(m, members.numpy()).all() and sorted(n) == sorted(nonmembers.numpy())
    assert len(set(m.tolist())) == 40 and m.max() > members[39]  # distinct members, not the first 40
    m10, n10 = draw(max_per_class=10)
    assert len(m10) == len(n10) == 10 and np.isin(n10, nonmembers.numpy()).all()
    again, _ = draw(max_per_class=10)
    other, _ = draw(max_per_class=10, seed=1)
    assert np.array_equal(again, m10) and not np.array_equal(other, m10)  # seeded


def test_loss_attack_auc_definition():
    members = torch.tensor([0.1, 0.2, 0.3])
    nonmembers = torch.tensor([0.25, 1.0, 2.0])
    # pairs (member loss < non-member loss): 0.1<all 3, 0.2<all 3, 0.3<2 of 3 -> 8/9
    assert loss_attack_auc(members, nonmembers) == pytest.approx(100 * 8 / 9)


def test_merged_vector_identity_covers_merge_code():
    """A cached evaluation of a merged vector is keyed by the merge's code, found from its imports:
    TIES's key covers its module, the top-k cut, the streaming engine and the sources."""
    import bench.evalcache as evalcache
    from bench.codehash import closure

    before = evalcache.vector_id("ties", {"k": 0.2}, ["b", "a"])
    assert before == evalcache.vector_id("ties", {"k": 0.2}, ["a", "b"])  # member order is irrelevant
    assert before != evalcache.vector_id("ties", {"k": 0.3}, ["a", "b"])
    assert evalcache.merge_code_hash("single") == ""
    names = {f.name for f in closure("baselines.ties")}
    assert {"ties.py", "topk_cut.py", "streaming.py", "sources.py"} <= names


@pytest.mark.parametrize(
    "modules",
    [("baselines.ties",), ("bench.finetune",), ("bench.classic_train", "bench.classifiers"), ("bench.pretrain",)],
)
def test_editing_any_file_a_producer_imports_changes_its_key(modules):
    """Every file of the import closure counts: one changed byte in any of them changes the digest."""
    from bench.codehash import closure, digest

    files = closure(*modules)
    base = digest(files)
    for target in files:
        edited = digest(files, read=lambda f, target=target: f.read_bytes() + (b"#" if f == target else b""))
        assert edited != base, target


def test_protocol_b_model_keys_cover_the_classifiers():
    """Read in the issue: Protocol B models were keyed on classic_train.py but not classifiers.py."""
    from bench.codehash import closure

    assert "classifiers.py" in {f.name for f in closure("bench.classic_train", "bench.classifiers")}
    assert "classifiers.py" in {f.name for f in closure("bench.protocol_classic")}


accuracies = st.lists(st.integers(0, 20).map(lambda v: v * 5.0), min_size=1, max_size=12)


@given(accuracies, accuracies, st.floats(0.1, 1.0))
def test_floor_pick_is_the_definition(forget, control, floor):
    """The one floor rule both protocols use, against its definition written out by brute force."""
    n = min(len(forget), len(control))
    forget, control = forget[:n], control[:n]
    reference = max(control)
    feasible = [i for i in range(n) if control[i] >= floor * reference]
    expected = min(feasible, key=lambda i: (forget[i], i)) if feasible else None
    assert floor_pick(forget, control, reference, floor) == expected


def test_lowest_ignores_missing_and_prefers_the_first():
    assert lowest([None, 3.0, 1.0, 1.0]) == 2
    assert lowest([None, None]) is None


def test_membership_metrics_combine_both_attacks():
    """A model that is sure on members and unsure on non-members: targets drawn like members look like
    members (efficacy 0), and the loss attack separates members perfectly (AUC 100)."""
    gen = torch.Generator().manual_seed(0)
    sure = torch.tensor([[8.0, 0.0]]).repeat(40, 1) + 0.1 * torch.randn(40, 2, generator=gen)
    unsure = torch.tensor([[0.2, 0.0]]).repeat(40, 1) + 0.1 * torch.randn(40, 2, generator=gen)
    labels = torch.zeros(40, dtype=torch.long)
    out = membership_metrics(
        (sure, labels), (unsure, labels), (sure, labels), (sure, labels), max_per_class=None, seed=0
    )
    assert out == {"mia_efficacy": 0.0, "mia_auc": 100.0}
