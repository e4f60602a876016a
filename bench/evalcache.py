"""Cached evaluation results: the lambda sweeps dominate a run's time, and they are a pure function
of (what was evaluated, on which data, with which code). Keyed by a hash of exactly that, so a rerun
with a cached pool is seconds, and any change to the inputs or to the evaluation code recomputes."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.codehash import code_digest
from bench.integrity import quarantine
from bench.io import write_json_atomic
from bench.locks import locked_compute


class EvalCache:
    def __init__(self, root: Path, context: dict[str, Any], code_modules: tuple[str, ...]) -> None:
        """``code_modules``: the modules that compute what is cached; they and everything they import
        (``bench.codehash``) are part of every key."""
        self.root = Path(root)
        self.context = context
        self.code = code_digest("bench.evalcache", "bench.metrics", "bench.selection", *code_modules)
        self.hits = 0
        self.misses = 0
        self.used: set[str] = set()  # entry keys read or written: the run's manifest lists them (cache gc)
        self._count = threading.Lock()  # entries may be finished on a background thread

    def _path(self, what: dict[str, Any]) -> Path:
        blob = json.dumps({"ctx": self.context, "what": what, "code": self.code}, sort_keys=True, default=str)
        return self.root / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"

    @staticmethod
    def _read(path: Path) -> tuple[Any] | None:
        if not path.is_file():
            return None
        try:
            return (json.loads(path.read_text())["value"],)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            quarantine([path], f"unreadable: {exc}")
            return None

    def peek(self, what: dict[str, Any]) -> tuple[Any] | None:
        """``(value,)`` when the entry exists, else None; no lock, nothing counted: a caller that
        finds nothing prepares the inputs of ``compute`` and then calls ``get_or_compute``."""
        return self._read(self._path(what))

    def get_or_compute(self, what: dict[str, Any], compute: Callable[[], Any]) -> Any:
        path = self._path(what)

        def lookup() -> tuple[Any] | None:
            return self._read(path)

        def fresh() -> tuple[Any]:
            value = compute()
            write_json_atomic(path, {"what": what, "value": value})
            return (value,)

        (value,), computed = locked_compute(path, lookup, fresh)
        with self._count:
            self.used.add(path.stem)
            if computed:
                self.misses += 1
            else:
                self.hits += 1
        return value


def merge_code_hash(method: str) -> str:
    """Digest of a merge's code (its module and every project module it imports: the streaming engine,
    the sources, TIES's top-k cut), or "" for a name that is not a registered merge: editing a merge
    must not let stale cached evaluations through."""
    from baselines import MERGES

    if method not in MERGES:
        return ""
    return code_digest(MERGES[method].__module__)


def vector_id(method: str, params: dict[str, Any], member_keys: list[str]) -> str:
    """Identity of a merged vector: the merge (name and code), its parameters and the members it merged."""
    blob = json.dumps([method, merge_code_hash(method), params, sorted(member_keys)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
