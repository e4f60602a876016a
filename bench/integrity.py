"""Damaged cache entries are set aside and recomputed, never trusted and never fatal.

Writes are atomic, so a damaged entry means the disk or a person changed it afterwards (a truncated
copy, a full disk during an rsync, a bit flip). Every read checks what is cheap (a record parses, a
tensor file has its recorded size and a valid safetensors header, an array has its shape); the
content hashes recorded beside pool entries and trained models are checked by
``negmerge-bench cache verify``. A damaged entry moves to ``CACHE/quarantine/`` with a warning naming
it, and the caller recomputes it.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_problem(path: Path, size: int | None = None) -> str | None:
    """Why a safetensors file cannot be trusted (missing, wrong size, unreadable header), or None."""
    from safetensors import safe_open

    if not path.is_file():
        return "its tensor file is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{path.name} has {actual} bytes, its record says {size}"
    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header against the file length
            f.keys()
    except Exception as exc:
        return f"{path.name} is unreadable ({type(exc).__name__}: {exc})"
    return None


def intact_safetensors(path: Path, size: int | None = None, with_files: tuple[Path, ...] = ()) -> bool:
    """True if ``path`` can be trusted; else it (and ``with_files``, the rest of its entry) is
    quarantined and the caller recomputes."""
    problem = safetensors_problem(path, size)
    if problem:
        quarantine([*with_files, path], problem)
    return problem is None


def quarantine(paths: list[Path], reason: str) -> Path:
    """Move an entry's files to CACHE/quarantine/KIND/ (beside the entry's own folder) and warn."""
    paths = [Path(p) for p in paths]
    kind_dir = paths[0].parent
    dest = kind_dir.parent / "quarantine" / kind_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for p in paths:
        if p.exists():
            p.replace(dest / f"{p.name}.{stamp}")
    warnings.warn(
        f"cache entry {paths[0].with_suffix('')} is damaged ({reason}); moved to {dest} and recomputing",
        stacklevel=3,
    )
    return dest


def verify_cache(root: Path, repair: bool = False) -> tuple[int, list[dict[str, str]]]:
    """Check every entry of a cache, content hashes included. Returns (entries checked, problems);
    ``repair`` quarantines each damaged entry (the next run recomputes it)."""
    import json

    import numpy as np

    root = Path(root)
    checked, problems = 0, []

    def bad(paths: list[Path], reason: str) -> None:
        problems.append({"entry": str(paths[0].relative_to(root)), "problem": reason})
        if repair:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quarantine(paths, reason)

    for kind in ("pool", "classic-pool", "classic-models"):
        for record_path in sorted((root / kind).glob("*.json")):
            checked += 1
            tensor = record_path.with_suffix(".safetensors")
            try:
                record = json.loads(record_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                bad([record_path, tensor], f"record unreadable: {exc}")
                continue
            if record.get("status") != "ok":
                continue
            problem = safetensors_problem(tensor, record.get("size"))
            if problem is None and record.get("sha256") and file_digest(tensor) != record["sha256"]:
                problem = f"{tensor.name}'s content hash differs from its record"
            if problem:
                bad([record_path, tensor], problem)
    for path in sorted((root / "evals").glob("*.json")):
        checked += 1
        try:
            json.loads(path.read_text())["value"]  # noqa: B018
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            bad([path], f"unreadable: {exc}")
    for kind in ("heads", "backbones"):
        for path in sorted((root / kind).glob("*.safetensors")):
            checked += 1
            problem = safetensors_problem(path)
            if problem:
                bad([path], problem)
    for path in sorted((root / "preprocessed").glob("*.npy")):
        checked += 1
        try:
            np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            bad([path], f"unreadable: {exc}")
    return checked, problems
