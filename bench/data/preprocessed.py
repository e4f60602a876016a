"""Evaluation inputs decoded once: a file-backed split, run through the backbone's deterministic
evaluation preprocessing up to (not including) the float conversion, stored as a uint8 tensor on disk
and memory-mapped back.

A lambda sweep evaluates the same Val images 20+ times per vector; decoding JPEGs and resizing them
each time would cost more than the forward passes. After this, a file-backed split is exactly an
in-memory split (uint8, N x 3 x S x S) and the evaluator cannot tell them apart. ``Backbone.to_input``
then does ``/255`` and the normalisation, the same float ops as torchvision's ``ToTensor`` and
``Normalize``, so the model sees the same bits as with the original PIL pipeline.

Entries are content-addressed by (which images, which preprocessing) and written atomically: the
``.npy`` appears only once complete, so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.codehash import code_digest
from bench.data.files import FileImages, TransformedImages, to_rgb
from bench.integrity import quarantine
from bench.locks import locked_compute
from bench.progress import progress_bar


def uint8_transform(preprocess):
    """The deterministic part of an open_clip eval transform (resize, crop, RGB), ending in a uint8
    CHW tensor instead of a normalised float one."""
    from torchvision import transforms as T

    steps = []
    for t in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(t, (T.ToTensor, T.Normalize)):
            break
        steps.append(t)
    steps += [to_rgb, T.PILToTensor()]
    return T.Compose(steps)


def describe(transform) -> str:
    """A process-independent description of a transform (function reprs carry memory addresses)."""
    parts = []
    for t in getattr(transform, "transforms", [transform]):
        parts.append(getattr(t, "__qualname__", None) or repr(t))
    return " | ".join(parts)


class PreprocessedCache:
    def __init__(self, root: Path, workers: int = 0, progress: bool = True) -> None:
        self.root = Path(root)
        self.workers = workers
        self.progress = progress
        self.built = 0  # entries computed by this process (the rest were found on disk)

    def images(self, files: FileImages, labels: torch.Tensor, preprocess, desc: str = "") -> torch.Tensor:
        """uint8 (N, 3, S, S), memory-mapped from disk; computed the first time only."""
        transform = uint8_transform(preprocess)
        spec = {"images": files.key(), "transform": describe(transform)}
        spec["code"] = code_digest("bench.data.preprocessed")
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
        path = self.root / f"{key}.npy"
        array, computed = locked_compute(
            path,
            lambda: self._load(path, len(files)),
            lambda: self._build(path, files, labels, transform, desc) and self._load(path, len(files)),
        )
        self.built += computed
        return torch.from_numpy(array)

    @staticmethod
    def _load(path: Path, n: int):
        """The cached array, memory-mapped copy-on-write (writable, but writes never reach the file);
        None (and the file quarantined) when it is damaged."""
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="c")
            if array.shape[0] == n and array.ndim == 4 and array.dtype == np.uint8:
                return array
            problem = f"shape {array.shape} / {array.dtype}, expected {n} uint8 images"
        except (ValueError, OSError, EOFError) as exc:
            problem = f"unreadable ({exc})"
        quarantine([path], problem)
        return None

    def _build(self, path: Path, files: FileImages, labels: torch.Tensor, transform, desc: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        loader = DataLoader(
            TransformedImages(files, labels, transform),
            batch_size=64,
            num_workers=self.workers,
            collate_fn=_stack,
        )
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npy", dir=path.parent)
        os.close(fd)
        try:
            out = None
            start = 0
            for batch in progress_bar(loader, desc=desc or "preprocess", enabled=self.progress):
                if out is None:
                    shape = (len(files), *batch.shape[1:])
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                out[start : start + len(batch)] = batch.numpy()
                start += len(batch)
            out.flush()
            del out
            os.replace(tmp, path)
            return path
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _stack(batch):
    images = [b[0] for b in batch]
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) != 1:
        raise ValueError(f"the evaluation transform gave images of different sizes {sorted(shapes)[:3]}")
    return torch.stack(images)
