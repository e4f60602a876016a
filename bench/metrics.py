"""Membership-inference metrics (DESIGN.md §3).

MIA-efficacy (SalUn): an SVC(C=3, gamma="auto", rbf) is trained on one feature, the softmax
probability of the true label, to tell members (label 1) from non-members (label 0); the score is the
percentage of *target* samples it calls non-member. Higher = the target looks less like training data.
Member and non-member counts are fixed explicitly (and balanced) so a subsampled evaluation cannot
silently change the attacker.

Loss-attack AUC: threshold-free ROC AUC of "member" scored by -loss; 50 = no leakage.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC


def _balanced(a: np.ndarray, b: np.ndarray, max_per_class: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b), max_per_class or max(len(a), len(b)))
    return rng.permutation(a)[:n], rng.permutation(b)[:n]


def mia_efficacy(
    member_prob: torch.Tensor,
    nonmember_prob: torch.Tensor,
    target_prob: torch.Tensor,
    *,
    max_per_class: int | None = 2000,
    seed: int = 0,
) -> float:
    """% of target samples the SVC attacker classifies as non-members."""
    members, nonmembers = _balanced(member_prob.numpy(), nonmember_prob.numpy(), max_per_class, seed)
    x = np.concatenate([members, nonmembers]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    attacker = SVC(C=3, gamma="auto", kernel="rbf")
    attacker.fit(x, y)
    predicted = attacker.predict(target_prob.numpy().reshape(-1, 1))
    return 100.0 * float((predicted == 0).mean())


def loss_attack_auc(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> float:
    """ROC AUC (percent) of separating members from non-members by low loss."""
    scores = -np.concatenate([member_loss.numpy(), nonmember_loss.numpy()])
    labels = np.concatenate([np.ones(len(member_loss)), np.zeros(len(nonmember_loss))])
    return 100.0 * float(roc_auc_score(labels, scores))
