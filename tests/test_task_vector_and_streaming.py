"""Task vectors, apply/negate, atomic saving, and the streamed (safetensors) path vs in-memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from baselines import MERGES, get_merge
from negmerge import MergeInputError, SafetensorsSource, apply, save_state, task_vector


def model_state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
        "ln.bias": torch.randn(7, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(5),
    }


def test_task_vector_skips_integer_tensors_and_roundtrips():
    base, ft = model_state(0), model_state(1)
    tau = task_vector(ft, base)
    assert set(tau) == {"conv.weight", "ln.bias"}
    back = apply(base, tau, 1.0)
    torch.testing.assert_close(back["conv.weight"], ft["conv.weight"])
    assert torch.equal(back["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    neg = apply(base, tau, -0.5)
    torch.testing.assert_close(neg["ln.bias"], base["ln.bias"] - 0.5 * (ft["ln.bias"] - base["ln.bias"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_task_vector_accumulates_in_float32(dtype):
    base, ft = model_state(0, dtype), model_state(1, dtype)
    tau = task_vector(ft, base)
    assert tau["conv.weight"].dtype == dtype
    expected = (ft["conv.weight"].float() - base["conv.weight"].float()).to(dtype)
    assert torch.equal(tau["conv.weight"], expected)
    assert apply(base, tau, -1.0)["conv.weight"].dtype == dtype


def test_task_vector_errors_name_the_first_bad_key():
    base = model_state(0)
    with pytest.raises(MergeInputError, match="'ln.bias' is missing"):
        task_vector({k: v for k, v in base.items() if k != "ln.bias"}, base)
    with pytest.raises(MergeInputError, match=r"'conv.weight' has shape \(4, 3, 3\)"):
        task_vector({**base, "conv.weight": torch.zeros(4, 3, 3)}, base)
    with pytest.raises(MergeInputError, match="unexpected key 'extra'"):
        task_vector({**base, "extra": torch.zeros(1)}, base)
    with pytest.raises(MergeInputError, match="'ln.bias' contains NaN"):
        task_vector({**base, "ln.bias": torch.full((7,), float("nan"))}, base)


def test_apply_rejects_bad_coef_and_foreign_keys():
    base = model_state(0)
    tau = task_vector(model_state(1), base)
    with pytest.raises(MergeInputError, match="coef must be a finite number"):
        apply(base, tau, float("nan"))
    with pytest.raises(MergeInputError, match="'ghost' is missing"):
        apply(base, {**tau, "ghost": torch.zeros(1)}, 1.0)


@pytest.mark.parametrize("name", sorted(MERGES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_and_in_memory_are_bit_identical(tmp_path, name, dtype):
    base = model_state(0, dtype)
    pool = [task_vector(model_state(s, dtype), base) for s in range(1, 6)]
    paths = [save_state(tv, tmp_path / f"tv{i}.safetensors") for i, tv in enumerate(pool)]
    merge = get_merge(name)
    in_memory = merge(pool)
    streamed = merge(paths)
    mixed = merge([paths[0], *pool[1:3], SafetensorsSource(paths[3]), paths[4]])
    assert in_memory.keys() == streamed.keys() == mixed.keys()
    for k in in_memory:
        assert torch.equal(in_memory[k], streamed[k]) and torch.equal(in_memory[k], mixed[k])
        assert streamed[k].dtype == dtype


def test_file_views_match_safetensors_and_never_write_back(tmp_path):
    """Zero-copy views of every dtype (odd lengths, an empty tensor) equal safetensors' own copies;
    writing into a view changes this process's copy-on-write page only, never the file."""
    g = torch.Generator().manual_seed(0)
    state = {
        "a_half": torch.randn(3, generator=g).half(),
        "b_float": torch.randn(2, 5, generator=g),
        "c_bf16": torch.randn(7, generator=g).bfloat16(),
        "d_int": torch.arange(3),
        "e_empty": torch.zeros(0, 4),
        "f_double": torch.randn(2, generator=g).double(),
    }
    path = tmp_path / "mixed.safetensors"
    save_state(state, path)
    source = SafetensorsSource(path)
    for key, expected in state.items():
        got = source.get(key)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected), key
    source.get("b_float").fill_(7.0)
    assert torch.equal(load_file(str(path))["b_float"], state["b_float"])


