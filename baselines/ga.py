"""Gradient ascent (GA): maximise the loss on the forget set. Both protocols offer it."""

from __future__ import annotations

from baselines.training import Recipe, TrainingMethod, UnlearningSets


class GradientAscent(TrainingMethod):
    name = "ga"

    def recipe(self, sets: UnlearningSets, seed: int) -> Recipe:
        return Recipe(sets.forget, direction=-1)
