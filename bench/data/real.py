"""The paper's datasets from local copies, in the layouts clip-benchmark users already have.

Three layouts, detected per dataset root (or named in ``data.layouts``); docs/datasets.md has the table:

- ``wds``: clip-benchmark's WebDataset export (``ROOT/{train,test}/nshards.txt`` + shards).
- ``folder``: split folders ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (how the
  task-vector literature ships its EuroSAT and SUN397 splits).
- ``torchvision``: the folders clip-benchmark's torchvision loaders read (``ROOT/MNIST/raw``,
  ``ROOT/stanford_cars``, ``ROOT/dtd``, ``ROOT/gtsrb``, SVHN's ``.mat`` files, ImageNet's
  ``train``/``val``). Refused for datasets whose loader has no train/test split (EuroSAT, SUN397:
  clip-benchmark returns the same images for both) or needs TensorFlow (RESISC45): never evaluate on
  training images.

Class names and templates are clip-benchmark's: the wds files, else its ``en_classnames.json`` /
``en_zeroshot_classification_templates.json``, else the dataset's own class list.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data.files import FileImages, dataset_labels
from bench.data.wds import WdsSplit, is_wds_root, read_lines
from bench.errors import BenchError

LAYOUTS = ("auto", "wds", "folder", "torchvision")


@dataclass(frozen=True)
class RealDataset:
    """What is known about one of the paper's datasets, independent of where a user keeps it."""

    name: str
    cb_name: str  # clip-benchmark's name: the key of its class-name / template lists
    grayscale: bool = False  # the released code resizes and makes 3 channels first (MNIST)
    torchvision_splits: bool = True  # False: clip-benchmark's torchvision route cannot make train/test
    torchvision_note: str = ""


REAL_DATASETS = {
    d.name: d
    for d in [
        RealDataset("cars", "cars"),
        RealDataset("dtd", "dtd"),
        RealDataset(
            "eurosat",
            "eurosat",
            torchvision_splits=False,
            torchvision_note="clip-benchmark's torchvision EuroSAT ignores split (train = test)",
        ),
        RealDataset("gtsrb", "gtsrb"),
        RealDataset("mnist", "mnist", grayscale=True),
        RealDataset(
            "resisc45",
            "vtab/resisc45",
            torchvision_splits=False,
            torchvision_note="clip-benchmark reads RESISC45 only through TensorFlow datasets (vtab/resisc45)",
        ),
        RealDataset(
            "sun397",
            "sun397",
            torchvision_splits=False,
            torchvision_note="clip-benchmark's torchvision SUN397 ignores split (train = test)",
        ),
        RealDataset("svhn", "svhn"),
        RealDataset("imagenet", "imagenet1k"),
    ]
}


def resolve_root(name: str, root: str | None, roots: dict[str, str]) -> Path:
    """``data.roots[name]`` if given, else ``data.root`` with ``{dataset}`` / ``{dataset_cleaned}``
    (clip-benchmark's convention: its name with '/' as '-') filled in."""
    if name in roots:
        path = Path(roots[name]).expanduser()
    elif root is not None:
        cleaned = REAL_DATASETS[name].cb_name.replace("/", "-")
        path = Path(root.replace("{dataset}", name).replace("{dataset_cleaned}", cleaned)).expanduser()
    else:
        raise BenchError(
            f"dataset {name!r} needs a local copy: set data.root (a clip-benchmark root, or a template such as "
            f"/data/wds_{{dataset}}) or data.roots.{name}"
        )
    if not path.is_dir():
        raise BenchError(
            f"dataset {name!r}: folder {path} does not exist; fix data.root / data.roots.{name} "
            "(run once online with data.download=true to fetch torchvision copies there)"
        )
    return path


def detect_layout(root: Path) -> str:
    if is_wds_root(root):
        return "wds"
    if (root / "train").is_dir() and (root / "test").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        return "folder"
    return "torchvision"


@functools.cache
def _clip_benchmark_lists() -> tuple[dict, dict]:
    import clip_benchmark.datasets as cb

    folder = Path(cb.__file__).parent
    classnames = json.loads((folder / "en_classnames.json").read_text())
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())
    return classnames, templates


def default_templates(spec: RealDataset) -> list[str]:
    _, templates = _clip_benchmark_lists()
    short = spec.cb_name.split("/")[-1]
    return list(templates.get(spec.cb_name) or templates.get(short) or templates["imagenet1k"])


