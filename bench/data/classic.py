"""Protocol B data: a labelled training set split into Dr (retain), Df (forget) and a held-out
validation split, plus the official test set. Images are uint8 tensors in memory.

Sources: offline Fashion-MNIST (Debian package), CIFAR-10 / CIFAR-100 through torchvision (a local
root, or download=True where internet works).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.data import offline
from bench.device import normalisation
from bench.errors import BenchError

NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
MEAN_STD = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class ClassicData:
    name: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_x: torch.Tensor  # uint8 (N, C, H, W): Dr and Df together, indexed below
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    _norm: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (mean, std) tensors

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float input, on the images' device."""
        x = images.float().div_(255.0)
        mean, std = normalisation(self._norm, self.mean, self.std, x.device)
        return (x - mean) / std


def _torchvision_cifar(name: str, root: str | None, download: bool):
    from torchvision import datasets

    if root is None:
        raise BenchError(
            f"dataset {name!r} needs data.root (a folder for torchvision's copy; data.download=true fetches it)"
        )
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except RuntimeError as exc:
        raise BenchError(f"{name} not found under {root}: {exc}. Set data.download=true where internet works.") from exc

    def arrays(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()

    return (*arrays(train), *arrays(test))


def load_classic(
    name: str,
    *,
    train_limit: int | None,
    val_size: int,
    split_seed: int,
    test_limit: int | None = None,
    root: str | None = None,
    download: bool = False,
) -> ClassicData:
    if name == "fashion-mnist":
        xs, ys, xt, yt = offline.fashion_mnist(root)
        xs, xt = xs.unsqueeze(1), xt.unsqueeze(1)
        num_classes = 10
    elif name in ("cifar10", "cifar100"):
        xs, ys, xt, yt = _torchvision_cifar(name, root, download)
        num_classes = 10 if name == "cifar10" else 100
    else:
        raise BenchError(f"dataset: unknown classification dataset {name!r}; known: cifar10, cifar100, fashion-mnist")
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(split_seed))
    val_idx = order[:val_size]
    train_idx = order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    if test_limit is not None and test_limit < len(xt):
        keep = torch.randperm(len(xt), generator=torch.Generator().manual_seed(split_seed))[:test_limit].sort().values
        xt, yt = xt[keep], yt[keep]
    mean, std = MEAN_STD[name]
    return ClassicData(
        name, num_classes, xs.shape[1], mean, std, xs[train_idx], ys[train_idx], xs[val_idx], ys[val_idx], xt, yt
    )


def forget_indices(data: ClassicData, mode: str, fraction: float, classes: list[int], seed: int) -> torch.Tensor:
    """Indices (into the training set) of Df: a seeded random fraction, or whole classes."""
    if mode == "random":
        n = int(round(len(data.train_y) * fraction))
        return torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1000 + seed))[:n].sort().values
    if mode == "class":
        mask = torch.isin(data.train_y, torch.tensor(classes))
        return mask.nonzero(as_tuple=True)[0]
    raise BenchError(f"forget.mode: expected 'random' or 'class', got {mode!r}")
