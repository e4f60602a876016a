"""Fine-tuning the image encoder through a frozen zero-shot head (the candidate pool's workhorse).

Defaults are the paper's: AdamW lr 1e-5, weight decay 0.1, linear warm-up then cosine, grad-norm
clip 1.0, cross-entropy. ``direction=-1`` maximises the loss instead (gradient ascent unlearning).
Every hyperparameter is a field of ``FinetuneParams`` so the grid is config, not code.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.backbones import Backbone
from bench.data.registry import ImageSplit
from bench.heads import ZeroShotClassifier


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


class Diverged(RuntimeError):
    """Loss or weights became NaN/Inf: the candidate is recorded as failed, not used."""


def _augmenter(spec: str | None):
    if not spec:
        return None
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

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


def _batches(split: ImageSplit, backbone: Backbone, batch_size: int, generator: torch.Generator, augment):
    """Endless shuffled batches of (model input, labels)."""
    n = len(split)
    if split.images is None:
        from torch.utils.data import DataLoader

        split.dataset.transform = backbone.preprocess  # type: ignore[attr-defined]
        while True:
            yield from DataLoader(
                split.dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True
            )
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[start : start + batch_size]
            images = split.images[idx]
            if augment is not None:
                images = augment(images)
            yield backbone.to_input(images), split.labels[idx]


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
) -> dict[str, torch.Tensor]:
    """Train a copy of the image encoder; return its final state dict (theta_0 is left untouched)."""
    import copy

    torch.manual_seed(params.seed)
    visual = copy.deepcopy(backbone.visual)
    visual.train()
    clf = ZeroShotClassifier(visual, head, backbone.model.logit_scale.exp().item())
    decay = [p for p in visual.parameters() if p.ndim >= 2]
    no_decay = [p for p in visual.parameters() if p.ndim < 2]
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
    batches = _batches(split, backbone, params.batch_size, gen, _augmenter(params.randaug))
    with _seeded_global_rngs(params.seed):
        bar = tqdm(range(total), desc=desc, leave=False, disable=not progress)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            for _ in range(params.grad_accum):
                x, y = next(batches)
                loss = F.cross_entropy(clf(x), y, label_smoothing=params.label_smoothing)
                if not torch.isfinite(loss):
                    raise Diverged(f"loss became {loss.item()} during {desc}")
                (direction * loss / params.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(visual.parameters(), params.grad_clip)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    state = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v)):
        raise Diverged(f"weights became NaN/Inf during {desc}")
    return state
