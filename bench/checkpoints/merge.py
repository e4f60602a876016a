"""``negmerge-bench merge``: any registered merge over checkpoints a user already has.

Task vectors are never materialised: each candidate is a DifferenceSource (theta_i - theta_0 formed
chunk by chunk from memory maps) and the merge engine streams them. An elementwise merge runs once per
output shard (memory: one shard plus the engine's chunks); a merge with a global pass (TIES) runs
once over every selected tensor. Everything is validated before anything is written.
"""

from __future__ import annotations

import fnmatch
import glob
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baselines.registry import all_methods, get_method
from bench.checkpoints.arith import theta_from
from bench.checkpoints.formats import SINGLE_FILES, WEIGHT_SUFFIXES, Checkpoint, file_sha256, open_checkpoint
from bench.checkpoints.fused import FusedMerger, can_fuse, fused_rule
from bench.checkpoints.write import StagedOutput, refuse_existing
from bench.errors import BenchError
from negmerge.errors import MergeInputError
from negmerge.sources import DifferenceSource

SIDECAR_VERSION = 1


@dataclass
class MergeRequest:
    base: Path
    candidates: list[str]
    method: str
    out: Path
    params: dict[str, Any] = field(default_factory=dict)
    lam: float | None = None
    vector_only: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overwrite: bool = False
    hash_inputs: bool = True  # sha256 of every input file in the sidecar (a second read of each byte)
    fused: bool = True  # the one-pass kernel where the merge has one (bench.checkpoints.fused); False: the engine


def expand_candidates(items: list[str], base: Path) -> list[Path]:
    """Each item is a checkpoint, a glob, or a folder of checkpoints (a folder that is itself a Hugging
    Face model is one checkpoint); the base is left out wherever it turns up."""
    found: list[Path] = []
    for item in items:
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item))
            if not matches:
                raise BenchError(f"--candidates: {item!r} matches no file")
            found += matches
        elif Path(item).is_dir() and not _is_model_folder(Path(item)):
            inner = sorted(p for p in Path(item).iterdir() if _is_model_folder(p) or p.suffix in WEIGHT_SUFFIXES)
            if not inner:
                raise BenchError(f"--candidates: folder {item} holds no checkpoint (weight files or model folders)")
            found += inner
        else:
            found.append(Path(item))
    base_resolved = base.resolve()
    found = [p for p in dict.fromkeys(found) if p.resolve() != base_resolved]
    if not found:
        raise BenchError("--candidates: no candidate checkpoints given (the base alone is no sweep)")
    return found