def default_classnames(spec: RealDataset, n_classes: int) -> list[str] | None:
    classnames, _ = _clip_benchmark_lists()
    names = classnames.get(spec.cb_name) or classnames.get(spec.cb_name.split("/")[-1])
    return list(names) if names and len(names) == n_classes else None


@dataclass
class RealSplits:
    train: FileImages
    train_labels: torch.Tensor
    test: FileImages
    test_labels: torch.Tensor
    classnames: list[str]
    templates: list[str]
    layout: str
    root: Path


def load_real(name: str, root: Path, layout: str = "auto", download: bool = False) -> RealSplits:
    """Index a dataset's official train and test splits (no image is decoded here)."""
    spec = REAL_DATASETS[name]
    layout = detect_layout(root) if layout == "auto" else layout
    reader = {"wds": _wds, "folder": _folder, "torchvision": _torchvision}[layout]
    train, train_labels, test, test_labels, classnames, templates = reader(spec, root, download)
    ident = f"{name}|{layout}|{root.resolve()}"
    return RealSplits(
        FileImages(train, torch.arange(len(train)), f"{ident}|train"),
        train_labels,
        FileImages(test, torch.arange(len(test)), f"{ident}|test"),
        test_labels,
        classnames,
        templates,
        layout,
        root,
    )


def _wds(spec: RealDataset, root: Path, download: bool):
    train, test = WdsSplit(root, "train", spec.name), WdsSplit(root, "test", spec.name)
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    names_file, templates_file = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    classnames = read_lines(names_file) if names_file.is_file() else default_classnames(spec, n_classes)
    if classnames is None:
        raise BenchError(f"dataset {spec.name!r}: {names_file} is missing and clip-benchmark has no class names for it")
    templates = read_lines(templates_file) if templates_file.is_file() else default_templates(spec)
    return train, train.labels, test, test.labels, classnames, templates


def _folder(spec: RealDataset, root: Path, download: bool):
    from torchvision.datasets import ImageFolder

    train, test = ImageFolder(str(root / "train")), ImageFolder(str(root / "test"))
    if train.classes != test.classes:
        raise BenchError(
            f"dataset {spec.name!r}: {root}/train and {root}/test have different class folders; "
            "both splits need the same class subfolders"
        )
    classnames = default_classnames(spec, len(train.classes)) or [
        c.replace("_", " ").replace("/", " ") for c in train.classes
    ]
    return train, dataset_labels(train), test, dataset_labels(test), classnames, default_templates(spec)


def _torchvision(spec: RealDataset, root: Path, download: bool):
    if not spec.torchvision_splits:
        raise BenchError(
            f"dataset {spec.name!r}: {spec.torchvision_note}, so {root} cannot give a held-out test split. "
            f"Use clip-benchmark's WebDataset export (ROOT/train, ROOT/test shards) or split folders "
            f"(ROOT/train/<class>, ROOT/test/<class>) for {spec.name}, via data.roots.{spec.name}"
        )
    build = _SVHN if spec.name == "svhn" else _clip_benchmark_builder(spec.cb_name)
    try:
        train, test = build(root, "train", download), build(root, "test", download)
    except Exception as exc:
        raise BenchError(
            f"dataset {spec.name!r}: no torchvision copy of {spec.cb_name} under {root} ({type(exc).__name__}: "
            f"{str(exc).strip()[:200]}); point data.roots.{spec.name} at it, use the WebDataset layout, or "
            "download it with data.download=true while online"
        ) from exc
    classnames = list(getattr(test, "classes", None) or [])
    classnames = default_classnames(spec, len(classnames)) or classnames
    return train, dataset_labels(train), test, dataset_labels(test), classnames, default_templates(spec)


def _clip_benchmark_builder(cb_name: str) -> Callable:
    def build(root: Path, split: str, download: bool):
        import warnings

        from clip_benchmark.datasets.builder import build_dataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_dataset(cb_name, root=str(root), split=split, download=download, transform=None)

    return build


def _SVHN(root: Path, split: str, download: bool):  # noqa: N802 - a constructor
    from torchvision.datasets import SVHN

    ds = SVHN(str(root), split=split, download=download)
    ds.classes = [str(i) for i in range(10)]
    return ds
