"""The methods NegMerge is compared with. Merges are pure functions of task vectors."""

from baselines.registry import MERGES, get_merge

__all__ = ["MERGES", "get_merge"]