def test_save_state_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "tv.safetensors"
    save_state({"w": torch.ones(3)}, path)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("negmerge.arithmetic.save_file", explode)
    with pytest.raises(OSError):
        save_state({"w": torch.zeros(3)}, path)
    assert load_file(path)["w"].tolist() == [1.0, 1.0, 1.0]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["tv.safetensors"]  # no temp file left behind


def test_missing_or_corrupt_file_is_a_clear_error(tmp_path):
    with pytest.raises(MergeInputError, match="not found"):
        get_merge("negmerge")([tmp_path / "nope.safetensors"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MergeInputError, match="not a readable safetensors file"):
        get_merge("negmerge")([bad])


@pytest.mark.parametrize("name", sorted(MERGES))
def test_chunk_boundaries_do_not_change_results(monkeypatch, name):
    torch.manual_seed(3)
    pool = [{"a": torch.randn(37, 5).round(decimals=1), "b": torch.randn(11).round(decimals=1)} for _ in range(4)]
    whole = get_merge(name)(pool)
    monkeypatch.setattr("negmerge.streaming.CHUNK_ELEMENTS", 7)
    chunked = get_merge(name)(pool)
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k


@pytest.mark.parametrize("sample", [None, 64])  # the radix select; the sampled bracket (a 64-value sample)
@pytest.mark.parametrize("m", [1, 2, 50, 200, 777, 999, 1000])
def test_topk_cut_matches_kthvalue(m, sample, monkeypatch):
    from baselines import topk_cut

    if sample:
        monkeypatch.setattr(topk_cut, "SAMPLE", sample)
    torch.manual_seed(m)
    parts = [torch.randn(300) * 1e-3, torch.randn(500), torch.zeros(200), torch.randn(7).round()]  # ties too
    everything = torch.cat(parts).abs()
    expected = float(torch.kthvalue(everything, everything.numel() - m + 1).values)
    assert topk_cut.mth_largest_magnitude(lambda: iter(parts), m) == expected


def test_topk_cut_falls_back_to_the_exact_select_when_the_bracket_misses(monkeypatch):
    from baselines import topk_cut

    monkeypatch.setattr(topk_cut, "SAMPLE", 64)
    monkeypatch.setattr(topk_cut, "Z", 0.0)  # a bracket too narrow to hold the answer, most times
    parts = [torch.randn(4000, generator=torch.Generator().manual_seed(3))]
    everything = parts[0].abs()
    for m in (10, 500, 2000):
        expected = float(torch.kthvalue(everything, everything.numel() - m + 1).values)
        assert topk_cut.mth_largest_magnitude(lambda: iter(parts), m) == expected


def test_count_and_collect_matches_numpy_at_group_edges_and_with_nan():
    from negmerge import kernels

    g = np.random.default_rng(5)
    for size in (1, 63, 64, 65, 1000):
        values = g.normal(size=size).astype(np.float32)
        values[:: max(1, size // 7)] = np.nan
        lo, hi = np.float32(0.5), np.float32(1.0)
        inside = np.empty_like(values)
        above, n_inside = kernels.count_and_collect(values, lo, hi, inside)
        magnitudes = np.abs(values)
        with np.errstate(invalid="ignore"):
            assert above == np.count_nonzero(magnitudes >= hi)
            np.testing.assert_array_equal(inside[:n_inside], magnitudes[(magnitudes >= lo) & (magnitudes < hi)])


def test_one_compiled_kernel_serves_every_pool_size():
    """Candidates reach the kernels as an array of addresses, so K never forces a recompile."""
    from negmerge import kernels

    for k in (2, 3, 7):
        get_merge("negmerge")([{"w": torch.randn(100)} for _ in range(k)])
    assert len(kernels.unanimous.signatures) == 1


@pytest.mark.parametrize("name", sorted(MERGES))
def test_non_contiguous_and_autograd_inputs_merge_like_plain_ones(name):
    """The kernels read raw memory: strided views and parameters reach them as contiguous host copies."""
    g = torch.Generator().manual_seed(0)
    plain = [{"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)} for _ in range(3)]
    odd = [{"w": t["w"].T.contiguous().T, "b": torch.nn.Parameter(t["b"].clone())} for t in plain]
    assert not odd[0]["w"].is_contiguous()
    expected, got = get_merge(name)(plain), get_merge(name)(odd)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
