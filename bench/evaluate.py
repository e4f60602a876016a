"""Batched, no-grad evaluation: the hot path of a run (every lambda of every method).

Images held as uint8 tensors (in memory, or memory-mapped from the preprocessing cache for
file-backed splits) are converted batch by batch; the classifier is built once and its weights
swapped in place per lambda, so a grid point costs only the forward passes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bench.backbones import Backbone
from bench.data.registry import ImageSplit
from bench.heads import ZeroShotClassifier


class Evaluator:
    """Owns one working copy of the image encoder; ``load`` swaps weights in, ``outputs`` runs it."""

    def __init__(self, backbone: Backbone, batch_size: int = 512) -> None:
        import copy

        self.backbone = backbone
        self.visual = copy.deepcopy(backbone.visual).eval()
        self.scale = backbone.model.logit_scale.exp().item()
        self.batch_size = batch_size

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.visual.load_state_dict(state, strict=True)

    @torch.no_grad()
    def logits(self, split: ImageSplit, head: torch.Tensor) -> torch.Tensor:
        clf = ZeroShotClassifier(self.visual, head, self.scale).eval()
        if split.file_backed:
            raise ValueError("file-backed split: decode it once with bench.data.prepare_eval before evaluating")
        outs = []
        for start in range(0, len(split), self.batch_size):
            outs.append(clf(self.backbone.to_input(split.images[start : start + self.batch_size])))
        return torch.cat(outs)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def true_label_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")
