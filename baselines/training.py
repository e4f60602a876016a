"""Training-based unlearning methods: each is a small class whose one hook, ``recipe``, says what to
train on and how; the protocol that offers it owns the training loop (AdamW fine-tuning of a CLIP
encoder in Protocol A, the SGD loop of a classifier in Protocol B).

A method declares what it ``needs`` from a protocol (docs/extending.md lists the capabilities):
a protocol offers exactly the methods whose needs it supplies, so the config can refuse
``rl`` in a CLIP suite (no retain set there) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

# What a protocol can supply to a training-based method.
FORGET = "forget"  # the data to forget
RETAIN = "retain"  # the data to keep (Protocol B: Dr)
RELABEL = "relabel"  # the forget set with random wrong labels
L1 = "l1"  # an l1 penalty on the weights during training
SALIENCY = "saliency"  # updates restricted to a gradient-saliency mask


class UnlearningSets(Protocol):
    """The data a protocol hands to ``TrainingMethod.recipe``. Splits are opaque to the method: it only
    combines them with these operations, so one recipe serves every protocol that supplies its needs."""

    forget: Any
    retain: Any

    def relabelled(self, split: Any, generator: torch.Generator) -> Any:
        """``split`` with every label replaced by a random different class."""

    def subsample(self, split: Any, fraction: float, generator: torch.Generator) -> Any:
        """A seeded random ``fraction`` of ``split`` (shuffled, at least one sample)."""

    def concat(self, *splits: Any) -> Any:
        """The splits one after another."""


@dataclass(frozen=True)
class Recipe:
    """What one training run of a method does: ``data`` from the protocol's sets, ascended
    (``direction=-1``) or descended, with an optional l1 penalty and saliency mask sparsity."""

    data: Any
    direction: int = 1
    l1_alpha: float = 0.0
    saliency_sparsity: float | None = None


class TrainingMethod:
    """Base class: set ``name``, ``needs`` and ``defaults``; override ``recipe`` (and ``check`` for
    parameter ranges). Instances hold validated parameters; they never touch a model."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({FORGET})
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, **params: float) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"unknown {self.name} parameter {unknown[0]!r}; known: {known}")
        self.params = {**self.defaults, **params}
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the parameter when a value is out of range."""

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        raise NotImplementedError


def fraction_in_unit_interval(method: str, name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{method}.{name} must be in (0, 1], got {value}")
