"""Fine-tuning the image encoder through a frozen zero-shot head (the candidate pool's workhorse).

Defaults are the paper's: AdamW lr 1e-5, weight decay 0.1, linear warm-up then cosine, grad-norm
clip 1.0, cross-entropy. ``direction=-1`` maximises the loss instead (gradient ascent unlearning).
Every hyperparameter is a field of ``FinetuneParams`` so the grid is config, not code.

``freeze: [attention]`` reproduces the authors' released code, which swaps every visual attention
block for separate Q/K/V/O linears with ``requires_grad_(False)`` and hands AdamW only the parameters
that require grad: the attention projections never move, so their task vectors are exactly zero.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.backbones import Backbone
from bench.cost import processed
from bench.data.registry import ImageSplit
from bench.data.transforms import file_batches, train_transform
from bench.device import CPU, Runtime
from bench.heads import ZeroShotClassifier
from bench.progress import progress_bar


@dataclass(frozen=True)
class FinetuneParams:
    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 128
    grad_accum: int = 1
    epochs: float | None = None  # one of epochs / steps
    steps: int | None = None
    warmup_steps: int = 500
    label_smoothing: float = 0.0
    randaug: str | None = None  # timm config string, e.g. "rand-m9-n2-mstd0.5"
    grad_clip: float = 1.0
    seed: int = 0
    freeze: tuple[str, ...] = ()  # parameter groups kept at theta_0: "attention" (the released code)

    def __post_init__(self) -> None:
        """Refuse settings that would only fail (or silently misbehave) minutes into training."""
        object.__setattr__(self, "freeze", tuple(self.freeze or ()))
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}"),
            (self.epochs is None or self.steps is None, "give one of epochs / steps, not both"),
            (self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        unknown = sorted(set(self.freeze) - set(FREEZE_GROUPS))
        if unknown:
            raise ValueError(f"freeze: unknown group {unknown[0]!r}; known: {', '.join(FREEZE_GROUPS)}")
        if self.randaug:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(self.randaug, {})
            except Exception as exc:
                raise ValueError(f"randaug {self.randaug!r} is not a timm RandAugment string ({exc!r})") from None

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        per_epoch = math.ceil(n_train / (self.batch_size * self.grad_accum))
        return max(1, int(round(float(self.epochs or 1) * per_epoch)))

    def label(self) -> str:
        """Short human label of what differs from the defaults, for tables and plots."""
        default = FinetuneParams()
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(default, k)]
        return ",".join(parts) or "defaults"


FREEZE_GROUPS = {"attention": "attn"}  # group -> module name whose parameters it freezes


def frozen_names(visual: torch.nn.Module, groups: tuple[str, ...]) -> set[str]:
    """Names of the encoder parameters that ``groups`` keep fixed."""
    names = set()
    for group in groups:
        module = FREEZE_GROUPS[group]
        found = {n for n, _ in visual.named_parameters() if module in n.split(".")}
        if not found:
            raise ValueError(f"freeze: {group!r} matches no parameter of this image encoder")
        names |= found
    return names


class Diverged(RuntimeError):
    """Loss or weights became NaN/Inf: the candidate is recorded as failed, not used."""


CHECK_EVERY = 50  # steps between reads of the device-side finiteness flag (each read waits for the device)


class FiniteWatch:
    """Whether every loss so far was finite, kept on the device (``see``) and read on the host only
    every ``every`` steps and at the end (``check``): one host sync per ``every`` steps, not one per
    step. A divergence is reported up to ``every`` steps late; the candidate fails all the same."""

    def __init__(self, desc: str, every: int = CHECK_EVERY) -> None:
        self.desc, self.every = desc, every
        self._ok: torch.Tensor | None = None
        self._since = 0

    def see(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._ok = finite if self._ok is None else self._ok & finite

    def step(self, step: int) -> None:
        """After optimiser step ``step`` (0-based): read the flag every ``every`` steps."""
        if (step + 1) % self.every == 0:
            self.check(step)

    def check(self, step: int) -> None:
        if self._ok is not None and not bool(self._ok):
            raise Diverged(f"loss became NaN/Inf by step {step + 1} during {self.desc}")


def _augmenter(spec: str | None):
    if not spec:
        return None
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    from bench.data.timm_compat import patch_posterize

    patch_posterize()  # magnitude 10 posterizes to 0 bits, which today's Pillow refuses
    transform = rand_augment_transform(spec, {"img_mean": (128, 128, 128)})

    def apply(images: torch.Tensor) -> torch.Tensor:
        # timm's ops fill with an RGB colour, so grayscale images are augmented as RGB and converted back
        gray = images.dim() == 3
        out = []
        for img in images:
            pil = Image.fromarray((img if gray else img.permute(1, 2, 0)).numpy()).convert("RGB")
            aug = transform(pil)
            out.append(torch.from_numpy(np.array(aug.convert("L") if gray else aug)))
        stacked = torch.stack(out)
        return stacked if gray else stacked.permute(0, 3, 1, 2)

    return apply


def _batches(
    split: ImageSplit,
    backbone: Backbone,
    params: FinetuneParams,
    generator: torch.Generator,
    *,
    grayscale: bool,
    workers: int,
    pin: bool = False,
):
    """Endless shuffled batches of (images, labels) on the CPU: a file-backed split's decoded model
    input (pinned for an accelerator), an in-memory split's uint8 images (4x fewer bytes to upload,
    resized and normalised on the device by ``backbone.to_input``)."""
    if split.file_backed:
        transform = train_transform(
            backbone.image_size,
            backbone.mean,
            backbone.std,
            params.randaug,
            grayscale,
            backbone.train_preprocess or backbone.preprocess,
        )
        yield from file_batches(
            split.files,
            split.labels,
            transform,
            batch_size=params.batch_size,
            seed=params.seed,
            workers=workers,
            pin_memory=pin,
        )
        return
    augment = _augmenter(params.randaug)
    n, batch_size = len(split), params.batch_size
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[start : start + batch_size]
            images = split.images[idx]
            if augment is not None:
                images = augment(images)
            yield images, split.labels[idx]


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """timm's RandAugment draws from Python's and numpy's global RNGs, not from our generator: seed
    them for one fine-tune, so an augmented candidate is reproducible, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def finetune(
    backbone: Backbone,
    head: torch.Tensor,
    split: ImageSplit,
    params: FinetuneParams,
    *,
    direction: int = 1,
    desc: str = "fine-tune",
    progress: bool = True,
    grayscale: bool = False,
    workers: int = 0,
    runtime: Runtime = CPU,
) -> dict[str, torch.Tensor]:
    """Train a copy of the image encoder; return its final state dict on the CPU (theta_0 is left untouched).

    ``grayscale``: the split's images are 1-channel (file-backed splits only); ``workers``: DataLoader
    processes decoding a file-backed split (results do not depend on it); ``runtime``: device and
    precision (autocast forward passes, fp32 weights and optimiser state)."""
    import copy

    torch.manual_seed(params.seed)
    visual = copy.deepcopy(backbone.visual).to(runtime.device)
    visual.train()
    frozen = frozen_names(visual, params.freeze)
    for name, p in visual.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    trainable = [p for p in visual.parameters() if p.requires_grad]
    clf = ZeroShotClassifier(visual, runtime.to(head), backbone.model.logit_scale.exp().item())
    forward = torch.compile(clf) if runtime.compile else clf
    scaler = runtime.grad_scaler()
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.lr,
    )
    total = params.total_steps(len(split))
    warmup = min(params.warmup_steps, max(total - 1, 0))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress_frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(params.seed)
    batches = _batches(split, backbone, params, gen, grayscale=grayscale, workers=workers, pin=runtime.on_accelerator)
    watch = FiniteWatch(desc)
    with _seeded_global_rngs(params.seed):
        bar = progress_bar(range(total), desc=desc, enabled=progress)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            for _ in range(params.grad_accum):
                x, y = next(batches)
                x = runtime.to(x)
                if x.dtype == torch.uint8:  # an in-memory split: converted on the device
                    x = backbone.to_input(x)
                with runtime.autocast():
                    loss = F.cross_entropy(forward(x), runtime.to(y), label_smoothing=params.label_smoothing)
                watch.see(loss)
                scaler.scale(direction * loss / params.grad_accum).backward()
                processed(len(y))
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            watch.step(step)
            if progress and (step + 1) % CHECK_EVERY == 0:  # a loss read is a host sync: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        watch.check(total - 1)
    batches.close()  # ends DataLoader workers now, not at garbage collection
    state = {k: v.detach().to("cpu", copy=True) for k, v in visual.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v)):
        raise Diverged(f"weights became NaN/Inf during {desc}")
    return state
