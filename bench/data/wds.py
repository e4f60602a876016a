"""clip-benchmark's WebDataset layout, read with random access.

The layout (as ``clip_benchmark_export_wds`` writes it)::

    ROOT/train/nshards.txt, ROOT/train/0.tar, 1.tar, ...     each sample: KEY.{webp,png,jpg,jpeg} + KEY.cls
    ROOT/test/...
    ROOT/classnames.txt                                      one class name per line
    ROOT/zeroshot_classification_templates.txt               one template per line, with {c}

clip-benchmark reads it as a stream (``webdataset.WebDataset``), which has no length and no random
access; a seeded Val split and shuffled fine-tuning need both. The tar headers give every member's
byte range, so one pass over the headers indexes a split and each image is then one seek and read.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bench.errors import BenchError

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


def is_wds_root(root: Path) -> bool:
    return (root / "test" / "nshards.txt").is_file() or (root / "train" / "nshards.txt").is_file()


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class WdsSplit(Dataset):
    """One split of a WebDataset folder: ``len``, ``ds[i] -> (PIL image, label)``, ``labels``."""

    def __init__(self, root: Path, split: str, dataset: str) -> None:
        self.root, self.split = Path(root), split
        nshards_file = self.root / split / "nshards.txt"
        if not nshards_file.is_file():
            raise BenchError(
                f"dataset {dataset!r}: WebDataset folder {self.root} has no {split}/nshards.txt; "
                f"a {split} split needs {split}/nshards.txt and {split}/0.tar... (clip_benchmark_export_wds writes them)"
            )
        nshards = int(nshards_file.read_text().strip())
        self.shards = [self.root / split / f"{i}.tar" for i in range(nshards)]
        missing = [str(s) for s in self.shards if not s.is_file()]
        if missing:
            raise BenchError(
                f"dataset {dataset!r}: WebDataset shard {missing[0]} is missing ({len(missing)} of {nshards})"
            )
        self.entries: list[tuple[int, int, int]] = []  # (shard, data offset, size) of each image
        self.keys: list[str] = []  # each image's sample key, to name it when it is damaged
        labels: list[int] = []
        for s, shard in enumerate(self.shards):
            images, classes = {}, {}
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile() or "." not in member.name:
                        continue
                    key, ext = member.name.split(".", 1)
                    if ext.lower() in IMAGE_EXTENSIONS:
                        images[key] = (member.offset_data, member.size)
                    elif ext == "cls":
                        classes[key] = int(tar.extractfile(member).read().decode().strip())
            for key in sorted(images, key=lambda k: (len(k), k)):
                if key not in classes:
                    raise BenchError(f"dataset {dataset!r}: {shard} holds image {key} without its {key}.cls label")
                self.entries.append((s, *images[key]))
                self.keys.append(key)
                labels.append(classes[key])
        if not self.entries:
            raise BenchError(f"dataset {dataset!r}: the {split} shards under {self.root} hold no labelled images")
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from PIL import Image

        shard, offset, size = self.entries[i]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open per reader
        # a positional read: a forked fine-tune worker inherits this descriptor, and with seek + read
        # the two processes would move one shared file offset under each other
        payload = os.pread(handle.fileno(), size, offset)
        image = Image.open(io.BytesIO(payload))
        image.load()
        return image, int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"shard {self.shards[self.entries[i][0]]} sample {self.keys[i]}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross into DataLoader workers
        return state
