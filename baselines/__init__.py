"""The methods NegMerge is compared with, and the registry every part of the benchmark reads."""

from baselines.registry import (
    MERGES,
    TASK_VECTOR_KINDS,
    Method,
    all_methods,
    find_method,
    get_merge,
    get_method,
    register,
    unregister,
)
from baselines.training import Recipe, TrainingMethod

__all__ = [
    "MERGES",
    "TASK_VECTOR_KINDS",
    "Method",
    "Recipe",
    "TrainingMethod",
    "all_methods",
    "find_method",
    "get_merge",
    "get_method",
    "register",
    "unregister",
]
