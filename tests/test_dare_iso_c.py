"""DARE and Iso-C against literal numpy transcriptions of docs/metrics.md#merges (tests/reference_merges.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baselines import get_merge, get_method
from negmerge import MergeInputError, save_state
from tests.reference_merges import (
    average_ref,
    dare_dropped,
    dare_keep_mask,
    iso_c_ref,
    negmerge_ref,
    ties_ref,
)
from tests.test_merges import candidate_pools, flat_one

BASE_REFS = {"average": average_ref, "ties": ties_ref, "negmerge": negmerge_ref}
BASE_PARAMS = {"average": [{}], "ties": [{}, {"k": 0.5}, {"k": 1.0}], "negmerge": [{}, {"threshold": 0.5}]}
# TIES elects a sign by a sum, and a sum that is exactly 0 in one precision may not be in another: with
# p whose 1 - p is a power of two the rescaled values stay multiples of 1/4 (sums exact in float32 and
# float64 alike). The other bases decide by counts, so any p.
DROPS = {"ties": [0.0, 0.5, 0.75, 0.875], "average": [0.0, 0.1, 0.3, 0.5, 0.9], "negmerge": [0.0, 0.1, 0.3, 0.5, 0.9]}


@st.composite
def bases(draw):
    base = draw(st.sampled_from(sorted(BASE_REFS)))
    return base, draw(st.sampled_from(BASE_PARAMS[base])), draw(st.sampled_from(DROPS[base]))


@settings(max_examples=300, deadline=None)
@given(candidate_pools(), st.integers(0, 2**40), bases())
def test_dare_matches_definition(pool, seed, base):
    name, params, p = base
    merged = get_merge("dare")(pool, p=p, seed=seed, base=name, base_params=params)
    expected = BASE_REFS[name](dare_dropped(pool, p, seed), **params)
    np.testing.assert_allclose(flat_one(merged), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.9])
def test_dare_mask_bits_are_the_documented_hash(p):
    """One candidate of ones averaged: the output is the survivor mask times 1/float32(1-p), exactly."""
    shapes = {"blocks.0.w": (300, 70), "bias": (513,)}
    merged = get_merge("dare")([{k: torch.ones(s) for k, s in shapes.items()}], p=p, seed=7)
    for name, shape in shapes.items():
        keep = dare_keep_mask(7, 0, name, int(np.prod(shape)), p)
        expected = np.where(keep, np.float32(1) / np.float32(1 - p), np.float32(0)).astype(np.float32)
        np.testing.assert_array_equal(merged[name].reshape(-1).numpy(), expected)


def test_dare_drops_a_fraction_p_independently_per_candidate_tensor_and_seed():
    n, p = 200_000, 0.3
    a = dare_keep_mask(0, 0, "w", n, p)
    tol = 5 * np.sqrt(p * (1 - p) / n)  # five standard errors of a drop rate over n elements
    assert abs((~a).mean() - p) < tol
    for other in (dare_keep_mask(0, 1, "w", n, p), dare_keep_mask(1, 0, "w", n, p), dare_keep_mask(0, 0, "v", n, p)):
        assert abs((~a & ~other).mean() - p * p) < tol  # both dropped: independent masks
    pool = [{"w": torch.ones(n)} for _ in range(3)]
    merged = get_merge("dare")(pool, p=p)["w"]
    assert abs(float((merged == 0).float().mean()) - p**3) < tol  # all three dropped


def test_dare_with_p_zero_is_its_base():
    torch.manual_seed(1)
    pool = [{"a": torch.randn(40, 30).round(decimals=1), "b": torch.randn(9)} for _ in range(4)]
    for base, params in [("average", {}), ("ties", {"k": 0.3}), ("negmerge", {"threshold": 0.5})]:
        dare = get_merge("dare")(pool, p=0.0, base=base, base_params=params)
        plain = get_merge(base)(pool, **params)
        for key in plain:
            assert torch.equal(dare[key], plain[key]), (base, key)


def _pool(k: int = 5, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    common = {"a": torch.randn(120, 90, generator=g), "b": torch.randn(77, generator=g)}
    return [{n: (c + torch.randn(c.shape, generator=g)).to(dtype) for n, c in common.items()} for _ in range(k)]


DARE_CASES = [
    {"base": "average"},
    {"base": "ties", "base_params": {"k": 0.3}},
    {"base": "ties", "base_params": {"k": 0.3, "scope": "tensor"}},
    {"base": "negmerge", "base_params": {"threshold": 0.6}},
]


@pytest.mark.parametrize("params", DARE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_streamed_chunked_and_threaded_are_bit_identical(params, dtype, tmp_path, monkeypatch):
    pool = _pool(dtype=dtype)
    paths = [save_state(tv, tmp_path / f"tv{i}.safetensors") for i, tv in enumerate(pool)]
    merge = get_merge("dare")
    monkeypatch.setenv("NEGMERGE_MERGE_THREADS", "1")
    in_memory = merge(pool, p=0.4, seed=3, **params)
    monkeypatch.setattr("negmerge.streaming.CHUNK_ELEMENTS", 997)  # chunks start at odd offsets
    monkeypatch.setenv("NEGMERGE_MERGE_THREADS", "3")
    streamed = merge(paths, p=0.4, seed=3, **params)
    for key in in_memory:
        assert in_memory[key].dtype == streamed[key].dtype == dtype
        assert torch.equal(in_memory[key], streamed[key]), key


@pytest.mark.parametrize("params", [c for c in DARE_CASES if "scope" not in c.get("base_params", {})])  # oracle: global
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dare_half_precision_in_same_dtype_out(params, dtype):
    pool = _pool(4, dtype)
    merged = get_merge("dare")(pool, p=0.5, seed=5, **params)
    base = params["base"]
    base_params = params.get("base_params", {})
    expected = torch.from_numpy(BASE_REFS[base](dare_dropped(pool, 0.5, 5), **base_params)).to(dtype)
    got = torch.cat([merged[k].reshape(-1) for k in pool[0]])
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def test_dare_seed_changes_the_mask_and_keeps_the_expectation():
    pool = [{"w": torch.full((50_000,), 2.0)}]
    a = get_merge("dare")(pool, p=0.5, seed=0)["w"]
    b = get_merge("dare")(pool, p=0.5, seed=1)["w"]
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 4.0}
    assert abs(float(a.mean()) - 2.0) < 0.05  # survivors rescaled: the mean is the original's


def test_dare_nan_is_an_error_even_where_it_is_dropped():
    # p close to 1: the NaN's element is almost surely dropped, so only the drop kernel's own check sees it
    pool = [{"w": torch.ones(64)}, {"w": torch.tensor([1.0] * 63 + [float("nan")])}]
    for base in ("average", "negmerge", "ties"):
        with pytest.raises(MergeInputError, match=r"candidate 1.*'w'.*NaN or Inf"):
            get_merge("dare")(pool, p=0.99, base=base)


def test_dare_rescaling_overflow_is_a_clear_error():
    pool = [{"w": torch.full((64,), 3e38)}]
    with pytest.raises(MergeInputError, match=r"candidate 0.*'w'.*overflows float32; use a smaller p"):
        get_merge("dare")(pool, p=0.5)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"p": 1.0}, r"p must be a drop probability in \[0, 1\), got 1.0"),
        ({"p": -0.1}, r"p must be a drop probability in \[0, 1\)"),
        ({"p": float("nan")}, r"p must be a drop probability"),
        ({"p": "0.5"}, r"p must be a drop probability"),
        ({"p": True}, r"p must be a drop probability"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"base": "magmax"}, "base must be one of average, ties, negmerge, got 'magmax'"),
        ({"base_params": [1]}, "base_params must be a mapping"),
        ({"base": "ties", "base_params": {"kk": 1}}, "base_params: unknown ties parameter 'kk'; known: k, scope"),
        ({"base_params": {"k": 0.2}}, "base_params: unknown average parameter 'k'; known: none"),
        ({"base": "ties", "base_params": {"k": 2}}, r"base_params: k must be a fraction in \(0, 1\], got 2"),
        ({"base": "negmerge", "base_params": {"threshold": 0}}, r"base_params: threshold must be a number in \(0, 1\]"),
    ],
)
def test_dare_bad_params_name_the_field(params, message):
    with pytest.raises(MergeInputError, match=message):
        get_merge("dare")([{"w": torch.ones(2)}], **params)
    with pytest.raises(ValueError, match=f"dare: {message}"):  # what the config reports at load
        get_method("dare").check_params(params)


# -- Iso-C ------------------------------------------------------------------------------------------


@st.composite
def matrix_pools(draw):
    k = draw(st.integers(1, 5))
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    return [
        {"m": torch.randn(rows, cols, generator=g), "b": torch.randn(5, generator=g), "c": torch.randn(2, 3, 2)}
        for _ in range(k)
    ]


@settings(max_examples=150, deadline=None)
@given(matrix_pools())
def test_iso_c_matches_numpy_svd(pool):
    merged = get_merge("iso_c")(pool)
    mean = {k: np.mean([tv[k].double().numpy() for tv in pool], axis=0) for k in pool[0]}
    # tolerance, never bits: LAPACK's SVD differs between CPUs
    np.testing.assert_allclose(merged["m"].double().numpy(), iso_c_ref(mean["m"]), rtol=1e-5, atol=1e-5)
    for key in ("b", "c"):  # not 2-D: the plain mean, the uniform merge's bits
        assert torch.equal(merged[key], get_merge("average")(pool)[key])


def test_iso_c_flattens_the_spectrum_and_keeps_the_singular_directions():
    g = torch.Generator().manual_seed(0)
    low_rank_ish = (
        torch.randn(64, 8, generator=g) @ torch.diag(torch.logspace(0, -3, 8)) @ torch.randn(8, 48, generator=g)
    )
    pool = [{"w": low_rank_ish + 1e-4 * torch.randn(64, 48, generator=g)} for _ in range(3)]
    mean = torch.stack([tv["w"] for tv in pool]).mean(0).double()
    s_mean = torch.linalg.svdvals(mean)
    merged = get_merge("iso_c")(pool)["w"].double()
    s = torch.linalg.svdvals(merged)
    torch.testing.assert_close(s, torch.full_like(s, float(s_mean.mean())), rtol=1e-5, atol=0)
    u, _, vh = torch.linalg.svd(mean, full_matrices=False)
    torch.testing.assert_close(merged, float(s_mean.mean()) * (u @ vh), rtol=0, atol=1e-5 * float(s_mean.mean()))


@pytest.mark.parametrize("shape", [(30, 200), (200, 30), (1, 9), (9, 1)])
def test_iso_c_wide_tall_and_vector_shaped_matrices(shape):
    g = torch.Generator().manual_seed(2)
    pool = [{"w": torch.randn(shape, generator=g)} for _ in range(3)]
    mean = np.mean([tv["w"].double().numpy() for tv in pool], axis=0)
    merged = get_merge("iso_c")(pool)["w"]
    assert merged.shape == shape
    np.testing.assert_allclose(merged.double().numpy(), iso_c_ref(mean), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_iso_c_half_precision_in_same_dtype_out(dtype, tmp_path):
    pool = _pool(3, dtype)
    merged = get_merge("iso_c")(pool)
    paths = [save_state(tv, tmp_path / f"tv{i}.safetensors") for i, tv in enumerate(pool)]
    streamed = get_merge("iso_c")(paths)
    for key in merged:
        assert merged[key].dtype == dtype and torch.equal(merged[key], streamed[key])
    mean = np.mean([tv["a"].double().numpy() for tv in pool], axis=0)  # the SVD sees the unrounded mean
    expected = torch.from_numpy(iso_c_ref(mean)).to(dtype)
    torch.testing.assert_close(merged["a"].float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_iso_c_nan_is_a_clear_error():
    pool = [{"w": torch.ones(3, 3)}, {"w": torch.tensor([[1.0, 2.0, float("nan")]] * 3)}]
    with pytest.raises(MergeInputError, match=r"candidate 1.*'w'.*NaN or Inf"):
        get_merge("iso_c")(pool)


def test_iso_c_does_not_depend_on_the_thread_count(monkeypatch):
    """Each SVD runs on one core whatever the number of threads sharing them out: the same bits."""
    g = torch.Generator().manual_seed(4)
    pool = [{f"m{j}": torch.randn(60 + j, 40, generator=g) for j in range(5)} for _ in range(3)]
    monkeypatch.setenv("NEGMERGE_MERGE_THREADS", "1")
    one = get_merge("iso_c")(pool)
    monkeypatch.setenv("NEGMERGE_MERGE_THREADS", "3")
    three = get_merge("iso_c")(pool)
    for key in one:
        assert torch.equal(one[key], three[key]), key
