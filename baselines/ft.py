"""Fine-tuning (FT): keep training on the retain set only, so the forget set fades (catastrophic
forgetting as unlearning)."""

from __future__ import annotations

from baselines.training import FORGET, RETAIN, Recipe, TrainingMethod, UnlearningSets


class FineTune(TrainingMethod):
    name = "ft"
    needs = frozenset({FORGET, RETAIN})

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        return Recipe(sets.retain)
