"""Zero-shot classification heads: per class, encode every template, L2-normalise, average,
renormalise (DESIGN.md §1). Built once per (backbone, classes, templates) and cached on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bench.backbones import Backbone
from bench.locks import locked_compute
from negmerge import save_state


@torch.no_grad()
def build_head(backbone: Backbone, classnames: list[str], templates: list[str]) -> torch.Tensor:
    rows = []
    for name in classnames:
        texts = [t.replace("{c}", name) if "{c}" in t else t.format(name) for t in templates]
        emb = backbone.model.encode_text(backbone.tokenizer(texts))
        emb = F.normalize(emb, dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def cached_head(
    backbone: Backbone, backbone_id: str, classnames: list[str], templates: list[str], cache: Path
) -> torch.Tensor:
    key = hashlib.sha256(json.dumps([backbone_id, classnames, templates]).encode()).hexdigest()[:16]
    path = cache / "heads" / f"{key}.safetensors"

    def compute() -> torch.Tensor:
        head = build_head(backbone, classnames, templates)
        save_state({"head": head}, path)
        return head

    return locked_compute(path, lambda: load_file(path)["head"] if path.is_file() else None, compute)[0]


class ZeroShotClassifier(torch.nn.Module):
    """Image encoder + frozen head: logits = logit_scale.exp() * normalize(f(x)) @ head.T."""

    def __init__(self, visual: torch.nn.Module, head: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("head", head)
        self.scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(self.visual(x), dim=-1) @ self.head.T
