"""Fine-tuning inputs from file-backed splits, as the authors' released code makes them.

With a candidate's ``randaug`` (a timm string such as ``rand-m9-n2-mstd0.5``): timm's
``transforms_imagenet_train`` at the backbone's image size and mean/std (random resized crop,
horizontal flip, RandAugment, normalise); grayscale sources (MNIST) are resized and made 3-channel
first. Without it: open_clip's own train preprocessing for the backbone.

Reproducibility does not depend on ``data.workers``: every sample draw seeds the Python, numpy and
torch RNGs that the transforms use from (candidate seed, draw number) alone, in whichever process
decodes it, and restores them afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.data.files import FileImages, to_rgb


def train_transform(image_size: int, mean, std, randaug: str | None, grayscale: bool, plain: Callable) -> Callable:
    """``plain`` is the backbone's own train preprocessing, used when there is no RandAugment.

    Images are made RGB first, as every loader of the released code does (torchvision's ``pil_loader``;
    MNIST's ``Grayscale(3)``): open_clip's train transform does not convert, and real copies hold the odd
    grayscale or CMYK file."""
    from torchvision import transforms as T

    if not randaug:
        return T.Compose([to_rgb, plain])
    from timm.data.transforms_factory import transforms_imagenet_train

    from bench.data.timm_compat import patch_posterize

    patch_posterize()  # magnitude 10 posterizes to 0 bits, which today's Pillow refuses
    transform = transforms_imagenet_train(img_size=image_size, auto_augment=randaug, mean=mean, std=std)
    first = [T.Resize(image_size), T.Grayscale(num_output_channels=3)] if grayscale else [to_rgb]
    return T.Compose([*first, *transform.transforms])


class EndlessShuffle(Sampler):
    """Reshuffled epochs forever, each item tagged with its draw number (the per-sample seed)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed)
        draw = 0
        while True:
            for i in torch.randperm(self.n, generator=gen).tolist():
                yield draw, i
                draw += 1


class SeededAugment(Dataset):
    """``ds[(draw, i)]`` = (transform(image i), label i), with the RNGs seeded by (seed, draw)."""

    def __init__(self, files: FileImages, labels: torch.Tensor, transform: Callable, seed: int) -> None:
        self.files, self.labels, self.transform, self.seed = files, labels, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        draw, i = item
        sample_seed = (self.seed * 1_000_003 + draw) % (2**63)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2**32))
            try:
                x = self.transform(self.files.image(i))
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return x, self.labels[i]


def file_batches(
    files: FileImages,
    labels: torch.Tensor,
    transform: Callable,
    *,
    batch_size: int,
    seed: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, labels) batches decoded by ``workers`` persistent processes (0: in process)."""
    loader = DataLoader(
        SeededAugment(files, labels, transform, seed),
        batch_size=batch_size,
        sampler=EndlessShuffle(len(files), seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )
    return iter(loader)
