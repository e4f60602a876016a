"""Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025), as
docs/metrics.md#merges defines it.

Every 2-D tensor of the candidates' mean task vector M = U diag(S) V^T is replaced by
U diag(mean(S)) V^T = mean(S) U V^T: the same singular directions, with a flat spectrum. Every other
tensor (1-D biases and norms, 4-D convolutions) is the plain mean.

Cost: the mean streams like the uniform merge (fused kernel, read once), then one SVD per matrix, in
float64 (LAPACK via torch). The SVDs run side by side, ``merge_threads()`` of them, each on one core:
the bits then do not depend on the thread count, and no SVD's parallel regions wait on descheduled
threads (on a busy machine a multi-threaded SVD ran many times slower than a single-threaded one). The float64 SVD is on purpose: Iso-C gives the weakest singular
directions the same weight as the strongest, and a float32 SVD determines those directions to
only a few digits when the spectrum falls off steeply, as fine-tuning updates' do. A wide matrix is
decomposed transposed (the same U V^T, and LAPACK's tall path is several times faster).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from baselines.average import mean_reduce
from negmerge.errors import MergeInputError
from negmerge.sources import ForwardingSource, SourceLike
from negmerge.streaming import merge_elementwise, merge_threads, one_thread_per_op, open_sources


class _AsFloat32(ForwardingSource):
    """A candidate read as float32, so the mean the SVD starts from is not rounded to a half dtype."""

    def get(self, key: str) -> torch.Tensor:
        return self._source.get(key).to(torch.float32)


def isotropic(matrix: torch.Tensor, key: str = "") -> torch.Tensor:
    """mean(S) * U V^T of one matrix's thin SVD, computed in float64, returned in float32."""
    tall = matrix.shape[0] >= matrix.shape[1]
    a = (matrix if tall else matrix.T).to(torch.float64)
    try:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError as exc:
        raise MergeInputError(f"key {key!r}: the SVD of the mean task vector did not converge: {exc}") from None
    flat = (u @ vh).mul_(s.mean())
    return (flat if tall else flat.T).to(torch.float32)


def iso_c_merge(task_vectors: Sequence[SourceLike]) -> dict[str, torch.Tensor]:
    """Mean task vector, each 2-D tensor's singular values replaced by their mean; dtypes as candidate 0's."""
    sources = open_sources(task_vectors)
    mean = merge_elementwise([_AsFloat32(s) for s in sources], mean_reduce)
    matrices = [key for key, tensor in mean.items() if tensor.ndim == 2 and tensor.numel() > 0]
    with one_thread_per_op(), ThreadPoolExecutor(merge_threads()) as pool:  # torch frees the GIL in the SVD
        flat = dict(zip(matrices, pool.map(lambda key: isotropic(mean[key], key), matrices), strict=True))
    return {key: flat.get(key, tensor).to(sources[0].get(key).dtype) for key, tensor in mean.items()}
