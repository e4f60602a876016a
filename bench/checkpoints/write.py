"""Write a checkpoint atomically: a single safetensors file, or a Hugging Face folder of shards.

Everything is staged beside the destination and renamed into place at the end, so an interrupted
write leaves the old output (or none), never a torn one. Shards are written one at a time as they
are computed, so the writer holds one shard in memory.
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
        return ShardWriter(target, entries)

    def copy_side_files(self, files: list[Path]) -> None:
        for file in files:
            shutil.copy2(file, self.stage / file.name)

    def write_sidecar(self, record: dict) -> None:
        self.sidecar_path(final=False).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")

    def commit(self, sharded: bool) -> Path:
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


_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


class ShardWriter:
    """One safetensors file written as its tensors are computed: the header is known up front (every
    key's dtype and shape), so the data follows tensor by tensor and no shard is ever held whole
    (safetensors' own save_file serialises the whole file in memory first)."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
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
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._pending = list(reversed(entries))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape = self._pending.pop()
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"shard writer: got {key} {tensor.dtype} {tuple(tensor.shape)}, expected {want_key}")
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"shard writer: {len(self._pending)} tensors were never written")
        self._file.close()
