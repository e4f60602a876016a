"""l1-sparse (Jia et al. 2023): fine-tune on the retain set with an l1 penalty ``alpha`` on the weights."""

from __future__ import annotations

from baselines.training import FORGET, L1, RETAIN, Recipe, TrainingMethod, UnlearningSets


class L1Sparse(TrainingMethod):
    name = "l1_sparse"
    needs = frozenset({FORGET, RETAIN, L1})
    defaults = {"alpha": 5e-4}

    def check(self) -> None:
        if self.params["alpha"] < 0:
            raise ValueError(f"l1_sparse.alpha must be >= 0, got {self.params['alpha']}")

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        return Recipe(sets.retain, l1_alpha=self.params["alpha"])
