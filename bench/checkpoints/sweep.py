"""A candidate pool from a user's sweep on disk (``pool: {from: ..., theta0: ...}``).

Each candidate is a checkpoint in any format ``bench.checkpoints.formats`` reads. Its keys are mapped
onto the protocol's model by the one prefix that makes them the model's keys (none, ``visual.``,
``model.visual.`` of task_vectors' ImageEncoder, ...), checked against the model's shapes at load,
and turned into the task vector ``theta_i - theta_0`` in float32. The path may hold ``{dataset}`` and
``{seed}``, filled per pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.checkpoints.formats import Checkpoint, file_sha256, open_checkpoint
from bench.checkpoints.merge import expand_candidates
from bench.errors import BenchError


@dataclass
class DiskCandidate:
    path: Path
    files: list[dict[str, str]]  # each weight file and its sha256 (the pool key and the manifest hold them)
    checkpoint: Checkpoint
    prefix: str


def fill(template: str, dataset: str, seed: int) -> str:
    return template.replace("{dataset}", dataset).replace("{seed}", str(seed))


def key_prefix(ck: Checkpoint, reference: Mapping[str, torch.Tensor], what: str) -> str:
    """The prefix that maps ``ck``'s keys onto ``reference``'s; the first mismatch is the error."""
    keys = set(ck.keys())
    first = next(iter(reference))
    prefixes = sorted({k[: -len(first)] for k in keys if k.endswith(first)}, key=len)
    for prefix in prefixes:
        if all(prefix + k in keys for k in reference):
            for k, ref in reference.items():
                if tuple(ck.source.shape(prefix + k)) != tuple(ref.shape):
                    raise BenchError(
                        f"{what} {ck.key_files[prefix + k]}: key {prefix + k!r} has shape "
                        f"{list(ck.source.shape(prefix + k))}, the protocol's model {list(ref.shape)}; the sweep "
                        "must fine-tune the suite's backbone"
                    )
            return prefix
    prefix = prefixes[0] if prefixes else ""
    missing = next(k for k in reference if prefix + k not in keys)
    raise BenchError(
        f"{what} {ck.path}: no key {prefix + missing!r} for the model's {missing!r}; the checkpoint must hold the "
        f"backbone's image encoder (keys like {first!r}, optionally under one prefix such as 'model.visual.'); "
        "convert pickled models with `negmerge-bench convert` first"
    )


def _tensors(ck: Checkpoint, prefix: str, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: ck.source.get(prefix + k) for k in reference}


def open_sweep(
    pattern: str, theta0: str, dataset: str, seed: int, reference: Mapping[str, torch.Tensor]
) -> tuple[DiskCandidate, list[DiskCandidate]]:
    """theta_0 and the candidates of one pool, opened and checked, nothing loaded yet."""
    base_path = Path(fill(theta0, dataset, seed))
    base_ck = open_checkpoint(base_path, "pool.theta0")
    base = DiskCandidate(base_path, _hashes(base_ck), base_ck, key_prefix(base_ck, reference, "pool.theta0"))
    paths = expand_candidates([fill(pattern, dataset, seed)], base_path)
    cands = []
    for i, path in enumerate(paths):
        ck = open_checkpoint(path, f"pool.from candidate {i}")
        cands.append(DiskCandidate(path, _hashes(ck), ck, key_prefix(ck, reference, f"pool.from candidate {i}")))
    return base, cands


def task_vector_of(cand: DiskCandidate, base: DiskCandidate, reference: Mapping[str, torch.Tensor]) -> dict:
    """``theta_i - theta_0`` in float32 over the model's floating tensors."""
    mine, theirs = _tensors(cand.checkpoint, cand.prefix, reference), _tensors(base.checkpoint, base.prefix, reference)
    return {
        k: mine[k].to(torch.float32) - theirs[k].to(torch.float32)
        for k in reference
        if reference[k].is_floating_point()
    }


def theta0_difference(base: DiskCandidate, reference: Mapping[str, torch.Tensor]) -> float:
    """Largest |theta_0 from disk - the protocol's theta_0| (0 when the sweep started from the same weights)."""
    theirs = _tensors(base.checkpoint, base.prefix, reference)
    return max(
        float((theirs[k].to(torch.float32) - v.to(torch.float32)).abs().max()) if v.numel() else 0.0
        for k, v in reference.items()
        if v.is_floating_point()
    )


def _hashes(ck: Checkpoint) -> list[dict[str, str]]:
    return [{"file": str(p), "sha256": file_sha256(p)} for p in ck.weight_files()]


def pool_from_disk(pool, rec, pattern: str, theta0: str, dataset: str, seed: int, reference, spec: dict) -> list:
    """Both protocols' ``pool.from``: each candidate's task vector as a pool entry (cached under the
    files' hashes and ``spec``, the protocol's identity of theta_0), recorded in the manifest with
    its files and hashes. ``reference``: the protocol's theta_0 over the tensors a task vector covers."""
    base, cands = open_sweep(pattern, theta0, dataset, seed, reference)
    drift = theta0_difference(base, reference)
    if drift > 0:
        rec.note(
            f"pool.theta0 {base.path} differs from the protocol's theta_0 by up to {drift:.3g}; its task vectors "
            "are applied to the protocol's"
        )
    entries = []
    for cand in cands:
        key_spec = {
            **spec,
            "from": cand.files,
            "theta0": base.files,
            "prefixes": [cand.prefix, base.prefix],
            "params": {"file": cand.path.name},  # what labels the candidate's curve
        }
        entry = pool.get_or_create(key_spec, lambda cand=cand: task_vector_of(cand, base, reference))
        # its fine-tune ran elsewhere, at a cost nobody recorded: unknown, not zero (bench.cost)
        entry = dataclasses.replace(entry, samples=None)
        rec.pool_member(entry, "from-disk", cand.path.name)
        entries.append(entry)
    return entries
