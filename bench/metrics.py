"""Metric definitions shared by both protocols (docs/metrics.md): membership inference and Avg. Gap.

MIA-efficacy (SalUn): an SVC(C=3, gamma="auto", rbf) is trained on one feature, the softmax
probability of the true label, to tell members (label 1) from non-members (label 0); the score is the
percentage of *target* samples it calls non-member. Higher = the target looks less like training data.
Member and non-member counts are fixed explicitly (and balanced) so a subsampled evaluation cannot
silently change the attacker.

Loss-attack AUC: threshold-free ROC AUC of "member" scored by -loss; 50 = no leakage.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F


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
    from sklearn.svm import SVC  # here, not at import: sklearn costs seconds in every worker and CLI call

    # random_state fixed: sklearn's fit draws a libsvm seed from numpy's *global* RNG otherwise (unused
    # without probability estimates), and a fine-tune in another thread reads that RNG for RandAugment
    attacker = SVC(C=3, gamma="auto", kernel="rbf", random_state=0)
    attacker.fit(x, y)
    predicted = attacker.predict(target_prob.numpy().reshape(-1, 1))
    return 100.0 * float((predicted == 0).mean())


def preload() -> None:
    """Import the attack's sklearn modules now, in the calling thread. Their import draws from Python's
    global RNG, which a fine-tune running beside the scoring thread reads for RandAugment: a process
    that scores while it fine-tunes imports them before either starts."""
    import sklearn.metrics  # noqa: F401
    import sklearn.svm  # noqa: F401


def loss_attack_auc(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> float:
    """ROC AUC (percent) of separating members from non-members by low loss."""
    from sklearn.metrics import roc_auc_score

    scores = -np.concatenate([member_loss.numpy(), nonmember_loss.numpy()])
    labels = np.concatenate([np.ones(len(member_loss)), np.zeros(len(nonmember_loss))])
    return 100.0 * float(roc_auc_score(labels, scores))


GAP_METRICS = ("retain_acc", "forget_acc", "test_acc", "mia_efficacy")  # the four Avg. Gap is taken over


def avg_gap(metrics: Mapping[str, float], retrain: Mapping[str, float]) -> float:
    """Mean over {Dr, Df, Dtest, MIA-efficacy} of |method - Retrain| (docs/metrics.md#avg-gap)."""
    return float(np.mean([abs(metrics[m] - retrain[m]) for m in GAP_METRICS]))


def true_label_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


Scored = tuple[torch.Tensor, torch.Tensor]  # (logits, labels) of a set of samples


def membership_metrics(
    shadow: Scored, nonmembers: Scored, targets: Scored, exposed: Scored, *, max_per_class: int | None, seed: int
) -> dict[str, float]:
    """Both MIA numbers of a model, one definition for both protocols.

    ``mia_efficacy``: the SVC attacker learns members (``shadow``) from ``nonmembers``, then scores
    ``targets`` (the forget samples it must not recognise). ``mia_auc``: loss attack separating
    ``exposed`` (samples the model was trained on) from ``nonmembers``.
    """
    return {
        "mia_efficacy": mia_efficacy(
            true_label_prob(*shadow),
            true_label_prob(*nonmembers),
            true_label_prob(*targets),
            max_per_class=max_per_class,
            seed=seed,
        ),
        "mia_auc": loss_attack_auc(per_sample_loss(*exposed), per_sample_loss(*nonmembers)),
    }
