"""Training loops for Protocol B: one SGD loop that every classifier method is a setting of.

Original / Retrain / FT / the candidate pool minimise cross-entropy; GA maximises it; RL trains on
random labels for Df; l1-sparse adds an l1 penalty; SalUn restricts updates to a saliency mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.cost import processed
from bench.data.classic import ClassicData
from bench.device import CPU, Runtime
from bench.finetune import FiniteWatch
from bench.progress import progress_bar


@dataclass(frozen=True)
class SgdParams:
    epochs: float = 1.0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR
    schedule: str = "cosine"  # or "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that would only fail (or silently misbehave) once training starts."""
        checks = [
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.schedule in ("cosine", "constant"), f"schedule must be cosine or constant, got {self.schedule!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def label(self) -> str:
        default = SgdParams()
        return ",".join(f"{k}={v}" for k, v in asdict(self).items() if v != getattr(default, k)) or "defaults"


def steps_of(n: int, params: SgdParams) -> int:
    """Optimiser steps ``train`` takes on n samples: ``epochs`` passes of ceil(n / batch_size) batches."""
    return max(1, int(round(params.epochs * max(1, math.ceil(n / params.batch_size)))))


def samples_seen(n: int, params: SgdParams) -> int:
    """Training samples ``train`` processes (forward and backward) on n samples: every full pass sees all
    n, a last partial pass its first steps' full batches (a pass's last, short batch ends it)."""
    steps, per_pass = steps_of(n, params), max(1, math.ceil(n / params.batch_size))
    return (steps // per_pass) * n + (steps % per_pass) * params.batch_size


def _augment(x: torch.Tensor, gen: torch.Generator, flip_gen: torch.Generator) -> torch.Tensor:
    """Random crop (one offset per batch, drawn on the host: no device read) and per-image flips,
    drawn by ``flip_gen`` on the batch's device (a host draw would be an upload every step)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()
    x = padded[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=flip_gen, device=flip_gen.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train(
    model: nn.Module,
    data: ClassicData,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: SgdParams,
    *,
    direction: int = 1,
    l1_alpha: float = 0.0,
    grad_mask: Mapping[str, torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
    runtime: Runtime = CPU,
) -> nn.Module:
    """Train ``model`` in place on (images, labels) and return it (on the runtime's device)."""
    model.to(runtime.device)
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    # flips: on the device; on a CPU from ``gen`` itself, so CPU runs draw what they always drew
    flip_gen = torch.Generator(runtime.device).manual_seed(params.seed) if runtime.on_accelerator else gen
    scaler = runtime.grad_scaler()
    watch = FiniteWatch(desc)
    opt = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    n = len(labels)
    total = steps_of(n, params)
    if params.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    named = dict(model.named_parameters())
    model.train()
    step = 0
    bar = progress_bar(total=total, desc=desc, enabled=progress)
    while step < total:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, params.batch_size):
            if step >= total:
                break
            idx = order[start : start + params.batch_size]
            x = data.to_input(runtime.to(images[idx]))
            if params.augment:
                x = _augment(x, gen, flip_gen)
            with runtime.autocast():
                loss = F.cross_entropy(model(x), runtime.to(labels[idx]), label_smoothing=params.label_smoothing)
            watch.see(loss)
            objective = direction * loss
            if l1_alpha:
                # l1-sparse unlearning: the penalty decays linearly over training (Jia et al. 2023)
                objective = objective + l1_alpha * (1 - step / total) * sum(p.abs().sum() for p in model.parameters())
            opt.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()  # fp16: loss scaling (a disabled scaler passes through)
            processed(len(idx))
            if grad_mask is not None:
                for name, mask in grad_mask.items():
                    if named[name].grad is not None:
                        named[name].grad.mul_(mask)
            scaler.step(opt)
            scaler.update()
            sched.step()
            watch.step(step)
            step += 1
            bar.update(1)
    watch.check(total - 1)
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def logits_of(
    model: nn.Module, data: ClassicData, images: torch.Tensor, batch_size: int = 1024, runtime: Runtime = CPU
) -> torch.Tensor:
    """float32 logits on the CPU (batches run on the model's device under the runtime's autocast)."""
    model.eval()
    outs = []
    for s in range(0, len(images), batch_size):
        with runtime.autocast():
            out = model(data.to_input(runtime.to(images[s : s + batch_size])))
        outs.append(out.float())
    return torch.cat(outs).cpu()  # one device-to-host copy per split


def saliency_mask(
    model: nn.Module,
    data: ClassicData,
    images: torch.Tensor,
    labels: torch.Tensor,
    sparsity: float = 0.5,
    batch_size: int = 256,
    runtime: Runtime = CPU,
) -> dict[str, torch.Tensor]:
    """SalUn: |gradient of the forget loss|, thresholded globally to keep the top (1 - sparsity) weights.

    In fp16 the gradients are taken in fp32: a sum-reduced loss's fp16 gradients overflow without loss
    scaling, and this pass has no optimiser step to scale through (bf16 keeps its autocast)."""
    model.eval()
    forward_precision = contextlib.nullcontext if runtime.precision == "fp16" else runtime.autocast
    grads = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for start in range(0, len(labels), batch_size):
        model.zero_grad(set_to_none=True)
        with forward_precision():
            loss = F.cross_entropy(
                model(data.to_input(runtime.to(images[start : start + batch_size]))),
                runtime.to(labels[start : start + batch_size]),
                reduction="sum",
            )
        loss.backward()
        processed(len(labels[start : start + batch_size]))
        for name, p in model.named_parameters():
            if p.grad is not None:
                grads[name] += p.grad.abs()
    model.zero_grad(set_to_none=True)
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    keep = max(1, int(round(len(flat) * (1 - sparsity))))
    cut = torch.topk(flat, keep, sorted=False).values.min()
    return {name: (g >= cut).float() for name, g in grads.items()}
