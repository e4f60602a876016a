"""The candidate pool: fine-tuned task vectors on disk, content-addressed, shared by every method.

A candidate's key hashes everything that produced it (backbone weights id, dataset and split spec,
hyperparameters, direction, fine-tuning code version), so a rerun recomputes nothing, a changed
setting never reuses a stale vector, and an interrupted run resumes at the first missing candidate.
Each entry is ``<key>.safetensors`` (the task vector) written before ``<key>.json`` (its record);
only an entry with both counts as done. Diverged candidates are recorded as failed and skipped.
Entries are computed under a per-entry lock (``bench.locks``): processes sharing the cache compute
each candidate once, and every record says which process (host:pid) computed it.
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

from bench.codehash import code_digest
from bench.cost import metered
from bench.finetune import Diverged
from bench.integrity import file_digest, intact_safetensors, quarantine
from bench.io import write_json_atomic
from bench.locks import locked_compute, worker_id
from negmerge import save_state


@dataclass
class PoolEntry:
    key: str
    spec: dict[str, Any]
    status: str  # "ok" or "failed"
    path: Path | None
    seconds: float
    cached: bool
    error: str = ""
    computed_by: str = ""
    samples: int | None = None  # training samples its making processed (bench.cost); None: not counted


class CandidatePool:
    def __init__(self, root: Path, version: str | None = None) -> None:
        """``version``: digest of the code that makes the entries (default: Protocol A's fine-tuning,
        ``bench.finetune`` and everything it imports)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.version = version or code_digest("bench.finetune")

    def key(self, spec: dict[str, Any]) -> str:
        blob = json.dumps({**spec, "code_version": self.version}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def has(self, spec: dict[str, Any]) -> bool:
        """Whether the entry of ``spec`` is made (ok or failed), without making it."""
        return self._lookup(self.key(spec), spec) is not None

    def _lookup(self, key: str, spec: dict[str, Any]) -> PoolEntry | None:
        tensor_path, record_path = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            status = record["status"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            quarantine([record_path, tensor_path], f"its record is unreadable: {exc}")
            return None
        if status == "ok" and not intact_safetensors(tensor_path, record.get("size"), with_files=(record_path,)):
            return None
        if status == "failed" or tensor_path.is_file():
            path = tensor_path if status == "ok" else None
            return PoolEntry(
                key,
                spec,
                record["status"],
                path,
                record["seconds"],
                True,
                record.get("error", ""),
                record.get("computed_by", ""),
                record.get("train_samples"),
            )
        return None

    def get_or_create(self, spec: dict[str, Any], make: Callable[[], dict[str, torch.Tensor]]) -> PoolEntry:
        key = self.key(spec)
        tensor_path, record_path = self.root / f"{key}.safetensors", self.root / f"{key}.json"

        def compute() -> PoolEntry:
            me = worker_id()
            start = time.perf_counter()
            try:
                with metered() as samples:
                    tau = make()
            except Diverged as exc:
                seconds = time.perf_counter() - start
                warnings.warn(f"candidate {key} diverged and is excluded: {exc}", stacklevel=4)
                record = {
                    "spec": spec,
                    "status": "failed",
                    "seconds": seconds,
                    "error": str(exc),
                    "computed_by": me,
                    "train_samples": samples[0],  # a diverged run's training was spent all the same
                }
                write_json_atomic(record_path, record)
                return PoolEntry(key, spec, "failed", None, seconds, False, str(exc), me, samples[0])
            seconds = time.perf_counter() - start
            save_state(tau, tensor_path, metadata={"key": key})
            record = {
                "spec": spec,
                "status": "ok",
                "seconds": seconds,
                "code_version": self.version,
                "computed_by": me,
                "train_samples": samples[0],  # what it cost when made (bench.cost), read back on every hit
                "size": tensor_path.stat().st_size,  # checked on every read
                "sha256": file_digest(tensor_path),  # checked by `negmerge-bench cache verify`
            }
            write_json_atomic(record_path, record)
            return PoolEntry(key, spec, "ok", tensor_path, seconds, False, computed_by=me, samples=samples[0])

        return locked_compute(record_path, lambda: self._lookup(key, spec), compute)[0]
