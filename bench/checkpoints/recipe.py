"""A merge recipe in the shape mergekit users write (``merge_method``, ``base_model``, ``models``,
``parameters``), turned into a MergeRequest. Our own settings (``lambda``, ``vector_only``,
``include``, ``exclude``) go under ``parameters`` beside the method's; the rest are the method's.

    merge_method: negmerge
    base_model: sweep/theta0
    models:
      - model: sweep/lr1e-5
      - model: sweep/lr3e-5
    parameters: {threshold: 1.0, lambda: 0.8}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.checkpoints.merge import MergeRequest
from bench.errors import BenchError

TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "out")
OURS = {"lambda": "lam", "lam": "lam", "vector_only": "vector_only", "include": "include", "exclude": "exclude"}


def load_recipe(path: Path, out: Path | None, overwrite: bool) -> MergeRequest:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"--recipe {path}: not readable YAML ({exc})") from None
    if not isinstance(data, dict):
        raise BenchError(f"--recipe {path}: expected a mapping with {', '.join(TOP_LEVEL)}")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise BenchError(f"--recipe {path}: unknown field {unknown[0]!r}; known: {', '.join(TOP_LEVEL)}")
    for name in ("merge_method", "base_model", "models"):
        if not data.get(name):
            raise BenchError(f"--recipe {path}: {name} is required")
    models = [_model_path(path, i, m) for i, m in enumerate(data["models"])]
    params = dict(data.get("parameters") or {})
    ours: dict[str, Any] = {OURS[k]: params.pop(k) for k in list(params) if k in OURS}
    target = out or (Path(data["out"]) if data.get("out") else None)
    if target is None:
        raise BenchError(f"--recipe {path}: give --out OUT (or out: in the recipe)")
    for listed in ("include", "exclude"):
        value = ours.get(listed, [])
        ours[listed] = [value] if isinstance(value, str) else list(value)
    return MergeRequest(
        base=Path(data["base_model"]),
        candidates=models,
        method=str(data["merge_method"]),
        out=target,
        params=params,
        lam=None if ours.get("lam") is None else float(ours["lam"]),
        vector_only=bool(ours.get("vector_only", False)),
        include=ours["include"],
        exclude=ours["exclude"],
        overwrite=overwrite,
    )


def _model_path(path: Path, i: int, entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("model"), str):
        if entry.get("parameters"):
            raise BenchError(
                f"--recipe {path}: models[{i}] has per-model parameters; these merges treat every candidate "
                "alike, so give parameters once, at the top level"
            )
        return entry["model"]
    raise BenchError(f"--recipe {path}: models[{i}] must be a path or {{model: PATH}}")
