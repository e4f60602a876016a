"""Task vectors over state dicts: ``tau = theta_ft - theta_0`` and ``theta_0 + coef * tau``.

Arithmetic is done in float32 whatever the stored dtype, and cast back, so fp16/bf16 models edit
without the cancellation error of subtracting two half-precision numbers directly.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from negmerge.errors import MergeInputError

StateDict = Mapping[str, torch.Tensor]


def floating_keys(state: StateDict) -> list[str]:
    """Keys of floating-point tensors: integer buffers (step counters, indices) are not weights."""
    return [k for k, v in state.items() if torch.is_floating_point(v)]


def check_same_layout(reference: StateDict, other: StateDict, what: str, keys: list[str] | None = None) -> None:
    """Raise naming the first key that is missing, extra or of another shape."""
    ref_keys = keys if keys is not None else list(reference.keys())
    missing = [k for k in ref_keys if k not in other]
    if missing:
        raise MergeInputError(f"{what}: key {missing[0]!r} is missing ({len(missing)} missing in all)")
    if keys is None:
        extra = [k for k in other if k not in reference]
        if extra:
            raise MergeInputError(f"{what}: unexpected key {extra[0]!r} ({len(extra)} extra in all)")
    for k in ref_keys:
        if tuple(reference[k].shape) != tuple(other[k].shape):
            raise MergeInputError(
                f"{what}: key {k!r} has shape {tuple(other[k].shape)}, expected {tuple(reference[k].shape)}"
            )


def _check_finite(t: torch.Tensor, what: str, key: str) -> None:
    if not torch.isfinite(t).all():
        raise MergeInputError(f"{what}: key {key!r} contains NaN or Inf")


def task_vector(theta_ft: StateDict, theta_0: StateDict) -> dict[str, torch.Tensor]:
    """``theta_ft - theta_0`` over the floating-point tensors, in each tensor's own dtype."""
    check_same_layout(theta_0, theta_ft, "fine-tuned model")
    out: dict[str, torch.Tensor] = {}
    for k in floating_keys(theta_0):
        ft, base = theta_ft[k], theta_0[k]
        if not torch.is_floating_point(ft):
            raise MergeInputError(f"fine-tuned model: key {k!r} is {ft.dtype}, the base model has {base.dtype}")
        diff = ft.detach().to(torch.float32) - base.detach().to(torch.float32)
        _check_finite(diff, "task vector", k)
        out[k] = diff.to(base.dtype).contiguous()
    return out


def apply(theta_0: StateDict, tau: StateDict, coef: float) -> dict[str, torch.Tensor]:
    """``theta_0 + coef * tau``; negation (unlearning) is a negative coef.

    Tensors absent from tau (integer buffers) are copied from theta_0, so the result loads into the
    same model. Keys in tau must exist in theta_0 with the same shape.
    """
    if not isinstance(coef, (int, float)) or coef != coef or coef in (float("inf"), float("-inf")):
        raise MergeInputError(f"coef must be a finite number, got {coef!r}")
    check_same_layout(tau, theta_0, "base model", keys=list(tau.keys()))
    out: dict[str, torch.Tensor] = {}
    for k, base in theta_0.items():
        if k not in tau:
            out[k] = base.detach().clone()
            continue
        if not torch.is_floating_point(base):
            raise MergeInputError(f"task vector: key {k!r} targets a non-floating tensor ({base.dtype})")
        delta = tau[k].detach().to(torch.float32)
        _check_finite(delta, "task vector", k)
        out[k] = (base.detach().to(torch.float32) + float(coef) * delta).to(base.dtype)
    return out


def save_state(state: StateDict, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically (temp file + rename): an interrupted write never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = [e for e in (errno.ENOSPC, errno.EDQUOT) if f"os error {e})" in str(exc)]
        if full:  # safetensors reports a full disk (or quota) as its own error type: make it the OSError it is
            raise OSError(full[0], os.strerror(full[0]), str(path)) from exc
        raise
    return path
