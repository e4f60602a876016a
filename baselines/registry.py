"""Every unlearning method the benchmark knows, in one table that the config, both protocols and the
report read. Adding a method is one module in ``baselines/`` plus one ``register`` line below.

Kinds: ``reference`` rows are models, not methods (zero-shot, Original, Retrain); ``single`` is one
task vector (the best of the pool, or the single run at the grid's default setting); ``merge``
combines the candidate pool's task vectors (a function of them); ``training`` trains a model (a
``TrainingMethod`` class); ``sharded`` is an ensemble trained from scratch on shards of the training
set (SISA, ``baselines.sisa``): its settings are a section of the suite named after it, and only a
protocol listed in ``protocols`` runs it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from baselines.average import average_merge
from baselines.dare import dare_merge
from baselines.ft import FineTune
from baselines.ga import GradientAscent
from baselines.iso_c import iso_c_merge
from baselines.l1_sparse import L1Sparse
from baselines.magmax import magmax_merge
from baselines.rl import RandomLabel
from baselines.salun import SalUn
from baselines.ties import ties_merge
from baselines.training import TrainingMethod
from negmerge.errors import MergeInputError
from negmerge.merge import sign_consensus_merge

MergeFn = Callable[..., dict[str, torch.Tensor]]
Kind = Literal["reference", "single", "merge", "training", "sharded"]
TASK_VECTOR_KINDS = ("single", "merge")  # the methods built from the candidate pool


@dataclass(frozen=True)
class Method:
    """One row of the benchmark. ``display`` is LaTeX (tables); ``plain`` is for figures and Markdown."""

    name: str
    kind: Kind
    display: str
    colour: str
    merge: MergeFn | None = None
    training: type[TrainingMethod] | None = None
    protocols: tuple[str, ...] = ()  # references and single: where they exist; merges/training: derived
    role: Literal["", "before", "target"] = ""  # references: the model before unlearning, or its target
    # single task vectors: the candidate whose selected point forgets most ("best", which needs the
    # whole sweep), or the one fine-tune at the grid's default setting ("default", no sweep)
    candidate: Literal["best", "default"] = "best"
    emphasis: bool = False  # the method this benchmark is about (a star in figures)
    # merges only: each output element depends on the candidates' values at that element alone, so the
    # merge of a subset of keys equals that subset of the whole merge (``negmerge-bench merge`` then
    # streams it one output shard at a time); False is always correct (TIES's cut is global)
    elementwise: bool = False

    @property
    def plain(self) -> str:
        return self.display.replace(r"$\ell_1$", "l1")

    def parameters(self) -> tuple[str, ...]:
        """The parameter names a suite may set (``merge_params`` / ``baseline_params``)."""
        if self.merge is not None:
            return tuple(p for p in inspect.signature(self.merge).parameters if p != "task_vectors")
        if self.training is not None:
            return tuple(self.training.defaults)
        return ()

    def resolved(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with every default filled in: what actually runs, and so what identifies a result
        (a suite that spells out a default and one that leaves it out share their cache entries)."""
        if self.merge is not None:
            signature = inspect.signature(self.merge).parameters
            defaults = {n: p.default for n, p in signature.items() if p.default is not inspect.Parameter.empty}
            return {**defaults, **params}
        if self.training is not None:
            return {**self.training.defaults, **params}
        return dict(params)

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise ValueError naming the culprit: a merge runs once on a two-element toy pool (a bad ``k``
        fails at load, not after the pool is fine-tuned); a training method validates its values."""
        unknown = sorted(set(params) - set(self.parameters()))
        if unknown:
            known = ", ".join(self.parameters()) or "none"
            raise ValueError(f"unknown {self.name} parameter {unknown[0]!r}; known: {known}")
        if self.merge is not None:
            toy = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, -1.0])}]
            try:
                self.merge(toy, **params)
            except (MergeInputError, TypeError, ValueError) as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        elif self.training is not None:
            self.training(**params)

    def offered_by(self, protocol: str, supplies: frozenset[str]) -> bool:
        """Whether ``protocol`` (supplying ``supplies`` to training methods) can run this method."""
        if self.kind == "merge":
            return True
        if self.kind == "training":
            return self.training.needs <= supplies
        return protocol in self.protocols


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method``; a name registered twice is a mistake, not an override."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if (method.kind == "merge") != (method.merge is not None) or (method.kind == "training") != (
        method.training is not None
    ):
        raise ValueError(f"method {method.name!r}: a merge needs merge=, a training method needs training=")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register toy methods clean up with this)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name suggests the closest known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown method {name!r}{hint} (known: {', '.join(_REGISTRY)})") from None


def find_method(name: str) -> Method | None:
    return _REGISTRY.get(name)


def all_methods(kind: Kind | None = None) -> Iterator[Method]:
    """Registered methods in registration order (the order of table rows and legends)."""
    return (m for m in _REGISTRY.values() if kind is None or m.kind == kind)


def get_merge(name: str) -> MergeFn:
    """The merge function called ``name``; unknown names list the known merges."""
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None or method.merge is None:
        known = ", ".join(sorted(m.name for m in all_methods("merge")))
        raise MergeInputError(f"unknown merge {name!r}; known merges: {known}")
    return method.merge


class _MergeView(Mapping[str, MergeFn]):
    """``MERGES``: the registered merges as a read-only name -> function mapping."""

    def __getitem__(self, name: str) -> MergeFn:
        method = _REGISTRY.get(name)
        if method is None or method.merge is None:
            raise KeyError(name)
        return method.merge

    def __iter__(self) -> Iterator[str]:
        return (m.name for m in all_methods("merge"))

    def __len__(self) -> int:
        return sum(1 for _ in all_methods("merge"))


MERGES: Mapping[str, MergeFn] = _MergeView()

# -- the methods, in table order ----------------------------------------------------------------------
register(Method("zeroshot", "reference", "Zero-shot", "black", protocols=("clip",), role="before"))
register(Method("original", "reference", "Original", "black", protocols=("classic",), role="before"))
register(Method("retrain", "reference", "Retrain", "0.45", protocols=("classic",), role="target"))
register(Method("ft", "training", "FT", "tab:cyan", training=FineTune))
register(Method("ga", "training", "GA", "tab:olive", training=GradientAscent))
register(Method("rl", "training", "RL", "tab:pink", training=RandomLabel))
register(Method("l1_sparse", "training", r"$\ell_1$-sparse", "#7f7f00", training=L1Sparse))
register(Method("salun", "training", "SalUn", "#17becf", training=SalUn))
register(Method("sisa", "sharded", "SISA", "darkgoldenrod", protocols=("classic",)))
register(Method("single_best", "single", "Single best TA", "tab:purple", protocols=("clip", "classic")))
register(Method("single_run", "single", "Single run TA", "#c5b0d5", protocols=("clip", "classic"), candidate="default"))
register(Method("average", "merge", "Uniform merge", "tab:blue", merge=average_merge, elementwise=True))
register(Method("ties", "merge", "TIES", "tab:orange", merge=ties_merge))
register(Method("magmax", "merge", "MagMax", "tab:green", merge=magmax_merge, elementwise=True))
register(Method("dare", "merge", "DARE", "tab:brown", merge=dare_merge))
register(Method("iso_c", "merge", "Iso-C", "navy", merge=iso_c_merge))
register(
    Method("negmerge", "merge", "NegMerge", "tab:red", merge=sign_consensus_merge, emphasis=True, elementwise=True)
)
