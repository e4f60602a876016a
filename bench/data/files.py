"""Images read from disk on demand: a dataset that yields undecorated (PIL image, label) pairs, a
subset of its positions, and an identity string that names exactly which images these are.

Transforms are never set on the wrapped dataset (a shared object: train and Val are subsets of the
same one); whoever reads applies its own transform, so a fine-tuning transform can never leak into
an evaluation or the other way round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from bench.data.damaged import decode


@dataclass
class FileImages:
    """``base[indices[i]]`` is image i. ``identity`` names the source (dataset, layout, root, split)."""

    base: Dataset
    indices: torch.Tensor
    identity: str

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int):
        """Image i, decoded; a damaged file raises ``bench.data.damaged.BadImage`` naming it."""
        return decode(self.base, int(self.indices[i]), self.identity)

    def subset(self, index: torch.Tensor) -> FileImages:
        return FileImages(self.base, self.indices[index], self.identity)

    def key(self) -> str:
        """Content address of this selection of images: its source plus the positions it takes."""
        h = hashlib.sha256(self.identity.encode())
        h.update(self.indices.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:24]


class TransformedImages(Dataset):
    """(transform(image), label) for a DataLoader; picklable, so it works with worker processes."""

    def __init__(self, files: FileImages, labels: torch.Tensor, transform: Callable) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(self.files.image(i)), self.labels[i]


def to_rgb(image):
    """PIL image as RGB (grayscale, palette and CMYK files exist in every large image dataset)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """Every label of a torchvision-style dataset without decoding its images (they are file lists
    with the labels beside them); falls back to reading each item only for unknown classes."""
    for attr in ("targets", "labels", "_labels"):
        value = getattr(ds, attr, None)
        if value is not None and len(value) == len(ds):
            return torch.as_tensor([int(v) for v in value], dtype=torch.long)
    for attr in ("_samples", "samples", "imgs"):
        value = getattr(ds, attr, None)
        if value is not None and len(value) == len(ds):
            return torch.as_tensor([int(v[1]) for v in value], dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)
