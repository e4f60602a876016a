"""Import a pickled PyTorch checkpoint, whole model or state dict, without running any code it names.

task_vectors, tangent task arithmetic and NegMerge save whole models (``torch.save(model)``). Loading
them normally imports the classes the pickle names (so it needs that exact open_clip version) and,
with ``weights_only=False``, runs whatever the pickle says. Here a restricted unpickler reads the torch
zip archive itself: every class the pickle names becomes an inert placeholder that only records the
state it is given, tensors are rebuilt from the archive's storages by our own code, and a module's
tensors are read from its state (``_parameters``, ``_buffers``, ``_modules``), as ``state_dict()``
would list them. The only real objects the pickle can reach are containers (OrderedDict, set) and
dtypes. A name from a module that can run code (``os.system``, ``builtins.eval``, ``subprocess``, ...)
is refused, as is a call to any unknown name whose arguments are not plain constants; a call with
constant arguments (how enums such as torchvision's InterpolationMode pickle) becomes an inert record
of the call, never executed.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bench.checkpoints.formats import NESTED_KEYS, file_sha256, state_dict_of
from bench.checkpoints.write import METADATA, refuse_existing
from bench.errors import BenchError
from negmerge.arithmetic import save_state

DENIED_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "importlib", "runpy", "shutil",
    "socket", "pickle", "_pickle", "marshal", "types", "code", "codeop", "ctypes", "io", "pty", "webbrowser",
    "operator", "functools", "pathlib", "tempfile", "multiprocessing", "threading", "signal", "platform",
    "asyncio", "http", "urllib", "requests", "pydoc", "inspect", "glob", "zipimport", "pkgutil", "site",
}  # fmt: skip
_PLAIN = (str, bytes, int, float, bool, complex, type(None))


class RefusedPickle(BenchError):
    """The pickle asks for something other than tensors and module state."""


class _Storage:
    """``torch.FloatStorage`` and kin, as named in a pickle: only their dtype is used."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


_STORAGES = {
    name: _Storage(name, dtype)
    for name, dtype in {
        "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
        "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
        "UntypedStorage": torch.uint8,
    }.items()
}  # fmt: skip


class _PlaceholderMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        """A REDUCE of an unknown name: an inert record if its arguments are constants, else refused."""
        if not all(_is_plain(a) for a in (*args, *kwargs.values())):
            raise RefusedPickle(
                f"the pickle calls {cls._origin}(...) with objects as arguments to build something; only "
                "tensors and module state are imported, so nothing was run"
            )
        record = cls.__new__(cls)
        record._call = (args, kwargs)
        return record


class Placeholder(metaclass=_PlaceholderMeta):
    """An instance of a class the pickle names: holds the state the pickle gives it, does nothing else."""

    _origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    @property
    def state(self) -> Any:
        state = self.__dict__.get("_state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = state[0]  # (dict, slots) form
        return state


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise RefusedPickle("the pickle rebuilds a tensor from something that is not one of its storages")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise RefusedPickle("the pickle makes a parameter of something that is not a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise RefusedPickle("the pickle rebuilds a tensor subclass with an unknown function")
    return func(*args)


def _reconstructor(cls, base, state) -> Any:
    """copyreg._reconstructor (protocol 0/1 objects): allowed only to make a placeholder."""
    if isinstance(cls, _PlaceholderMeta) and base is object and state is None:
        return object.__new__(cls)
    raise RefusedPickle(f"the pickle reconstructs {getattr(cls, '__name__', cls)!r} from {base!r}")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): lambda storage, offset, size, stride: _rebuild_tensor(storage, offset, size, stride),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch", "Size"): tuple,
}  # fmt: skip


_PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors from a torch zip archive's storages; every other name is a placeholder."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._placeholders: dict[tuple[str, str], type] = {}
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_NAMES.get(module, module)  # protocol 2 writes Python 2's names
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGES:
            return _STORAGES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in DENIED_MODULES:
            raise RefusedPickle(f"the pickle names {module}.{name}, which can run code; nothing was run")
        key = (module, name)
        if key not in self._placeholders:
            self._placeholders[key] = _PlaceholderMeta(
                name, (Placeholder,), {"__module__": module, "_origin": f"{module}.{name}"}
            )
        return self._placeholders[key]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise RefusedPickle(f"the pickle refers to an unknown persistent object {str(pid)[:80]}")
        _, storage, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise BenchError(f"the checkpoint's archive has no storage data/{key}: the file is damaged") from None
            self._storages[key] = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            )
        data = self._storages[key]
        if storage.dtype == torch.uint8:
            return data
        return data.view(storage.dtype) if data.numel() else torch.empty(0, dtype=storage.dtype)


def restricted_load(path: Path) -> Any:
    """The object a torch zip checkpoint holds, with placeholders for every class it names."""
    if not zipfile.is_zipfile(path):
        raise BenchError(
            f"{path}: not a torch zip archive (the format torch.save writes since PyTorch 1.6); re-save it with "
            "a current PyTorch, or give a safetensors file"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise BenchError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0].rsplit("/", 1)[0]
        if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder").strip() != b"little":
            raise BenchError(f"{path}: saved on a big-endian machine; convert it there")
        try:
            return RestrictedUnpickler(archive.read(pickles[0]), archive, prefix).load()
        except RefusedPickle as exc:
            raise RefusedPickle(f"{path}: refused: {exc}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as exc:
            raise BenchError(f"{path}: not a checkpoint this importer can read ({type(exc).__name__}: {exc})") from None


def module_state_dict(obj: Placeholder, prefix: str = "") -> dict[str, torch.Tensor]:
    """What ``state_dict()`` would return, read from a pickled module's recorded state."""
    state = obj.state
    out: dict[str, torch.Tensor] = {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise BenchError(f"{prefix}{name}: the pickle holds a {type(value).__name__} here, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not _is_module(child):
            raise BenchError(f"{prefix}{name}: the pickle holds a {type(child).__name__} here, not a module")
        out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def _is_module(obj: Any) -> bool:
    return isinstance(obj, Placeholder) and isinstance(obj.state, dict) and "_parameters" in obj.state


def tensors_of(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """A pickled module, a state dict, or either nested under one of NESTED_KEYS."""
    if _is_module(obj):
        return module_state_dict(obj)
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if _is_module(obj.get(key)):
                return module_state_dict(obj[key])
        return state_dict_of(obj, what)
    raise BenchError(
        f"{what}: holds a {getattr(type(obj), '_origin', type(obj).__name__)}, neither a module nor a state dict"
    )


def key_prefixes(keys: list[str]) -> list[tuple[str, int]]:
    """Keys grouped by their first part (``visual.*``), or their first two where they all share the
    first (``model.visual.*`` of task_vectors' ImageEncoder), with counts, in first-seen order."""
    depth = 2 if len({k.split(".")[0] for k in keys}) == 1 else 1
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        group = ".".join(parts[:depth]) + ".*" if len(parts) > depth else key
        groups[group] = groups.get(group, 0) + 1
    return list(groups.items())


def convert_checkpoint(src: Path, out: Path, strip_prefix: str = "", overwrite: bool = False) -> list[tuple[str, int]]:
    """``negmerge-bench convert``: write the checkpoint's tensors to one safetensors file."""
    if out.suffix != ".safetensors":
        raise BenchError(f"{out}: the output is a safetensors file; name it *.safetensors")
    refuse_existing(out, overwrite)
    if not src.is_file():
        raise BenchError(f"{src} does not exist")
    tensors = tensors_of(restricted_load(src), str(src))
    if strip_prefix:
        outside = [k for k in tensors if not k.startswith(strip_prefix)]
        if outside:
            raise BenchError(
                f"--strip-prefix {strip_prefix!r}: key {outside[0]!r} does not start with it; "
                f"prefixes found: {', '.join(p for p, _ in key_prefixes(list(tensors)))}"
            )
        tensors = {k[len(strip_prefix) :]: v for k, v in tensors.items()}
    metadata = {**METADATA, "converted_from": src.name, "source_sha256": file_sha256(src)}
    save_state({k: v.detach().clone().contiguous() for k, v in tensors.items()}, out, metadata=metadata)
    return key_prefixes(list(tensors))
