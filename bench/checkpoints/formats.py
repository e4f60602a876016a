"""One reader for every checkpoint layout a sweep comes in, as a TensorSource with its files.

Layouts: a ``.safetensors`` file; a Hugging Face folder (``model.safetensors`` or shards listed by
``model.safetensors.index.json``, or the same for ``pytorch_model.bin``); a PyTorch state-dict file
(``.bin``, ``.pt``, ``.pth``, ``.ckpt``) loaded with ``torch.load(weights_only=True)``, memory-mapped
where the file allows, including open_clip checkpoints that nest the weights under ``state_dict``.
Safetensors are memory maps (negmerge.sources), so opening K checkpoints costs no memory.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from bench.errors import BenchError
from negmerge.errors import MergeInputError
from negmerge.sources import VIEWABLE_DTYPES, DictSource, SafetensorsSource, TensorSource

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # open_clip and common trainers nest weights here

# what a safetensors header may name: the dtypes the engine can view, and float8 (copied, never merged)
_ST_DTYPES = {**VIEWABLE_DTYPES, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class ShardedSource:
    """Several weight files seen as one checkpoint: each key is read from the shard that holds it."""

    def __init__(self, name: str, shards: Mapping[str, TensorSource], weight_map: Mapping[str, str]) -> None:
        self.name = name
        self._shards = dict(shards)
        self._where = dict(weight_map)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shards[self._where[key]].shape(key)

    def is_floating(self, key: str) -> bool:
        return self._shards[self._where[key]].is_floating(key)

    def get(self, key: str) -> torch.Tensor:
        return self._shards[self._where[key]].get(key)


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensors, the file each key lives in, and the files around them."""

    path: Path
    source: TensorSource
    key_files: dict[str, Path]  # key -> the weight file holding it
    dtypes: dict[str, torch.dtype]
    shard_names: dict[str, str] | None = None  # key -> shard file name (sharded folders only)
    extra_files: list[Path] = field(default_factory=list)  # config, tokenizer, generation files

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def weight_files(self) -> list[Path]:
        return sorted(set(self.key_files.values()))

    def keys(self) -> list[str]:
        return self.source.keys()


def open_checkpoint(path: str | Path, what: str = "checkpoint") -> Checkpoint:
    """Open ``path`` in whichever layout it has; a path that is none of them is one clear error."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, what)
    if not path.is_file():
        raise BenchError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        source = _safetensors(path, what)
        return Checkpoint(path, source, dict.fromkeys(source.keys(), path), _st_dtypes(path, what))
    if path.suffix in TORCH_SUFFIXES:
        tensors = load_state_dict(path, what)
        source = DictSource(tensors, name=str(path))
        return Checkpoint(path, source, dict.fromkeys(tensors, path), {k: v.dtype for k, v in tensors.items()})
    raise BenchError(
        f"{what} {path}: unknown format {path.suffix or '(no suffix)'}; give a .safetensors file, a "
        f"{'/'.join(TORCH_SUFFIXES)} state dict, or a Hugging Face model folder"
    )


def _open_folder(path: Path, what: str) -> Checkpoint:
    extras = [p for p in sorted(path.iterdir()) if p.is_file() and not _is_weight_file(p)]
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index_path = path / index_name
        if index_path.is_file():
            return _open_sharded(path, index_path, what, extras)
    for single in SINGLE_FILES:
        if (path / single).is_file():
            ck = open_checkpoint(path / single, what)
            ck.path, ck.extra_files = path, extras
            ck.shard_names = dict.fromkeys(ck.keys(), _safetensors_name(single))
            return ck
    raise BenchError(
        f"{what} {path}: a folder without {SAFETENSORS_INDEX}, {TORCH_INDEX} or {' / '.join(SINGLE_FILES)}; "
        "point at the weight file itself, or at a Hugging Face model folder"
    )


def _open_sharded(path: Path, index_path: Path, what: str, extras: list[Path]) -> Checkpoint:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is empty")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{what} {index_path}: not a valid index ({exc}); it needs a weight_map") from None
    shards: dict[str, TensorSource] = {}
    dtypes: dict[str, torch.dtype] = {}
    for name in dict.fromkeys(weight_map.values()):
        file = path / name
        if not file.is_file():
            raise BenchError(f"{what} {index_path}: shard {name} is listed but missing from {path}")
        if file.suffix == ".safetensors":
            shards[name] = _safetensors(file, what)
            dtypes.update(_st_dtypes(file, what))
        else:
            tensors = load_state_dict(file, what)
            shards[name] = DictSource(tensors, name=str(file))
            dtypes.update({k: v.dtype for k, v in tensors.items()})
    for key, name in weight_map.items():
        if key not in shards[name].keys():
            raise BenchError(f"{what} {index_path}: key {key!r} is listed in {name} but not stored there")
    source = ShardedSource(str(path), shards, weight_map)
    key_files = {k: path / n for k, n in weight_map.items()}
    names = {k: _safetensors_name(n) for k, n in weight_map.items()}
    return Checkpoint(path, source, key_files, {k: dtypes[k] for k in weight_map}, names, extras)


def _safetensors_name(name: str) -> str:
    """The output shard name for an input shard: torch shards become safetensors shards."""
    if name.endswith(".safetensors"):
        return name
    return name.replace("pytorch_model", "model").rsplit(".", 1)[0] + ".safetensors"


def _is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name in (SAFETENSORS_INDEX, TORCH_INDEX)


def _safetensors(path: Path, what: str) -> SafetensorsSource:
    try:
        return SafetensorsSource(path)
    except MergeInputError as exc:
        raise BenchError(f"{what}: {exc}") from None


def _st_dtypes(path: Path, what: str) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        out = {}
        for key in f.keys():
            name = f.get_slice(key).get_dtype()
            if name not in _ST_DTYPES:
                raise BenchError(f"{what} {path}: key {key!r} has dtype {name}, which torch cannot hold")
            out[key] = _ST_DTYPES[name]
        return out


def load_state_dict(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A PyTorch state-dict file, loaded with ``weights_only=True`` (memory-mapped where the file is a
    zip archive), unwrapped from open_clip's ``{"state_dict": ...}`` and DDP's ``module.`` prefix."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(
            f"{what} {path} is not a plain state dict ({first[:160]}); if it is a pickled whole model, "
            f"import it first: negmerge-bench convert {path} OUT.safetensors"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise BenchError(f"{what} {path}: not a readable PyTorch file ({exc})") from None
    return state_dict_of(obj, f"{what} {path}")


def state_dict_of(obj: object, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object: a flat state dict, possibly nested one level."""
    if isinstance(obj, Mapping):
        for nested in NESTED_KEYS:
            inner = obj.get(nested)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise BenchError(f"{what}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BenchError(
            f"{what}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor; "
            f"nest the weights under one of {', '.join(NESTED_KEYS)} or save the state dict alone"
        )
    tensors = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
