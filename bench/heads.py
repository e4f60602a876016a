"""Zero-shot classification heads: per class, encode every template, L2-normalise, average,
renormalise (docs/protocols.md#protocol-a). Built once per (backbone, classes, templates) and cached on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bench import numerics
from bench.backbones import Backbone
from bench.device import CPU, Runtime
from bench.integrity import intact_safetensors, quarantine
from bench.locks import locked_compute
from negmerge import save_state


@torch.no_grad()
def build_head(backbone: Backbone, classnames: list[str], templates: list[str], runtime: Runtime = CPU) -> torch.Tensor:
    """float32 head on the CPU; the text tower runs on the run's device (ImageNet: 1,000 classes x 80
    templates) and is moved back afterwards."""
    model = backbone.model.to(runtime.device)
    try:
        rows = []
        for name in classnames:
            texts = [t.replace("{c}", name) if "{c}" in t else t.format(name) for t in templates]
            with runtime.autocast():
                emb = model.encode_text(runtime.to(backbone.tokenizer(texts)))
            emb = F.normalize(emb.float(), dim=-1).mean(0)
            rows.append(F.normalize(emb, dim=-1).cpu())
    finally:
        backbone.model.to("cpu")
    return torch.stack(rows)


def cached_head(
    backbone: Backbone,
    backbone_id: str,
    classnames: list[str],
    templates: list[str],
    cache: Path,
    runtime: Runtime = CPU,
) -> torch.Tensor:
    key_parts = [backbone_id, classnames, templates, numerics.tag()]
    if runtime.precision != "fp32":
        key_parts.append(runtime.precision)  # fp32 keys stay what they were: the same bits as before
    if runtime.key():
        key_parts.append(runtime.key())  # device kind, compile, deterministic (a plain CPU run: none)
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    path = cache / "heads" / f"{key}.safetensors"

    def compute() -> torch.Tensor:
        head = build_head(backbone, classnames, templates, runtime)
        save_state({"head": head}, path)
        return head

    return locked_compute(path, lambda: _cached_tensor(path, "head"), compute)[0]


def _cached_tensor(path: Path, name: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    if not intact_safetensors(path):
        return None
    tensor = load_file(path).get(name)
    if tensor is None:
        quarantine([path], f"it holds no {name!r} tensor")
    return tensor


class ZeroShotClassifier(torch.nn.Module):
    """Image encoder + frozen head: logits = logit_scale.exp() * normalize(f(x)) @ head.T."""

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head)
        self.scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.visual(x), dim=-1) @ self.head.T
