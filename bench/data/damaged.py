"""Damaged image files in a user's dataset copy: named, then refused or left out (``data.bad_images``).

Real copies hold the odd truncated JPEG (an interrupted download or rsync) or a zeroed payload (a
disk error). Decoding one is a ``PIL`` ``OSError`` somewhere deep in a DataLoader; here it becomes a
``BadImage`` naming the dataset, the file (or WebDataset shard and sample key) and the fix.

``error`` (the default): the first damaged image stops the run. Evaluation splits are decoded before
any fine-tuning (``bench.protocol_clip``), so a damaged Val/test/MIA image stops it at once.
``skip``: every split a run reads is checked once (decoded, cached per split in ``CACHE/bad-images``)
before anything else, its damaged images are left out, and the manifest and the report list them.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from bench.errors import BenchError

# What PIL (and the file system) raise for a file that is not a whole image: truncated data
# (OSError), an unidentifiable payload (UnidentifiedImageError, an OSError), broken PNG chunks
# (SyntaxError, zlib.error, struct.error), a file gone since indexing (FileNotFoundError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
POLICIES = ("error", "skip")
FIX = (
    "replace it with an intact copy (extract it again from the dataset's archive), or set data.bad_images=skip "
    "to leave damaged images out (they are listed in the manifest and the report)"
)


class BadImage(BenchError):
    """An image file of a dataset copy that cannot be decoded."""


def source(identity: str) -> tuple[str, str]:
    """(dataset, official split) from a ``FileImages`` identity ``name|layout|root|split``."""
    parts = identity.split("|")
    return parts[0], parts[-1]


def where(base: Dataset, index: int) -> str:
    """The file (or shard and sample) behind item ``index`` of a torchvision-style dataset."""
    describe = getattr(base, "describe", None)
    if callable(describe):
        return describe(index)
    for attr in ("samples", "_samples", "imgs"):  # ImageFolder, ImageNet, GTSRB, StanfordCars: (path, label)
        value = getattr(base, attr, None)
        if value is not None and len(value) == len(base):
            return f"file {value[index][0]}"
    files = getattr(base, "_image_files", None)  # DTD, Flowers102, Food101
    if files is not None and len(files) == len(base):
        return f"file {files[index]}"
    return f"item {index} of {type(base).__name__}"


def decode(base: Dataset, index: int, identity: str):
    """``base[index]``'s PIL image, fully decoded; a damaged file raises ``BadImage``."""
    try:
        image = base[index][0]
        if hasattr(image, "load"):
            image.load()  # PIL opens lazily: a truncated payload fails only here
        return image
    except DECODE_ERRORS as exc:
        dataset, split = source(identity)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(its bytes)", reason)
        raise BadImage(
            f"dataset {dataset!r} ({split} split): {where(base, index)} is damaged ({reason}); {FIX}"
        ) from None


class _Probe(Dataset):
    """Item i: None when image i decodes, else (position, file, reason)."""

    def __init__(self, files) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            self.files.image(i)
            return None
        except BadImage as exc:
            return {"position": i, "problem": str(exc).removesuffix(f"; {FIX}")}


def _decode_all(files, workers: int) -> list[dict[str, Any]]:
    loader = DataLoader(_Probe(files), batch_size=64, num_workers=workers, collate_fn=list)
    return [item for batch in loader for item in batch if item is not None]


class BadImageCheck:
    """``skip``: the damaged images of each split a run reads, found once and cached by which images
    the split holds (its ``FileImages.key``), then left out of the split."""

    def __init__(self, root: Path, workers: int = 0) -> None:
        self.root, self.workers = Path(root), workers
        self.dropped: list[dict[str, Any]] = []  # every image left out, for the manifest and the report

    def damaged(self, files) -> list[dict[str, Any]]:
        from bench.codehash import code_digest
        from bench.io import write_json_atomic

        key = hashlib.sha256(f"{files.key()}|{code_digest('bench.data.damaged')}".encode()).hexdigest()[:24]
        path = self.root / f"{key}.json"
        try:
            return json.loads(path.read_text())["damaged"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not checked yet (or an unreadable record: checked again)
        found = _decode_all(files, self.workers)
        if found and len(found) == len(files):
            raise BenchError(
                f"dataset {source(files.identity)[0]!r}: not one of its {len(files)} {source(files.identity)[1]} "
                f"images decodes (first: {found[0]['problem']}); this is not a damaged file but a wrong data root "
                "or layout: check data.root / data.roots / data.layouts"
            )
        write_json_atomic(path, {"identity": files.identity, "damaged": found})
        return found

    def clean(self, task):
        """``task`` with its damaged images left out of train (the fine-tuning part), Val and test."""
        import torch

        splits = {}
        for role in ("train", "val", "test"):
            split = getattr(task, role)
            if not split.file_backed:
                continue
            found = self.damaged(split.files)
            if not found:
                continue
            bad = {d["position"] for d in found}
            keep = torch.tensor([i for i in range(len(split)) if i not in bad], dtype=torch.long)
            splits[role] = split.subset(keep)
            self.dropped += [{"dataset": task.name, "split": role, "problem": d["problem"]} for d in found]
        return replace(task, **splits) if splits else task

    def digest(self) -> str | None:
        """Names what was left out, for cache keys of results computed without it (None: nothing was)."""
        if not self.dropped:
            return None
        return hashlib.sha256(json.dumps(self.dropped, sort_keys=True).encode()).hexdigest()[:16]
