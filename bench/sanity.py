"""Does a Protocol B run measure unlearning at all? (docs/protocols.md#protocol-b)

Unlearning is only visible when the Original remembers its training data and Retrain does not: then
Original's Df accuracy sits well above Retrain's, Retrain's Df accuracy is that of unseen data (close
to its test accuracy), and the membership attacker finds Df *less* often non-member in the Original
than in Retrain. When a suite breaks one of these, "do nothing" scores about as well as any method, and
the report says so rather than let a table suggest otherwise.
"""

from __future__ import annotations

import pandas as pd

MEMORISED = 99.0  # % training accuracy (Dr and Df) an Original must reach
MIN_FORGET_GAP = 5.0  # points Original's Df accuracy must exceed Retrain's
HELD_OUT_SLACK = 5.0  # points Retrain's Df accuracy may differ from its test accuracy (Df: a few hundred images)


def classic_sanity(results: pd.DataFrame) -> list[str]:
    """One line per broken expectation, on the seed means of the test-time metrics; [] when all hold."""
    test = results[(results.split == "test") & results.method.isin(["original", "retrain"])]
    mean = test.groupby(["method", "metric"]).value.mean()
    needed = [(m, k) for m in ("original", "retrain") for k in ("retain_acc", "forget_acc", "test_acc", "mia_efficacy")]
    if any(key not in mean.index for key in needed):
        return []  # a run without both references has nothing to check against
    original, retrain = mean["original"], mean["retrain"]
    problems = []
    if min(original["retain_acc"], original["forget_acc"]) < MEMORISED:
        problems.append(
            f"the Original does not memorise its training data (Dr {original['retain_acc']:.2f}, "
            f"Df {original['forget_acc']:.2f}; expected >= {MEMORISED:.0f}): there is little to unlearn"
        )
    gap = original["forget_acc"] - retrain["forget_acc"]
    if gap < MIN_FORGET_GAP:
        problems.append(
            f"the Original's Df accuracy is only {gap:.2f} points above Retrain's (expected >= {MIN_FORGET_GAP:.0f}): "
            "doing nothing is close to Retrain"
        )
    if abs(retrain["forget_acc"] - retrain["test_acc"]) > HELD_OUT_SLACK:
        problems.append(
            f"Retrain's Df accuracy {retrain['forget_acc']:.2f} is not that of held-out data "
            f"(its test accuracy is {retrain['test_acc']:.2f})"
        )
    if original["mia_efficacy"] >= retrain["mia_efficacy"]:
        problems.append(
            f"the membership attack does not see Df in the Original (MIA-efficacy {original['mia_efficacy']:.2f} "
            f">= Retrain's {retrain['mia_efficacy']:.2f})"
        )
    return problems
