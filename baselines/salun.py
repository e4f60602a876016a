"""SalUn (Fan et al. 2024): random labelling (``baselines.rl``) with updates restricted to the
weights whose forget-loss gradient is largest (a saliency mask keeping the top ``1 - sparsity``)."""

from __future__ import annotations

from baselines.rl import relabelled_mix
from baselines.training import (
    FORGET,
    RELABEL,
    RETAIN,
    SALIENCY,
    Recipe,
    TrainingMethod,
    UnlearningSets,
    fraction_in_unit_interval,
)


class SalUn(TrainingMethod):
    name = "salun"
    needs = frozenset({FORGET, RETAIN, RELABEL, SALIENCY})
    defaults = {"sparsity": 0.5, "retain_fraction": 1.0}

    def check(self) -> None:
        fraction_in_unit_interval(self.name, "retain_fraction", self.params["retain_fraction"])
        if not 0.0 <= self.params["sparsity"] < 1.0:
            raise ValueError(f"salun.sparsity must be in [0, 1), got {self.params['sparsity']}")

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        mix = relabelled_mix(sets, self.params["retain_fraction"], seed)
        return Recipe(mix, saliency_sparsity=self.params["sparsity"])
