"""DARE, drop and rescale (Yu et al., ICML 2024), as docs/metrics.md#merges defines it.

Each candidate's task vector loses every element with probability ``p`` (it becomes +0.0) and the
survivors are rescaled to ``x / (1 - p)``, which keeps the vector's expectation; a base merge
(``average``, ``ties`` or ``negmerge``, with its own ``base_params``) then combines the dropped vectors.

The drop is a counter-based random function, not a generator's stream: element ``e`` of tensor
``name`` of candidate ``i`` is dropped where the top 53 bits of splitmix64(key + (e + 1) * golden) are
below ``ceil(p * 2**53)``, with ``key`` the first 8 bytes (little-endian) of BLAKE2b over
``"dare", seed, i, name``. So the mask depends on nothing but (seed, i, name, e): not on chunk
boundaries, thread count, dtype, or whether the candidates are files or state dicts.

It streams like the other element-wise merges: each chunk of the K candidates is dropped into a
per-thread scratch block (in cache) and handed to the base's fused kernel in the same pass. TIES's
per-candidate cut is taken over the dropped vectors (one extra pass, as for TIES itself).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from baselines.average import average_merge, mean_reduce
from baselines.ties import TiesReduce, check_ties_params, ties_merge, ties_reducer
from negmerge import kernels
from negmerge.errors import MergeInputError
from negmerge.merge import consensus_reduce, required_votes, sign_consensus_merge
from negmerge.sources import ForwardingSource, SourceLike, TensorSource
from negmerge.streaming import Reduce, Where, floating_keys_of, merge_elementwise, open_sources

BASES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "average": average_merge,
    "ties": ties_merge,
    "negmerge": sign_consensus_merge,
}


def stream_key(seed: int, candidate: int, name: str) -> int:
    """The 64-bit key of one candidate's tensor: its drop mask is splitmix64 over key + counter."""
    digest = hashlib.blake2b(f"dare\0{seed}\0{candidate}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_threshold(p: float) -> int:
    """Element dropped iff (splitmix64 bits >> 11) < this: probability ceil(p * 2**53) / 2**53."""
    return math.ceil(p * 2**53)  # p * 2**53 is exact in float64, so this is the exact integer


def _check(p: float, seed: int, base: str, base_params: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise MergeInputError(f"p must be a drop probability in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeInputError(f"seed must be a whole number, got {seed!r}")
    if not isinstance(base, str) or base not in BASES:
        raise MergeInputError(f"base must be one of {', '.join(BASES)}, got {base!r}")
    params = {} if base_params is None else base_params
    if not isinstance(params, Mapping):
        raise MergeInputError(f"base_params must be a mapping of {base}'s parameters, got {base_params!r}")
    known = [n for n in inspect.signature(BASES[base]).parameters if n != "task_vectors"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise MergeInputError(
            f"base_params: unknown {base} parameter {unknown[0]!r}; known: {', '.join(known) or 'none'}"
        )
    try:
        if base == "ties":
            check_ties_params(params.get("k", 0.2), params.get("scope", "global"))
        elif base == "negmerge":
            required_votes(params.get("threshold", 1.0), 1)
    except MergeInputError as exc:
        raise MergeInputError(f"base_params: {exc}") from None
    return dict(params)


class _Drop:
    """The K candidates' drop keys, per tensor, and the float32 arithmetic of one drop."""

    def __init__(self, sources: Sequence[TensorSource], p: float, seed: int) -> None:
        self.sources = sources
        self.below = np.uint64(drop_threshold(p))
        self.keep = np.float32(1.0 - p)
        self.keys = {
            key: np.array([stream_key(seed, i, key) for i in range(len(sources))], dtype=np.uint64)
            for key in floating_keys_of(sources[0])
        }

    def into(self, i: int, key: str, start: int, values: np.ndarray, out: np.ndarray) -> int:
        """Candidate i's elements start.. of ``key`` (float32 ``values``) dropped into ``out``; the
        kernel's status (0 fine, 1 NaN/Inf input, 2 overflow on rescaling)."""
        return kernels.drop_and_rescale(values, out, self.keys[key][i], start, self.below, self.keep)

    def overflow(self, i: int, key: str) -> MergeInputError:
        return MergeInputError(
            f"candidate {i} ({self.sources[i].name}): key {key!r}: a value rescaled by 1/(1 - p) = 1/{self.keep} "
            "overflows float32; use a smaller p"
        )


class _DroppedSource(ForwardingSource):
    """Candidate i as DARE drops it, a whole tensor at a time (TIES's cut pass reads it this way)."""

    def __init__(self, drop: _Drop, i: int) -> None:
        super().__init__(drop.sources[i])
        self._drop, self._i = drop, i

    def get(self, key: str) -> torch.Tensor:
        values = self._source.get(key).detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        out = torch.empty_like(values)
        status = self._drop.into(self._i, key, 0, values.numpy(), out.numpy())
        if status == 1:
            raise MergeInputError(f"candidate {self._i} ({self.name}): key {key!r} contains NaN or Inf")
        if status == 2:
            raise self._drop.overflow(self._i, key)
        return out.view(self._source.shape(key))


class _DropThenReduce:
    """Drop the K candidates' chunk, a block of BLOCK elements at a time, into a per-thread scratch
    block (K x BLOCK float32, in L2), and run the base's reducer on each dropped block, writing straight
    into the output: the inputs are read once, the scratch never leaves the cache."""

    BLOCK = 1 << 14

    def __init__(self, drop: _Drop, base: Reduce) -> None:
        self.drop = drop
        self.base = base
        self.local = threading.local()

    def _scratch(self, k: int) -> tuple[torch.Tensor, np.ndarray]:
        block = getattr(self.local, "block", None)
        if block is None:
            block = self.local.block = torch.empty(k, self.BLOCK, dtype=torch.float32)
            self.local.addresses = np.array([row.data_ptr() for row in block], dtype=np.int64)
        return block, self.local.addresses

    def __call__(self, chunks: list[torch.Tensor], where: Where) -> torch.Tensor:
        block, scratch = self._scratch(len(chunks))
        inputs = where.addresses()
        keys = self.drop.keys[where.key]
        n = where.out.numel()
        results = []  # a base reducer may return its own tensor (NegMerge's single-candidate path)
        for s in range(0, n, self.BLOCK):
            m = min(self.BLOCK, n - s)
            status, i = kernels.drop_and_rescale_all(
                inputs + 4 * s, scratch, m, keys, where.start + s, self.drop.below, self.drop.keep
            )
            if status == 1:
                where.check(False)  # the exact check names the candidate holding NaN/Inf
            if status == 2:
                raise self.drop.overflow(i, where.key)
            dropped = [row[:m] for row in block]
            inner = Where(where.key, where.start + s, dropped, self.drop.sources, out=where.out[s : s + m])
            results.append(self.base(dropped, inner))
        where.check(True)  # every input finite: the kernel saw each value
        for r, s in zip(results, range(0, n, self.BLOCK), strict=True):
            part = where.out[s : s + r.numel()]
            if r.data_ptr() != part.data_ptr():
                part.copy_(r)
        return where.out


def dare_merge(
    task_vectors: Sequence[SourceLike],
    p: float = 0.5,
    seed: int = 0,
    base: str = "average",
    base_params: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Drop each candidate's elements with probability ``p``, rescale the rest by 1/(1-p), merge by ``base``."""
    params = _check(p, seed, base, base_params)
    sources = open_sources(task_vectors)
    drop = _Drop(sources, p, seed)
    if base == "average":
        return merge_elementwise(sources, _DropThenReduce(drop, mean_reduce))
    if base == "negmerge":
        n = len(sources)
        need = required_votes(params.get("threshold", 1.0), n)
        return merge_elementwise(sources, _DropThenReduce(drop, consensus_reduce(need, n)))
    dropped = [_DroppedSource(drop, i) for i in range(len(sources))]
    ties: TiesReduce = ties_reducer(dropped, **params)
    out = merge_elementwise(sources, _DropThenReduce(drop, ties))
    ties.fix_zero_sums(out)
    return out
