"""Every merge against its definition in docs/metrics.md on random inputs with exact zeros and mixed signs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines import get_merge
from negmerge import MergeInputError, consensus_rate
from tests.reference_merges import average_ref, magmax_ref, negmerge_ref, ties_ref

# Multiples of 0.25 in [-2, 2]: sums and means are exact in float32, so the comparison is exact and
# exact zeros, ties and cancellations (the interesting cases) occur often.
VALUES = st.sampled_from([x / 4 for x in range(-8, 9)])
SHAPES = [(3,), (2, 3), (4,)]


@st.composite
def candidate_pools(draw, max_k: int = 6):
    k = draw(st.integers(1, max_k))
    pool = []
    for _ in range(k):
        pool.append(
            {
                f"t{i}": torch.tensor(
                    draw(st.lists(VALUES, min_size=int(np.prod(s)), max_size=int(np.prod(s)))), dtype=torch.float32
                ).reshape(s)
                for i, s in enumerate(SHAPES)
            }
        )
    return pool


def flat(pool: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return np.stack([np.concatenate([tv[k].reshape(-1).double().numpy() for k in tv]) for tv in pool])


def flat_one(tv: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([tv[k].reshape(-1).double().numpy() for k in tv])


@settings(max_examples=150, deadline=None)
@given(candidate_pools(), st.sampled_from([1.0, 0.9, 0.75, 0.6, 0.5, 0.34, 0.2]))
def test_negmerge_matches_definition(pool, threshold):
    merged = get_merge("negmerge")(pool, threshold=threshold)
    np.testing.assert_allclose(flat_one(merged), negmerge_ref(flat(pool), threshold), rtol=1e-6, atol=0)


@settings(max_examples=100, deadline=None)
@given(candidate_pools())
def test_average_matches_definition(pool):
    np.testing.assert_allclose(flat_one(get_merge("average")(pool)), average_ref(flat(pool)), rtol=1e-6, atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(candidate_pools())
def test_magmax_matches_definition(pool):
    np.testing.assert_array_equal(flat_one(get_merge("magmax")(pool)), magmax_ref(flat(pool)))


@settings(max_examples=150, deadline=None)
@given(candidate_pools(), st.sampled_from([0.2, 0.5, 0.1, 1.0, 0.75]))
def test_ties_matches_definition(pool, k):
    np.testing.assert_allclose(flat_one(get_merge("ties")(pool, k=k)), ties_ref(flat(pool), k), rtol=1e-6, atol=0)


def test_negmerge_released_rule_by_hand():
    pool = [
        {"w": torch.tensor([1.0, 2.0, -1.0, 0.0, 1.0])},
        {"w": torch.tensor([3.0, -2.0, -3.0, 1.0, 1.0])},
    ]
    merged = get_merge("negmerge")(pool)["w"]
    # agree +, disagree, agree -, zero in one candidate drops it, agree +
    assert merged.tolist() == [2.0, 0.0, -2.0, 0.0, 1.0]
    assert consensus_rate({"w": merged}) == pytest.approx(3 / 5)


def test_negmerge_tie_rule_low_threshold():
    # 4 candidates, threshold 0.5 -> need 2 votes; [+,+,-,-] ties and is dropped, [+,+,+,-] keeps + mean 2
    pool = [
        {"w": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([1.0, 2.0])},
        {"w": torch.tensor([-1.0, 3.0])},
        {"w": torch.tensor([-1.0, -5.0])},
    ]
    assert get_merge("negmerge")(pool, threshold=0.5)["w"].tolist() == [0.0, 2.0]


def test_threshold_rounding_is_exact():
    # 0.7 * 10 = 7.000000000000001 in floating point: 7 of 10 votes must still be enough
    pool = [{"w": torch.tensor([1.0])}] * 7 + [{"w": torch.tensor([-1.0])}] * 3
    assert get_merge("negmerge")(pool, threshold=0.7)["w"].tolist() == [1.0]


def test_ties_zero_sum_uses_majority_sign():
    # k=1 keeps everything. Element 0 sums to 0 (+1, -1); the other two elect +, so majority is +
    pool = [{"w": torch.tensor([1.0, 2.0, 1.0])}, {"w": torch.tensor([-1.0, 1.0, 1.0])}]
    assert get_merge("ties")(pool, k=1.0)["w"].tolist() == [1.0, 1.5, 1.0]


def test_magmax_tie_goes_to_later_candidate():
    pool = [{"w": torch.tensor([2.0, -3.0])}, {"w": torch.tensor([-2.0, 3.0])}]
    assert get_merge("magmax")(pool)["w"].tolist() == [-2.0, 3.0]


@pytest.mark.parametrize("name", ["negmerge", "average", "ties", "magmax"])
def test_single_candidate(name):
    tv = {"w": torch.tensor([1.5, -2.0, 0.0, 0.25])}
    merged = get_merge(name)([tv], **({"k": 1.0} if name == "ties" else {}))
    assert merged["w"].tolist() == [1.5, -2.0, 0.0, 0.25]


@pytest.mark.parametrize("name", ["negmerge", "average", "ties", "magmax"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_same_dtype_out(name, dtype):
    torch.manual_seed(0)
    pool32 = [{"a": torch.randn(64), "b": torch.randn(4, 8)} for _ in range(3)]
    pool = [{k: v.to(dtype) for k, v in tv.items()} for tv in pool32]
    merged = get_merge(name)(pool)
    # the oracle: the docs/metrics.md definition in float64 numpy on the same half-precision values
    import numpy as np

    from tests import reference_merges as refs

    oracle = {
        "negmerge": refs.negmerge_ref,
        "average": refs.average_ref,
        "ties": refs.ties_ref,
        "magmax": refs.magmax_ref,
    }
    keys = list(pool[0])
    flat = np.stack([np.concatenate([tv[k].double().numpy().ravel() for k in keys]) for tv in pool])
    expected = torch.from_numpy(oracle[name](flat)).to(dtype)
    got = torch.cat([merged[k].reshape(-1) for k in keys])
    assert got.dtype == dtype
    # one rounding step of the output dtype: float32 accumulation vs the float64 oracle, then one cast
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_integer_tensors_are_skipped():
    pool = [{"w": torch.tensor([1.0, -1.0]), "steps": torch.tensor([3])} for _ in range(2)]
    assert set(get_merge("negmerge")(pool)) == {"w"}


@pytest.mark.parametrize("name", ["negmerge", "average", "ties", "magmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(name, bad):
    pool = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, bad])}]
    with pytest.raises(MergeInputError, match=r"candidate 1.*'w'.*NaN or Inf"):
        get_merge(name)(pool)


def test_dropped_entries_are_positive_zero():
    """The fast path masks by multiplication; a dropped negative mean must still come out +0.0."""
    pool = [{"w": torch.tensor([-1.0, -3.0, 3.0])}, {"w": torch.tensor([-3.0, 1.0, -3.0])}]
    merged = get_merge("negmerge")(pool)["w"]
    assert merged.tolist() == [-2.0, 0.0, 0.0]
    assert not torch.signbit(merged[1:]).any()


def test_sum_overflow_from_finite_inputs_is_no_error_and_no_nan():
    """Finite values whose float32 sum overflows are valid input: kept entries overflow to inf
    (float32 accumulation), dropped ones stay exactly 0, never NaN (inf * 0)."""
    big = 3e38
    pool = [
        {"w": torch.tensor([big, big, 1.0])},
        {"w": torch.tensor([big, big, 1.0])},
        {"w": torch.tensor([big, -big, 1.0])},
    ]
    merged = get_merge("negmerge")(pool)["w"]
    assert merged[0] == float("inf") and merged[1] == 0.0 and merged[2] == 1.0
    assert not torch.isnan(merged).any()


@pytest.mark.parametrize("name", ["negmerge", "average", "ties", "magmax"])
def test_finite_inputs_near_float32_max_are_no_error(name):
    """The fused kernels flag a non-finite sum; where the inputs are finite (the sum overflowed) the
    merge goes on and matches its definition (inf where the float32 sum is inf, never NaN)."""
    big = 3e38
    stack = np.array([[big, big, 1.0, -big], [big, -big, 1.0, -big], [big, big, 2.0, -big]], dtype=np.float32)
    params = {"k": 1.0} if name == "ties" else {}
    merged = get_merge(name)([{"w": torch.from_numpy(row.copy())} for row in stack], **params)["w"].numpy()
    refs = {"negmerge": negmerge_ref, "average": average_ref, "ties": ties_ref, "magmax": magmax_ref}
    with np.errstate(over="ignore", invalid="ignore"):
        expected = refs[name](stack, **params)
    np.testing.assert_array_equal(merged, expected)
    assert not np.isnan(merged).any()


@pytest.mark.parametrize("name", ["negmerge", "average", "ties", "magmax"])
def test_layout_errors_name_the_key(name):
    a = {"x": torch.zeros(2), "y": torch.zeros(3)}
    with pytest.raises(MergeInputError, match=r"candidate 1.*'y' is missing"):
        get_merge(name)([a, {"x": torch.zeros(2)}])
    with pytest.raises(MergeInputError, match=r"candidate 1.*'y' has shape \(4,\)"):
        get_merge(name)([a, {"x": torch.zeros(2), "y": torch.zeros(4)}])
    with pytest.raises(MergeInputError, match=r"candidate 1.*unexpected key 'z'"):
        get_merge(name)([a, {**a, "z": torch.zeros(1)}])
    with pytest.raises(MergeInputError, match="empty"):
        get_merge(name)([])


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, float("nan"), "1", True])
def test_threshold_outside_unit_interval(threshold):
    with pytest.raises(MergeInputError, match="threshold must be a number in \\(0, 1\\]"):
        get_merge("negmerge")([{"w": torch.ones(2)}], threshold=threshold)


@pytest.mark.parametrize("k", [0.0, 1.5, -1])
def test_ties_k_outside_unit_interval(k):
    with pytest.raises(MergeInputError, match="k must be a fraction"):
        get_merge("ties")([{"w": torch.ones(2)}], k=k)


def test_unknown_merge_lists_known_ones():
    with pytest.raises(MergeInputError, match="unknown merge 'negmerg'.*average, dare, iso_c, magmax, negmerge, ties"):
        get_merge("negmerg")
