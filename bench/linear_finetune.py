"""Linearised (tangent) fine-tuning: the standard fine-tuning loop run on the encoder's first-order
Taylor expansion around theta_0 (``bench.linearized``), the literature's strongest task vectors
(Ortiz-Jimenez et al., NeurIPS 2023).

The loop is ``bench.finetune.finetune`` itself, not a copy: the recipe (AdamW, warm-up and cosine,
clipping, weight decay on theta as in the standard model), the data pipeline, RandAugment, the
frozen groups, the device and the precision are those of a standard candidate. Only the model
differs, so a linear candidate and a standard one with the same settings differ in nothing else.
This is its own module so that the standard pool's keys (a digest of ``bench.finetune`` and what it
imports, ``bench.codehash``) stay what they were; the linear pool's digest is this module's closure.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench.backbones import Backbone
from bench.finetune import finetune
from bench.linearized import LinearizedEncoder


class _LinearModel(torch.nn.Module):
    """What ``finetune`` reads of an open_clip model: the image encoder and the logit scale."""

    def __init__(self, visual: torch.nn.Module, logit_scale: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = logit_scale


def linear_backbone(backbone: Backbone) -> Backbone:
    """``backbone`` whose image encoder is its linearisation around its current weights (theta_0)."""
    model = _LinearModel(LinearizedEncoder(backbone.visual), backbone.model.logit_scale.detach())
    return replace(backbone, model=model)


def finetune_linear(backbone: Backbone, head: torch.Tensor, split, params, **kwargs) -> dict[str, torch.Tensor]:
    """``bench.finetune.finetune`` on the linearised encoder; returns theta (the encoder's keys), so
    ``task_vector(result, theta_0)`` is the tangent task vector theta - theta_0."""
    return finetune(linear_backbone(backbone), head, split, params, **kwargs)
