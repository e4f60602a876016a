"""The merge benchmark's workload: K task vectors shaped like open_clip ViT-B-32's image encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from baselines import get_merge


def visual_shapes(name: str = "ViT-B-32") -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a real open_clip image encoder (random init, no weights needed)."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None)
    shapes = {k: tuple(v.shape) for k, v in model.visual.state_dict().items() if torch.is_floating_point(v)}
    del model
    return shapes


def write_pool(directory: Path, k: int, shapes: dict[str, tuple[int, ...]]) -> list[Path]:
    """K correlated random task vectors (shared direction + per-candidate noise), as safetensors.

    Made one tensor at a time (a ViT-L/14 pool is 36 GB: it never exists in memory)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"tv{i:02d}.safetensors" for i in range(k)]
    if all(p.exists() for p in paths):
        return paths
    for i, path in enumerate(paths):
        if path.exists():
            continue
        common_gen = torch.Generator().manual_seed(0)
        g = torch.Generator().manual_seed(i + 1)
        tensors = {}
        for key, shape in shapes.items():  # the shared direction, regenerated key by key in the same order
            common = torch.randn(shape, generator=common_gen)
            tensors[key] = (common.add_(torch.randn(shape, generator=g))).mul_(1e-3)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(path)
        del tensors
    return paths


def read_once(paths: list[Path], block: int = 1 << 24) -> None:
    """The floor: read every byte of every file once (16 MiB at a time, so no memory grows)."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def streaming_merge(paths: list[Path], name: str = "negmerge") -> None:
    get_merge(name)(paths)


def naive_merge(paths: list[Path]) -> None:
    """Read all K vectors into memory, stack them into one K x N matrix, reduce: the obvious script."""
    flat = []
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            flat.append(torch.cat([f.get_tensor(key).reshape(-1) for key in f.keys()]))
    stack = torch.stack(flat)
    del flat
    signs = torch.sign(stack)
    keep = signs.sum(0).abs() == len(paths)
    torch.where(keep, stack.mean(0), torch.zeros(()))
