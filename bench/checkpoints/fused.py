"""The fused merge path of ``negmerge-bench merge``: checkpoint bytes to output-shard bytes in one pass.

For the elementwise merges with a compiled rule (NegMerge, uniform average, MagMax) and bf16, fp16
or fp32 tensors, each chunk of each tensor goes through negmerge.fused.merge_chunk, which reads
theta_0 and the K candidates from their memory maps and writes ``theta_0 - lam * merged`` (or the
merged vector) into the output shard's buffer: no task vector, merged tensor or theta is ever formed
(bf16; other dtypes round a chunk-sized float32 buffer with torch). The bits are those of the engine
path (DifferenceSource through negmerge.streaming, then arith.theta_from): the same compiled rule
and the same float operations (tests/test_fused_merge.py). TIES (a global top-k cut) and the other
merges keep the engine path. Chunks run on ``merge_threads()`` threads; each writes its own slice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from baselines.average import average_merge
from baselines.magmax import magmax_merge
from negmerge import fused
from negmerge.merge import required_votes, sign_consensus_merge
from negmerge.sources import TensorSource
from negmerge.streaming import CHUNK_ELEMENTS, Where, merge_threads

DTYPE_CODES = {torch.bfloat16: fused.BF16, torch.float16: fused.F16, torch.float32: fused.F32}


@dataclass(frozen=True)
class FusedRule:
    """A merge as negmerge.fused runs it: the rule's code and, for CONSENSUS, the votes it needs."""

    rule: int
    need: int = 0


def fused_rule(merge_fn: Any, params: Mapping[str, Any], k: int) -> FusedRule | None:
    """The compiled rule for a registered merge function and its (resolved) parameters, or None where
    the merge has none (it then runs on the engine). Matched by function, not name, so a method
    registered later under another name is never mistaken for one of these."""
    if k < 2:  # one candidate: NegMerge's rule is a copy of it (negmerge.merge._unanimous), not fused
        return None
    if merge_fn is sign_consensus_merge:
        need = required_votes(params.get("threshold", 1.0), k)
        return FusedRule(fused.UNANIMOUS, k) if need == k else FusedRule(fused.CONSENSUS, need)
    if merge_fn is average_merge:
        return FusedRule(fused.MEAN)
    if merge_fn is magmax_merge:
        return FusedRule(fused.MAX_MAGNITUDE)
    return None


def can_fuse(dtype: torch.dtype) -> bool:
    return dtype in DTYPE_CODES


class FusedMerger:
    """Runs one rule over tensors, chunk by chunk on a thread pool (``close`` when done)."""

    def __init__(self, rule: FusedRule, coef: float | None, sources: Sequence[TensorSource]) -> None:
        self.rule = rule
        self.apply = coef is not None
        self.coef = np.float32(0.0 if coef is None else coef)
        self.sources = sources  # the candidates' DifferenceSources: their names for NaN/Inf errors
        self.threads = merge_threads()
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def merge(self, key: str, base: torch.Tensor, candidates: list[torch.Tensor], out: torch.Tensor) -> int:
        """Write the merge of ``key`` into ``out`` (base's dtype and shape); returns its non-zero count.

        A NaN or Inf input raises MergeInputError naming the first such candidate, as the engine does
        (negmerge.streaming.Where.check), in chunk order."""
        flat_base = base.detach().reshape(-1).contiguous()
        flats = [c.detach().reshape(-1).contiguous() for c in candidates]
        flat_out = out.view(-1)
        code = DTYPE_CODES[flat_base.dtype]
        addresses = np.fromiter((f.data_ptr() for f in flats), dtype=np.int64, count=len(flats))
        n = flat_base.numel()

        def run(start: int) -> tuple[int, bool, int]:
            m = min(CHUNK_ELEMENTS, n - start)
            part = flat_out[start : start + m]
            bf16 = part.dtype == torch.bfloat16
            f32 = part.dtype == torch.float32
            target = part if bf16 or f32 else torch.empty(m, dtype=torch.float32)
            finite, nonzero = fused.merge_chunk(
                flat_base.data_ptr(), addresses, code, start, m, self.rule.rule, self.rule.need,
                self.apply, self.coef, target.data_ptr(), bf16,
            )  # fmt: skip
            if target is not part:
                part.copy_(target)  # torch's float32 -> fp16 rounding
            return start, finite, nonzero

        nonzero = 0
        starts = range(0, n, CHUNK_ELEMENTS)
        results = iter(map(run, starts)) if self.pool is None else self._in_order(run, starts)
        try:
            for start, finite, count in results:
                if not finite:
                    self._exact_check(key, start, flat_base, flats)
                nonzero += count
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # an error: the chunks not started yet are cancelled
        return nonzero

    def _in_order(self, run, starts):
        """Results in chunk order with a window of chunks in flight (errors surface in chunk order)."""
        in_flight: deque[Future] = deque()
        try:
            for start in starts:
                in_flight.append(self.pool.submit(run, start))
                if len(in_flight) >= 4 * self.threads:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()

    def _exact_check(self, key: str, start: int, base: torch.Tensor, flats: list[torch.Tensor]) -> None:
        """The engine's check of a chunk whose sums were not all finite: the error names the first
        candidate holding NaN or Inf; finite values that overflowed are no error."""
        part = slice(start, start + CHUNK_ELEMENTS)
        base32 = base[part].to(torch.float32)
        chunks = [torch.sub(f[part], base32) for f in flats]
        Where(key, start, chunks, self.sources).check(False)
