"""Which code made a cache entry: the producing module and every project module it imports, found by
reading the imports (module level and inside functions), never by a hand-kept list that drifts.

Editing any file in that closure changes the digest, and so the keys of everything it produced.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from bench import numerics

PROJECT_PACKAGES = ("bench", "negmerge", "baselines")


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported anywhere in ``path`` (``module`` is its dotted name)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PROJECT_PACKAGES}


@functools.cache
def closure(*modules: str) -> tuple[Path, ...]:
    """The files of ``modules`` and of every project module they import, transitively (sorted)."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo += sorted(_imports(path, name) - seen.keys())
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # a package's __init__ runs on import too
    return tuple(sorted(set(seen.values())))


def digest(files: tuple[Path, ...], read: Callable[[Path], bytes] = Path.read_bytes, salt: str = "") -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(salt.encode())
    for f in files:
        h.update(str(f.resolve().relative_to(root) if f.resolve().is_relative_to(root) else f.name).encode())
        h.update(read(f))
    return h.hexdigest()[:12]


@functools.cache
def code_digest(*modules: str) -> str:
    """Digest of ``modules`` and their project imports, and of the CPU numerics mode (bench.numerics):
    part of the key of whatever they produce, so entries made with other kernels never mix."""
    return digest(closure(*modules), salt=numerics.tag())
