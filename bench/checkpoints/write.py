"""Write a checkpoint atomically: a single safetensors file, or a Hugging Face folder of shards.

Everything is staged beside the destination and renamed into place at the end, so an interrupted
write leaves the old output (or none), never a torn one. Shards are built one at a time as they
are computed, each in one reused buffer written with one write, so the writer holds one shard in
memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError

INDEX_NAME = "model.safetensors.index.json"
METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise BenchError(f"--out {out} already exists; pass --overwrite to replace it, or pick another path")


class StagedOutput:
    """An output being written: ``add_shard`` per shard, then ``commit`` (or ``abort``) once.

    ``folder`` True writes a Hugging Face folder (shards, index, copied side files, sidecar inside);
    False writes one ``.safetensors`` file with its sidecar beside it (``sidecar_path``).
    """

    def __init__(self, out: Path, folder: bool, overwrite: bool) -> None:
        refuse_existing(out, overwrite)
        self.out = out
        self.folder = folder
        out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.buffers = ShardBuffer()

    def sidecar_path(self, final: bool = True) -> Path:
        name = "merge.json" if self.folder else self.out.with_suffix(".merge.json").name
        if final:
            return self.out / name if self.folder else self.out.parent / name
        return self.stage / name

    def open_shard(self, name: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> ShardWriter:
        """A shard whose tensors (key, dtype, shape, in this order) are then written one by one."""
        target = self.stage / (name if self.folder else self.out.name)
        for key, dtype, shape in entries:
            self.weight_map[key] = name
            self.total_size += math.prod(shape) * dtype.itemsize
        return ShardWriter(target, entries, self.buffers)

    def copy_side_files(self, files: list[Path]) -> None:
        for file in files:
            shutil.copy2(file, self.stage / file.name)

    def write_sidecar(self, record: dict) -> None:
        self.sidecar_path(final=False).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")

    def commit(self, sharded: bool) -> Path:
        self.buffers = ShardBuffer()  # every shard is on disk: drop the buffer
        if self.folder:
            if sharded:
                index = {
                    "metadata": {"total_size": self.total_size},
                    "weight_map": dict(sorted(self.weight_map.items())),
                }
                (self.stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            backup = None
            if self.out.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
                os.replace(self.out, backup / "old")
            os.replace(self.stage, self.out)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        else:
            if self.out.is_dir():
                shutil.rmtree(self.out)  # --overwrite of a folder by a file
            os.replace(self.sidecar_path(final=False), self.sidecar_path())
            os.replace(self.stage / self.out.name, self.out)  # the weights last: OUT existing means complete
            shutil.rmtree(self.stage, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
        self.buffers = ShardBuffer()


_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


class ShardWriter:
    """One safetensors file built in one buffer and written with one write on ``close``.

    The header is known up front (every key's dtype and shape), so each tensor has its slot in the
    buffer from the start: a merge writes its results straight into ``slot(key)`` (bench.checkpoints
    .fused), or ``write`` copies a finished tensor in. The buffer is the StagedOutput's, reused from
    shard to shard (its pages are touched once), so memory holds one output shard
    (safetensors' own save_file serialises the whole file again in memory first).
    """

    def __init__(
        self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], buffers: ShardBuffer
    ) -> None:
        if sys.byteorder != "little":
            raise BenchError("writing safetensors needs a little-endian machine")
        header: dict[str, object] = {}
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = METADATA
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        data_start = 8 + len(raw)
        self._path = path
        self._size = data_start + offset
        self._buffer = buffers.get(self._size)
        self._buffer[:data_start] = np.frombuffer(struct.pack("<Q", len(raw)) + raw, dtype=np.uint8)
        self._slots = {
            key: (dtype, tuple(shape), data_start + header[key]["data_offsets"][0]) for key, dtype, shape in entries
        }
        self._unfilled = set(self._slots)

    def slot(self, key: str) -> torch.Tensor:
        """The tensor's place in the shard (its dtype and shape), to be filled by the caller."""
        dtype, shape, offset = self._slots[key]
        self._unfilled.discard(key)
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset).view(shape)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self._slots:
            raise RuntimeError(f"shard writer: {key} is not in this shard")
        dtype, shape, _ = self._slots[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"shard writer: got {key} {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}"
            )
        self.slot(key).copy_(tensor.detach())

    def close(self) -> None:
        if self._unfilled:
            raise RuntimeError(f"shard writer: {len(self._unfilled)} tensors were never written")
        view = memoryview(self._buffer)[: self._size]
        with open(self._path, "wb", buffering=0) as f:
            while view:
                view = view[f.write(view) :]


class ShardBuffer:
    """The bytes of the shard being built, kept for the next one (grown when a shard is larger)."""

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def get(self, size: int) -> np.ndarray:
        if self._array is None or self._array.size < size:
            self._array = None  # release the smaller one first
            self._array = np.empty(size, dtype=np.uint8)
        return self._array
