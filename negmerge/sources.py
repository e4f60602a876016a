"""Uniform read access to a set of named tensors, in memory or in a safetensors file.

Merges read one tensor at a time through this interface, so an in-memory dict and a memory-mapped
file go through exactly the same code (and give bit-identical results).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

import torch
from safetensors import safe_open

from negmerge.errors import MergeInputError


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors that can be listed cheaply and loaded one at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def is_floating(self, key: str) -> bool: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A state dict already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "dict") -> None:
        self._tensors = tensors
        self.name = name

    def keys(self) -> list[str]:
        return list(self._tensors.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def is_floating(self, key: str) -> bool:
        return torch.is_floating_point(self._tensors[key])

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class SafetensorsSource:
    """A safetensors file, memory-mapped: only the tensor asked for is copied into process memory.

    The file's pages are page cache (reclaimable), so K candidates on disk cost about one tensor each
    of anonymous memory while a merge runs, not one model each.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MergeInputError(f"task vector file not found: {self.path}")
        self.name = str(self.path)
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise MergeInputError(f"{self.path} is not a readable safetensors file: {exc}") from exc
        self._keys = list(self._handle.keys())

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def is_floating(self, key: str) -> bool:
        return self._handle.get_slice(key).get_dtype() in _FLOAT_DTYPES

    def get(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

SourceLike = Union[TensorSource, Mapping[str, torch.Tensor], str, os.PathLike]  # noqa: UP007 (py3.10 runtime alias)


def as_source(item: SourceLike, index: int = 0) -> TensorSource:
    """Wrap a dict, a path or an existing source; the index names the candidate in error messages."""
    if isinstance(item, TensorSource):
        return item
    if isinstance(item, Mapping):
        return DictSource(item, name=f"candidate {index}")
    if isinstance(item, (str, os.PathLike)):
        return SafetensorsSource(item)
    raise MergeInputError(
        f"candidate {index}: expected a state dict, a safetensors path or a TensorSource, got {type(item).__name__}"
    )
