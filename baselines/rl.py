"""Random labelling (RL): train on the forget set relabelled with random wrong classes, mixed with a
seeded ``retain_fraction`` of the retain set with true labels.

SalUn's RL mixes in all of Dr (fraction 1.0, the default): the wrong labels are then a tenth of the
data at 10% forgetting, so the model unlearns Df without losing Dr. Mixing in only |Df| retain samples
makes half the labels noise and collapses accuracy everywhere.
"""

from __future__ import annotations

import torch

from baselines.training import (
    FORGET,
    RELABEL,
    RETAIN,
    Recipe,
    TrainingMethod,
    UnlearningSets,
    fraction_in_unit_interval,
)


def relabelled_mix(sets: UnlearningSets, retain_fraction: float, seed: int):
    """Wrong-labelled forget set, then the retain sample: one generator, drawn in that order."""
    generator = torch.Generator().manual_seed(seed)
    wrong = sets.relabelled(sets.forget, generator)
    return sets.concat(wrong, sets.subsample(sets.retain, retain_fraction, generator))


class RandomLabel(TrainingMethod):
    name = "rl"
    needs = frozenset({FORGET, RETAIN, RELABEL})
    defaults = {"retain_fraction": 1.0}

    def check(self) -> None:
        fraction_in_unit_interval(self.name, "retain_fraction", self.params["retain_fraction"])

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        return Recipe(relabelled_mix(sets, self.params["retain_fraction"], seed))
