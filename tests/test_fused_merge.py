"""The fused checkpoint merge (bench.checkpoints.fused, negmerge.fused) gives the engine path's bits.

``negmerge-bench merge`` runs NegMerge, the uniform average and MagMax through one compiled pass
from the checkpoints' bytes to the output shard's; the engine path (DifferenceSource through
negmerge.streaming, then arith.theta_from) is the reference, and tests/test_checkpoint_merge.py ties
both to the definition. Compared here bit for bit (int16/int32 views: +0.0 and -0.0 differ) on bf16,
fp16 and fp32 inputs whose sizes are odd and cross the kernel's blocks and the engine's chunks, with
signed zeros, exact ties of sign votes and of magnitudes, fp16 subnormals, any thread count, and
chunks that start anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.checkpoints.merge import MergeRequest, run_merge
from bench.errors import BenchError
from negmerge import fused
from negmerge.streaming import CHUNK_ELEMENTS

K = 5
SHAPES = {"one": (1,), "odd": (3, 1365), "block_plus": (fused.BLOCK + 1,), "chunks": (CHUNK_ELEMENTS + 4099,)}
METHODS = [
    ("negmerge", {}),
    ("negmerge", {"threshold": 0.6}),  # 3 of 5 votes
    ("negmerge", {"threshold": 0.4}),  # 2 of 5: both signs can qualify, exact vote ties drop
    ("average", {}),
    ("magmax", {}),
]


def _sweep(root: Path, dtype: torch.dtype, seed: int = 0) -> tuple[Path, list[Path]]:
    """theta_0 and K candidates in ``dtype``: random values plus planted edge cases."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: (0.05 * torch.randn(s, generator=gen)).to(dtype) for k, s in SHAPES.items()}
    cands = [
        {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
        for _ in range(K)
    ]
    b, cs = base["chunks"].view(-1), [c["chunks"].view(-1) for c in cands]
    b[:40] = torch.tensor([0.0, -0.0, 1.0, 0.0] * 10, dtype=dtype)
    for i, c in enumerate(cs):
        step = 2.0**-7
        # +-0 in theta_0 and the candidates (differences +0.0 and -0.0), candidates equal to theta_0
        # (zero votes), and +-v around 0 and 1 (differences of equal magnitude and opposite sign)
        c[:40] = torch.tensor(
            [(-0.0 if i % 2 else 0.0), 0.0, 1.0 + (step if i % 2 else -step), (step if i < 3 else -step)] * 10,
            dtype=dtype,
        )
        c[40:60] = b[40:60]  # no candidate moved: every difference is +0.0
        c[60:80] = b[60:80] + torch.tensor(0.25 if i % 2 else -0.25, dtype=dtype)  # 2 vs 3 votes
    if dtype == torch.float16:  # subnormal fp16 values (below 6.1e-5), and large ones
        b[100:120] = torch.tensor(3e-6, dtype=dtype)
        for i, c in enumerate(cs):
            c[100:120] = torch.tensor(-5e-7 * i, dtype=dtype)
            c[120:130] = torch.tensor(60000.0 * (-1) ** i, dtype=dtype)
    base["position_ids"] = torch.arange(7)
    root.mkdir(parents=True)
    save_file(base, root / "theta0.safetensors")
    paths = []
    for i, c in enumerate(cands):
        c["position_ids"] = torch.arange(7) + i
        paths.append(root / f"c{i}.safetensors")
        save_file(c, paths[-1])
    return root / "theta0.safetensors", paths


def _merge(base: Path, cands: list[Path], out: Path, method: str, params: dict, fused_path: bool, **kw) -> dict:
    request = MergeRequest(base=base, candidates=[str(c) for c in cands], method=method, out=out, params=params,
                           fused=fused_path, hash_inputs=False, **kw)  # fmt: skip
    return run_merge(request, log=lambda m: None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def sweep(request, tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("sweep") / "in", request.param)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused kernel's calls, so a silent fall-back to the engine cannot pass for equality."""
    calls = []
    kernel = fused.merge_chunk

    def counted(*args):
        calls.append(args[4])
        return kernel(*args)

    monkeypatch.setattr(fused, "merge_chunk", counted)
    return calls


@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}{p}" for m, p in METHODS])
@pytest.mark.parametrize("output", ["theta", "vector"])
def test_fused_merge_equals_the_engine_bit_for_bit(sweep, method, params, output, tmp_path, fused_calls):
    base, cands = sweep
    kw = {"vector_only": True} if output == "vector" else {"lam": 0.7}
    engine = _merge(base, cands, tmp_path / "engine.safetensors", method, params, False, **kw)
    assert not fused_calls
    got = _merge(base, cands, tmp_path / "fused.safetensors", method, params, True, **kw)
    assert sum(fused_calls) == sum(np.prod(s) for s in SHAPES.values())  # every float element went fused
    a, b = load_file(tmp_path / "engine.safetensors"), load_file(tmp_path / "fused.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert torch.equal(_bits(a[key]), _bits(b[key])), f"{method} {params} {output}: {key} differs"
    assert (tmp_path / "engine.safetensors").read_bytes() == (tmp_path / "fused.safetensors").read_bytes()
    assert got["consensus_rate"] == engine["consensus_rate"]
    if output == "theta":
        assert any(not torch.equal(b[k], load_file(base)[k]) for k in SHAPES)  # the merge moved something


@pytest.mark.parametrize("threads", ["1", "3"])
def test_the_fused_result_does_not_depend_on_the_thread_count(sweep, threads, tmp_path, monkeypatch):
    base, cands = sweep
    _merge(base, cands, tmp_path / "engine.safetensors", "negmerge", {}, False, lam=1.5)
    monkeypatch.setenv("NEGMERGE_MERGE_THREADS", threads)
    _merge(base, cands, tmp_path / "fused.safetensors", "negmerge", {}, True, lam=1.5)
    assert (tmp_path / "engine.safetensors").read_bytes() == (tmp_path / "fused.safetensors").read_bytes()


@pytest.mark.parametrize("rule", [fused.UNANIMOUS, fused.CONSENSUS, fused.MEAN, fused.MAX_MAGNITUDE])
def test_a_chunk_may_start_and_end_anywhere(sweep, rule):
    """Chunks at offsets that are not multiples of the block give the same bits as one whole call."""
    base_path, cand_paths = sweep
    base = load_file(base_path)["chunks"]
    cands = [load_file(p)["chunks"] for p in cand_paths]
    addresses = np.array([c.data_ptr() for c in cands], dtype=np.int64)
    code = {torch.bfloat16: fused.BF16, torch.float16: fused.F16, torch.float32: fused.F32}[base.dtype]
    n = base.numel()

    def run(start: int, m: int) -> torch.Tensor:
        out = torch.empty(m, dtype=torch.float32)
        finite, _ = fused.merge_chunk(
            base.data_ptr(), addresses, code, start, m, rule, 3, True, np.float32(-0.5), out.data_ptr(), False
        )
        assert finite
        return out

    whole = run(0, n)
    cuts = [0, 1, 38, fused.BLOCK + 3, 3 * fused.BLOCK - 1, 100_001, n]
    parts = torch.cat([run(a, b - a) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(_bits(parts), _bits(whole))


def test_a_nan_in_a_candidate_is_the_same_error_on_both_paths(tmp_path):
    base, cands = _sweep(tmp_path / "in", torch.bfloat16)
    bad = load_file(cands[2])
    bad["chunks"][CHUNK_ELEMENTS + 5] = float("nan")
    save_file(bad, cands[2])
    errors = []
    for fused_path in (False, True):
        with pytest.raises(BenchError) as caught:
            _merge(base, cands, tmp_path / f"o{fused_path}.safetensors", "negmerge", {}, fused_path, lam=1.0)
        errors.append(str(caught.value))
        assert not (tmp_path / f"o{fused_path}.safetensors").exists()
    assert errors[0] == errors[1]
    assert "c2.safetensors" in errors[1] and "'chunks'" in errors[1] and "NaN or Inf" in errors[1]


def test_sharded_output_is_the_same_on_both_paths(tmp_path):
    """A Hugging Face folder of several shards: each shard file is byte-identical, the index too."""
    base, cands = _sweep(tmp_path / "in", torch.bfloat16)

    def as_folder(path: Path, folder: Path) -> Path:
        tensors = load_file(path)
        folder.mkdir()
        weight_map = {}
        for i, key in enumerate(sorted(tensors)):
            name = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
            save_file({key: tensors[key]}, folder / name, metadata={"format": "pt"})
            weight_map[key] = name
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return folder

    base_dir = as_folder(base, tmp_path / "theta0")
    cand_dirs = [as_folder(c, tmp_path / f"cand{i}") for i, c in enumerate(cands)]
    for fused_path in (False, True):
        _merge(base_dir, cand_dirs, tmp_path / f"out{fused_path}", "magmax", {}, fused_path, lam=0.3)
    names = sorted(p.name for p in (tmp_path / "outTrue").iterdir() if p.name != "merge.json")
    assert len([n for n in names if n.endswith(".safetensors")]) == len(SHAPES) + 1
    for name in names:
        assert (tmp_path / "outFalse" / name).read_bytes() == (tmp_path / "outTrue" / name).read_bytes(), name
