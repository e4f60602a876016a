"""Every merge's output, bit for bit, as the code gave it when these digests were written: a speed-up
of the streaming engine or of a merge's arithmetic (threads, fused ops, a faster top-k cut) must not
change a single bit. The pool has multi-chunk tensors, exact zeros, ties and a bfloat16 variant.

The pool is drawn the same on every CPU (integers) and its float32 sums are exact: when these digests
were written, the float32 outputs equalled tests/reference_merges.py's bit for bit.

These bits are the same on every CPU by construction: IEEE float32 additions, divisions and compares
in a fixed order, compiled without fast-math (negmerge/kernels.py), and integer arithmetic. DARE's mask
is that too (BLAKE2b keys, splitmix64 on uint64). Iso-C is not pinned: its SVD is LAPACK's, whose bits
depend on the CPU and the BLAS build (tests/test_dare_iso_c.py compares it to numpy with a tolerance)."""

from __future__ import annotations

import ast
import hashlib

import pytest
import torch

from baselines import get_merge
from negmerge import streaming


def golden_pool(k: int = 7, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """Multiples of 1/64 drawn as integers: torch.randint is the same on every CPU, unlike torch.randn,
    whose vectorised kernel gives other last bits per instruction set (ATEN_CPU_CAPABILITY=default
    changed every digest). Exact zeros, equal magnitudes and zero sums occur."""
    g = torch.Generator().manual_seed(1234)
    shapes = {"a": (600, 700), "b": (1000,), "c": (5, 7, 11)}  # "a" spans two engine chunks
    common = {name: torch.randint(-128, 129, shape, generator=g) for name, shape in shapes.items()}
    return [
        {n: ((c + torch.randint(-90, 91, c.shape, generator=g)).float() / 64).to(dtype) for n, c in common.items()}
        for _ in range(k)
    ]


def digest(merged: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(merged):
        h.update(key.encode())
        h.update(merged[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


CASES = {
    ("negmerge", "{}", "float32"): "655205852e1ef44e",
    ("negmerge", "{'threshold': 0.6}", "float32"): "2174da662b957686",
    ("average", "{}", "float32"): "ab3b749a4ae99556",
    ("magmax", "{}", "float32"): "4e2a2c22711f69bc",
    ("ties", "{}", "float32"): "7964042e4f140f40",
    ("ties", "{'k': 0.5, 'scope': 'tensor'}", "float32"): "0f04ac278e4bbe2f",
    ("negmerge", "{}", "bfloat16"): "72cf0b68e1ee0d0c",
    ("ties", "{}", "bfloat16"): "c87fdd2fa423b5ed",
    ("dare", "{}", "float32"): "7c794fb924857142",
    ("dare", "{'p': 0.3, 'seed': 5, 'base': 'ties', 'base_params': {'k': 0.3}}", "float32"): "93729248563ec9b6",
    ("dare", "{'p': 0.2, 'base': 'negmerge', 'base_params': {'threshold': 0.6}}", "float32"): "0f7b9a9f1ffc5f73",
    ("dare", "{'base': 'ties'}", "bfloat16"): "716b096fb9b0a3ee",
}
# the same cases over an even pool (6 candidates), from the same code: kernels that take the
# candidates two at a time end differently for an even and an odd K
EVEN_CASES = {
    ("negmerge", "{}", "float32"): "79825a3a8318cbe3",
    ("negmerge", "{'threshold': 0.6}", "float32"): "db7ca5f83d9846e9",
    ("average", "{}", "float32"): "f2ebcbcaa82a5c6e",
    ("magmax", "{}", "float32"): "c382f49550a841ff",
    ("ties", "{}", "float32"): "f3ba1992a2832285",
    ("ties", "{'k': 0.5, 'scope': 'tensor'}", "float32"): "5fa8f80db1ec9605",
    ("negmerge", "{}", "bfloat16"): "7133ff9e65fa887d",
    ("ties", "{}", "bfloat16"): "3e846dbd269e74f8",
    ("dare", "{}", "float32"): "35e3eee0864f9715",
    ("dare", "{'p': 0.3, 'seed': 5, 'base': 'ties', 'base_params': {'k': 0.3}}", "float32"): "505926555f97f267",
    ("dare", "{'p': 0.2, 'base': 'negmerge', 'base_params': {'threshold': 0.6}}", "float32"): "865ee1a9773a08da",
    ("dare", "{'base': 'ties'}", "bfloat16"): "26afda171e0fe128",
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [7, 6])
@pytest.mark.parametrize(("name", "params", "dtype"), list(CASES))
def test_merge_output_is_bit_identical_to_its_digest(name, params, dtype, k, threads, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 1 << 16)  # many chunks: the threads share them out
    monkeypatch.setenv("NEGMERGE_MERGE_THREADS", str(threads))
    merged = get_merge(name)(golden_pool(k, dtype=getattr(torch, dtype)), **ast.literal_eval(params))
    assert digest(merged) == (CASES if k == 7 else EVEN_CASES)[(name, params, dtype)]
