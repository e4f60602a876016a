"""Name -> merge function. A new merge is one module plus one line in ``MERGES``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from baselines.average import average_merge
from baselines.magmax import magmax_merge
from baselines.ties import ties_merge
from negmerge.errors import MergeInputError
from negmerge.merge import sign_consensus_merge

MergeFn = Callable[..., dict[str, torch.Tensor]]

MERGES: dict[str, MergeFn] = {
    "negmerge": sign_consensus_merge,
    "average": average_merge,
    "ties": ties_merge,
    "magmax": magmax_merge,
}


def get_merge(name: str) -> MergeFn:
    """The merge called ``name``; unknown names list the known ones."""
    try:
        return MERGES[name]
    except (KeyError, TypeError):
        raise MergeInputError(f"unknown merge {name!r}; known merges: {', '.join(sorted(MERGES))}") from None
