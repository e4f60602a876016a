"""The candidate pool: fine-tuned task vectors on disk, content-addressed, shared by every method.

A candidate's key hashes everything that produced it (backbone weights id, dataset and split spec,
hyperparameters, direction, fine-tuning code version), so a rerun recomputes nothing, a changed
setting never reuses a stale vector, and an interrupted run resumes at the first missing candidate.
Each entry is ``<key>.safetensors`` (the task vector) written before ``<key>.json`` (its record);
only an entry with both counts as done. Diverged candidates are recorded as failed and skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.finetune import Diverged
from bench.io import write_json_atomic
from negmerge import save_state


def code_version(module_file: str) -> str:
    """Hash of the training code: editing it invalidates what it produced, and nothing else."""
    return hashlib.sha256((Path(__file__).parent / module_file).read_bytes()).hexdigest()[:12]


CODE_VERSION = code_version("finetune.py")


@dataclass
class PoolEntry:
    key: str
    spec: dict[str, Any]
    status: str  # "ok" or "failed"
    path: Path | None
    seconds: float
    cached: bool
    error: str = ""


class CandidatePool:
    def __init__(self, root: Path, version: str = CODE_VERSION) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.version = version

    def key(self, spec: dict[str, Any]) -> str:
        blob = json.dumps({**spec, "code_version": self.version}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def get_or_create(self, spec: dict[str, Any], make: Callable[[], dict[str, torch.Tensor]]) -> PoolEntry:
        key = self.key(spec)
        tensor_path, record_path = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record["status"] == "failed" or tensor_path.is_file():
                path = tensor_path if record["status"] == "ok" else None
                return PoolEntry(key, spec, record["status"], path, record["seconds"], True, record.get("error", ""))
        start = time.perf_counter()
        try:
            tau = make()
        except Diverged as exc:
            seconds = time.perf_counter() - start
            warnings.warn(f"candidate {key} diverged and is excluded: {exc}", stacklevel=2)
            write_json_atomic(record_path, {"spec": spec, "status": "failed", "seconds": seconds, "error": str(exc)})
            return PoolEntry(key, spec, "failed", None, seconds, False, str(exc))
        seconds = time.perf_counter() - start
        save_state(tau, tensor_path, metadata={"key": key})
        write_json_atomic(record_path, {"spec": spec, "status": "ok", "seconds": seconds, "code_version": self.version})
        return PoolEntry(key, spec, "ok", tensor_path, seconds, False)
