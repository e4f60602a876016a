"""The protocols a suite can name (``protocol: clip | classic``), and what each supplies to
training-based methods. Runners and unit planners are named as ``module:attribute`` and imported only
when used, so the config (which validates methods against a protocol) imports no protocol code."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from baselines.training import FORGET, L1, RELABEL, RETAIN, SALIENCY


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    suite: str  # the pydantic config model
    runner: str  # class(cfg, out, cache, unit) with .run() -> RunRecorder
    units: str  # function(cfg) -> phases of work units (bench.units)
    supplies: frozenset[str]  # capabilities a training method may need (baselines.training)
    summary: str

    def load(self, attribute: str) -> Any:
        module, _, name = getattr(self, attribute).partition(":")
        return getattr(importlib.import_module(module), name)


PROTOCOLS: dict[str, ProtocolSpec] = {
    "clip": ProtocolSpec(
        "clip",
        "bench.config:ClipSuite",
        "bench.protocol_clip:ClipRun",
        "bench.units:clip_units",
        frozenset({FORGET}),
        "CLIP task negation: forget a dataset, keep a control dataset (docs/protocols.md#protocol-a)",
    ),
    "classic": ProtocolSpec(
        "classic",
        "bench.config:ClassicSuite",
        "bench.protocol_classic:ClassicRun",
        "bench.units:classic_units",
        frozenset({FORGET, RETAIN, RELABEL, L1, SALIENCY}),
        "random-data forgetting on a classifier, against Retrain (docs/protocols.md#protocol-b)",
    ),
}


def offered_methods(protocol: str) -> list[str]:
    """The registered methods ``protocol`` can run, in table order."""
    from baselines import all_methods

    spec = PROTOCOLS[protocol]
    return [m.name for m in all_methods() if m.offered_by(protocol, spec.supplies)]
