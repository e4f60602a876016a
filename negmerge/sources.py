"""Uniform read access to a set of named tensors, in memory or in a safetensors file.

Merges read one tensor at a time through this interface, so an in-memory dict and a memory-mapped
file go through exactly the same code (and give bit-identical results).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
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


class ForwardingSource:
    """Another source's keys, shapes and kinds, for a view of it that changes only what ``get`` returns
    (a subclass defines ``get``)."""

    def __init__(self, source: TensorSource) -> None:
        self._source = source
        self.name = source.name

    def keys(self) -> list[str]:
        return self._source.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def is_floating(self, key: str) -> bool:
        return self._source.is_floating(key)


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
    """A safetensors file, memory-mapped: ``get`` returns a zero-copy view of the file's pages.

    The pages are page cache (reclaimable), so K candidates on disk cost no anonymous memory while a
    merge runs, and the merge reads each byte straight from the mapping instead of first copying each
    tensor out (that copy was a third of the merge's time). The mapping is private copy-on-write:
    writing into a returned tensor changes this process's copy only, never the file.
    safetensors itself validates the file; the layout (dtype, shape, byte range) comes from its header.
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
        self._layout, self._mapping = _map_file(self.path)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def is_floating(self, key: str) -> bool:
        return self._handle.get_slice(key).get_dtype() in _FLOAT_DTYPES

    def get(self, key: str) -> torch.Tensor:
        layout = self._layout.get(key) if self._mapping is not None else None
        if layout is None:  # a dtype torch cannot view, or a big-endian host: let safetensors copy it
            return self._handle.get_tensor(key)
        dtype, shape, offset, count = layout
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._mapping, dtype=dtype, count=count, offset=offset).view(shape)


VIEWABLE_DTYPES = {  # safetensors dtype names that map onto a torch dtype a file's bytes can be viewed as
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

Layout = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, byte offset in file, element count


def _map_file(path: Path) -> tuple[dict[str, Layout], mmap.mmap | None]:
    """Parse the safetensors header (u64 little-endian length, then JSON) and map the file.

    Tensors whose dtype torch cannot view are left out of the layout (``get`` falls back to a copy).
    """
    if sys.byteorder != "little":
        return {}, None
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        size = os.fstat(f.fileno()).st_size  # non-empty: safe_open has validated the file
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data_start = 8 + header_len
    layout: dict[str, Layout] = {}
    for key, info in header.items():
        if key == "__metadata__" or info["dtype"] not in VIEWABLE_DTYPES:
            continue
        dtype = VIEWABLE_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if data_start + end > size or (end - begin) % dtype.itemsize:
            raise MergeInputError(f"{path}: key {key!r} has a byte range that does not fit the file")
        layout[key] = (dtype, tuple(info["shape"]), data_start + begin, (end - begin) // dtype.itemsize)
    return layout, mapping


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


class DifferenceSource:
    """The task vector ``theta_i - theta_0`` of two checkpoints, formed chunk by chunk, never whole.

    Both sides are TensorSources (files are memory maps), so a merge of K fine-tuned checkpoints
    against their base holds no task vector in memory: ``flat(key)`` hands the merge engine a lazy
    view whose slices are ``float32(theta_i) - float32(theta_0)`` over that slice only (the formula
    of ``negmerge.task_vector``, without rounding back to half precision). ``get`` forms one whole
    tensor, for merges that need a global pass (TIES's top-k cut). Floating keys only (of ``keys``,
    default all of the base's): integer buffers are not weights.
    """

    def __init__(
        self, finetuned: TensorSource, base: TensorSource, name: str | None = None, keys: list[str] | None = None
    ) -> None:
        self.finetuned = finetuned
        self.base = base
        self.name = name or finetuned.name
        self._keys = [k for k in (base.keys() if keys is None else keys) if base.is_floating(k)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def is_floating(self, key: str) -> bool:
        return True

    def get(self, key: str) -> torch.Tensor:
        return self.flat(key)[:].view(self.shape(key))

    def flat(self, key: str) -> LazyDifference:
        return LazyDifference(self.finetuned.get(key).reshape(-1), self.base.get(key).reshape(-1))


class LazyDifference:
    """A flat ``a - b`` in float32 that computes only the slices asked for (see DifferenceSource).

    The engine asks for the same slice of every candidate in a row, on one thread, so the base's
    slice is converted to float32 once and reused for all K (a one-slot memo per thread); the
    subtraction itself is one op, reading the candidate in its own dtype (type promotion to float32
    converts exactly, so the bits are those of ``a.float() - b.float()``)."""

    dtype = torch.float32

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self._a = a
        self._b = b

    def numel(self) -> int:
        return self._b.numel()

    def __getitem__(self, part: slice) -> torch.Tensor:
        return torch.sub(self._a[part], _base_float32(self._b, part))


_memo = threading.local()


def _base_float32(base: torch.Tensor, part: slice) -> torch.Tensor:
    key = (base.data_ptr(), base.numel(), base.dtype, part.start, part.stop)
    if getattr(_memo, "key", None) != key:
        # holding the base pins its memory, so no other tensor can turn up at this address meanwhile
        _memo.key, _memo.base, _memo.value = key, base, base[part].to(torch.float32)
    return _memo.value


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
