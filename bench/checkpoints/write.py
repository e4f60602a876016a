"""Write a checkpoint atomically: a single safetensors file, or a Hugging Face folder of shards.

Everything is staged beside the destination and renamed into place at the end, so an interrupted
write leaves the old output (or none), never a torn one. Shards are written one at a time as they
are computed, so the writer holds one shard in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

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

    def add_shard(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        target = self.stage / (name if self.folder else self.out.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=METADATA)
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

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
