"""``negmerge-bench merge`` on a sweep the size users bring (``./dev nox -s perf``); figures, not
assertions.

K=8 fine-tuned checkpoints of a Llama-shaped model (hidden 2048, 9 layers, GQA, vocab 32000: 536M
parameters, 1.07 GB in bf16) plus theta_0, each a Hugging Face folder sharded at 400 MB: 9.7 GB of
inputs, made in a temporary folder and deleted after (NEGMERGE_BENCH_DIR keeps them). Phases, each in
a fresh process with its peak anonymous memory: one plain read of every input file; the NegMerge CLI
merge (theta_0 - lam * merged, written sharded like the input) with and without the sidecar's sha256
of every input. Target (issue #24): at most 1.3x the read, peak at most one output shard + 1 GB.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.memory import measure
from benchmarks.merge_workload import read_once

K = 8
SHARD_BYTES = 400_000_000
GB = 1e9
RESULTS: dict[str, dict] = {}


def llama_shapes(hidden=2048, inter=5632, layers=9, heads=16, kv_heads=4, vocab=32000) -> dict[str, tuple]:
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }  # fmt: skip
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def _write_folder(folder: Path, tensors_of, shapes: dict[str, tuple]) -> list[Path]:
    """One Hugging Face style folder, shards of at most SHARD_BYTES, and its index."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map, files = {}, []
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors_of(k, shapes[k]) for k in keys}, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
        files.append(folder / name)
    index = {
        "metadata": {"total_size": sum(2 * torch.Size(s).numel() for s in shapes.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return files


def write_sweep(root: Path) -> tuple[Path, list[Path], list[Path]]:
    shapes = llama_shapes()
    if (root / "done").is_file():
        folders = [root / "theta0", *sorted(p for p in root.iterdir() if p.name.startswith("cand"))]
        return folders[0], folders[1:], [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    gen = torch.Generator().manual_seed(0)

    def base_tensor(key, shape):
        g = torch.Generator().manual_seed(hash(key) % (1 << 31))
        return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)

    files = _write_folder(root / "theta0", base_tensor, shapes)
    cands = []
    for i in range(K):

        def cand_tensor(key, shape):
            return (base_tensor(key, shape).float() + 1e-3 * torch.randn(shape, generator=gen)).to(torch.bfloat16)

        files += _write_folder(root / f"cand{i}", cand_tensor, shapes)
        cands.append(root / f"cand{i}")
    (root / "done").write_text("")
    return root / "theta0", cands, files


def cli_merge(base: Path, cands: list[Path], out: Path, hash_inputs: bool) -> None:
    from bench.checkpoints.merge import MergeRequest, run_merge

    request = MergeRequest(base=base, candidates=[str(c) for c in cands], method="negmerge", out=out, lam=1.0,
                           overwrite=True, hash_inputs=hash_inputs)  # fmt: skip
    run_merge(request, log=lambda m: None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    keep = os.environ.get("NEGMERGE_BENCH_DIR")
    root = Path(keep) / "llama-sweep" if keep else tmp_path_factory.mktemp("llama-sweep")
    base, cands, files = write_sweep(root)
    read_once(files)  # warm the page cache as far as it holds the sweep
    yield root, base, cands, files
    _summary(files)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


def _run(benchmark, phase: str, fn, *args) -> None:
    result = benchmark.pedantic(measure, args=(fn, *args), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS[phase] = result
    print(f"\nllama K={K} {phase:>14}: {result['seconds']:7.2f} s   peak RssAnon {result['peak_rss_anon'] / GB:5.2f} GB "
          f"(baseline {result['baseline_rss_anon'] / GB:4.2f})")  # fmt: skip


def test_read_once(benchmark, sweep):
    _run(benchmark, "read", read_once, sweep[3])


@pytest.mark.parametrize("hash_inputs", [False, True], ids=["merge", "merge+sha256"])
def test_cli_merge(benchmark, sweep, hash_inputs):
    root, base, cands, _ = sweep
    _run(benchmark, "merge+sha256" if hash_inputs else "merge", cli_merge, base, cands, root / "out", hash_inputs)
    shutil.rmtree(root / "out", ignore_errors=True)


def _summary(files: list[Path]) -> None:
    if "read" not in RESULTS:
        return
    total = sum(f.stat().st_size for f in files)
    shard = max(f.stat().st_size for f in files)
    read = RESULTS["read"]["seconds"]
    print(f"\ninputs {total / GB:.2f} GB in {len(files)} files, largest shard {shard / GB:.2f} GB; read {read:.2f} s")
    for phase, r in RESULTS.items():
        above = (r["peak_rss_anon"] - r["baseline_rss_anon"]) / GB
        print(f"  {phase:>14}: {r['seconds'] / read:5.2f}x read, peak {r['peak_rss_anon'] / GB:.2f} GB "
              f"({above:.2f} GB above the interpreter; target <= shard + 1 GB = {shard / GB + 1:.2f} GB)")  # fmt: skip