def _is_model_folder(path: Path) -> bool:
    names = (*SINGLE_FILES, "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return path.is_dir() and any((path / n).is_file() for n in names)


def check_same_layout(base: Checkpoint, cand: Checkpoint, what: str) -> None:
    """The first key a candidate lacks, adds, or holds with another shape or dtype, with its file."""
    cand_keys = set(cand.keys())
    for key in base.keys():
        if key not in cand_keys:
            raise BenchError(f"{what} {cand.path}: key {key!r} is missing (the base has it in {base.key_files[key]})")
    base_keys = set(base.keys())
    for key in cand.keys():
        if key not in base_keys:
            raise BenchError(f"{what} {cand.key_files[key]}: unexpected key {key!r} (the base has no such tensor)")
    for key in base.keys():
        if cand.source.shape(key) != base.source.shape(key):
            raise BenchError(
                f"{what} {cand.key_files[key]}: key {key!r} has shape {list(cand.source.shape(key))}, "
                f"the base {list(base.source.shape(key))}"
            )
        if cand.dtypes[key] != base.dtypes[key]:
            raise BenchError(
                f"{what} {cand.key_files[key]}: key {key!r} is {cand.dtypes[key]}, the base {base.dtypes[key]}; "
                "save every checkpoint of the sweep in one dtype"
            )


def selected_keys(base: Checkpoint, include: list[str], exclude: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(merged, floating left out by --include/--exclude, non-floating) keys, in the base's order."""
    merged, left_out, non_float = [], [], []
    for key in base.keys():
        if not base.dtypes[key].is_floating_point:
            non_float.append(key)
        elif (include and not any(fnmatch.fnmatchcase(key, g) for g in include)) or any(
            fnmatch.fnmatchcase(key, g) for g in exclude
        ):
            left_out.append(key)
        else:
            merged.append(key)
    if not merged:
        raise BenchError("--include/--exclude leave no floating-point tensor to merge; check the globs")
    return merged, left_out, non_float


def _method(request: MergeRequest):
    try:
        method = get_method(request.method)
    except KeyError as exc:
        raise BenchError(f"--method: {exc.args[0]}") from None
    if method.kind != "merge":
        merges = ", ".join(m.name for m in all_methods("merge"))
        raise BenchError(f"--method {method.name} is a {method.kind} method, not a merge; merges: {merges}")
    try:
        method.check_params(request.params)
    except ValueError as exc:
        raise BenchError(f"--set: {exc}") from None
    return method


def _check_lam(request: MergeRequest) -> None:
    if request.vector_only and request.lam is not None:
        raise BenchError("--lam and --vector-only exclude each other: a vector has no lambda applied")
    if not request.vector_only:
        if request.lam is None:
            raise BenchError("--lam L is needed (theta_0 - L * merged), or --vector-only for the merged vector")
        if not math.isfinite(request.lam):
            raise BenchError(f"--lam must be a finite number, got {request.lam}")


def run_merge(request: MergeRequest, log=print) -> dict[str, Any]:
    """Validate everything, then merge shard by shard into a staged output; returns the sidecar."""
    method = _method(request)
    _check_lam(request)
    refuse_existing(request.out, request.overwrite)
    base = open_checkpoint(request.base, "--base")
    paths = expand_candidates(request.candidates, Path(request.base))
    cands = [open_checkpoint(p, f"candidate {i}") for i, p in enumerate(paths)]
    for i, cand in enumerate(cands):
        check_same_layout(base, cand, f"candidate {i}")
    merged_keys, left_out, non_float = selected_keys(base, request.include, request.exclude)
    folder = base.is_folder
    if not folder and request.out.suffix != ".safetensors":
        raise BenchError(f"--out {request.out}: the base is one file, so the output is one; name it *.safetensors")
    shards = _shard_plan(base, folder)
    log(f"merging {len(cands)} candidates with {method.name} into {len(shards)} shard(s) -> {request.out}")

    hashing = ThreadPoolExecutor(1)  # hashes read the files beside the merge, not after it
    hash_file = file_sha256 if request.hash_inputs else lambda p: None
    provenance = hashing.submit(_provenance)  # git and package metadata: 1-2 s, beside the merge too
    hashes = {p: hashing.submit(hash_file, p) for ck in (base, *cands) for p in ck.weight_files()}
    stage = StagedOutput(request.out, folder, request.overwrite)
    try:
        rates = _merge_into(stage, base, cands, method, request, shards, merged_keys)
        record = _sidecar(request, method, base, cands, hashes, rates, left_out, non_float, provenance.result())
        if folder:
            stage.copy_side_files(base.extra_files)
        stage.write_sidecar(record)
        stage.commit(sharded=folder and len(shards) > 1)
    except MergeInputError as exc:
        stage.abort()
        raise BenchError(f"merge {method.name}: {exc}") from None
    except BaseException:
        stage.abort()
        raise
    finally:
        hashing.shutdown(wait=True)
    return record


def _shard_plan(base: Checkpoint, folder: bool) -> dict[str, list[str]]:
    """Output shard name -> its keys: the base's own sharding (a single file: one shard)."""
    if not folder:
        return {"": base.keys()}
    plan: dict[str, list[str]] = {}
    for key in base.keys():
        plan.setdefault(base.shard_names[key], []).append(key)
    return dict(sorted(plan.items()))


def _merge_into(stage, base, cands, method, request, shards, merged_keys) -> dict[str, tuple[int, int]]:
    """Merge and write every shard, tensor by tensor; returns key -> (kept, total) elements of the
    merged vector. An elementwise merge runs one key at a time (the same bits as all keys at once),
    so memory holds one tensor's merged values, not a model's; with a fused rule (bench.checkpoints
    .fused) it writes straight into the shard's buffer and holds nothing else."""
    wanted = set(merged_keys)

    def differences(keys: list[str]) -> list[DifferenceSource]:
        return [DifferenceSource(c.source, base.source, name=str(c.path), keys=keys) for c in cands]

    def merge_keys(keys: list[str]) -> dict[str, torch.Tensor]:
        return method.merge(differences(keys), **request.params)

    rule = None
    if method.elementwise and request.fused:
        rule = fused_rule(method.merge, method.resolved(request.params), len(cands))
    coef = None if request.vector_only else -float(request.lam)
    merger = FusedMerger(rule, coef, differences(merged_keys)) if rule is not None else None
    whole = None if method.elementwise else merge_keys(merged_keys)  # a global pass needs every key at once
    rates: dict[str, tuple[int, int]] = {}
    try:
        for name, keys in shards.items():
            written = [k for k in keys if k in wanted or not request.vector_only]
            if not written:
                continue
            writer = stage.open_shard(
                name or request.out.name, [(k, base.dtypes[k], base.source.shape(k)) for k in written]
            )
            for key in written:
                if key not in wanted:
                    writer.write(key, base.source.get(key))  # integer buffers and excluded tensors: theta_0's
                elif merger is not None and can_fuse(base.dtypes[key]):
                    slot = writer.slot(key)
                    kept = merger.merge(key, base.source.get(key), [c.source.get(key) for c in cands], slot)
                    rates[key] = (kept, slot.numel())
                else:
                    merged = merge_keys([key])[key] if whole is None else whole.pop(key)
                    rates[key] = (int(torch.count_nonzero(merged)), merged.numel())
                    if request.vector_only:
                        writer.write(key, merged.to(base.dtypes[key]))
                    else:
                        writer.write(key, theta_from(base.source.get(key), merged, coef))
                    del merged
            writer.close()
    finally:
        if merger is not None:
            merger.close()
    return rates


def _provenance() -> dict[str, Any]:
    from bench.results import git_commit, package_versions

    return {
        "package_version": package_versions().get("negmerge-bench"),
        "git": git_commit(Path(__file__).resolve().parents[2]),
    }


def _sidecar(request, method, base, cands, hashes, rates, left_out, non_float, provenance) -> dict[str, Any]:
    def files(ck: Checkpoint) -> list[dict[str, str]]:
        return [{"file": str(p), "bytes": p.stat().st_size, "sha256": hashes[p].result()} for p in ck.weight_files()]

    kept = sum(k for k, _ in rates.values())
    total = sum(n for _, n in rates.values())
    return {
        "sidecar_version": SIDECAR_VERSION,
        "method": method.name,
        "params": method.resolved(request.params),
        "output": "vector" if request.vector_only else "theta_0 - lam * merged",
        "lam": request.lam,
        "base": {"path": str(base.path), "files": files(base)},
        "candidates": [{"path": str(c.path), "files": files(c)} for c in cands],
        "consensus_rate": {
            "overall": kept / total if total else None,
            "per_tensor": {k: r[0] / r[1] for k, r in rates.items()},
        },
        "include": request.include,
        "exclude": request.exclude,
        "not_merged": {
            "excluded": left_out,  # by --include / --exclude
            "non_floating": non_float,  # integer buffers, position ids: never merged
            "handling": "left out of the vector" if request.vector_only else "copied from theta_0",
        },
        **provenance,
    }
