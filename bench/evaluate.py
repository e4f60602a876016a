"""Batched, no-grad evaluation: the hot path of a run (every lambda of every method).

Images held as uint8 tensors (in memory, or memory-mapped from the preprocessing cache for
file-backed splits) are converted to the encoder's normalised float input once per split, where that
fits ``INPUT_CACHE_BYTES``, and batch by batch otherwise; the classifier is built once and its
weights swapped in place per lambda, so a grid point costs only the forward passes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bench.backbones import Backbone
from bench.data.registry import ImageSplit
from bench.device import CPU, Runtime

# Normalised float inputs kept per evaluator family (an evaluator and its lanes share them). A sweep
# feeds the same images 20+ times; converting them once saves a few percent of a small encoder's
# forward (nothing next to a ViT-B's). Past the budget (ViT-L at 224: 0.6 MB per image) splits are
# converted batch by batch, as before: the same elementwise ops either way, so the same bits.
INPUT_CACHE_BYTES = 1 << 30


class Evaluator:
    """Owns one working copy of the image encoder on the run's device.

    ``load(state)`` copies weights in; ``load_edit(tau, coef)`` writes theta_0 + coef * tau straight
    into the resident parameters (theta_0 and tau live on the device: no state-dict rebuild, no disk
    read per lambda point; the same float32 ops as ``negmerge.apply``, so the same bits). uint8 splits
    move to the device once and stay there; batches are converted there under the run's autocast.
    """

    def __init__(self, backbone: Backbone, batch_size: int = 512, runtime: Runtime = CPU) -> None:
        import copy

        self.backbone = backbone
        self.rt = runtime
        self.visual = copy.deepcopy(backbone.visual).to(runtime.device).eval()
        self.params = dict(self.visual.state_dict(keep_vars=True))
        self.scale = backbone.model.logit_scale.exp().item()
        self.batch_size = batch_size
        self.forward = torch.compile(self.visual) if runtime.compile else self.visual
        self._theta0: dict[str, torch.Tensor] | None = None
        self._tau_source: Mapping[str, torch.Tensor] | None = None
        self._tau_resident: dict[str, torch.Tensor] = {}
        self._resident: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs = _InputCache(INPUT_CACHE_BYTES)

    def replica(self) -> Evaluator:
        """Another evaluator with its own copy of the encoder, sharing theta_0 and the resident splits
        (read-only): a lane of ``bench.lanes`` that can run a lambda point while this one runs another."""
        twin = Evaluator(self.backbone, self.batch_size, self.rt)
        twin._theta0, twin._resident, twin._inputs = self._theta0, self._resident, self._inputs
        return twin

    def set_base(self, theta0: Mapping[str, torch.Tensor]) -> None:
        """theta_0, kept on the device for ``load_edit``."""
        self._theta0 = {k: v.detach().to(self.rt.device, torch.float32) for k, v in theta0.items()}

    @torch.no_grad()
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.params.keys():
            self.visual.load_state_dict(state, strict=True)  # names the missing / unexpected keys
        for k, p in self.params.items():
            p.copy_(state[k])

    @torch.no_grad()
    def load_edit(self, tau: Mapping[str, torch.Tensor], coef: float) -> None:
        """Weights = theta_0 + coef * tau, in place (theta_0 from ``set_base``)."""
        if self._theta0 is None:
            raise RuntimeError("load_edit needs set_base(theta_0) first")
        resident = self._resident_vector(tau)
        for k, p in self.params.items():
            base = self._theta0[k]
            if k in resident:
                torch.add(base, torch.mul(resident[k], float(coef)), out=p)
            else:
                p.copy_(base)

    def _resident_vector(self, tau: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The task vector on the device, checked once (a sweep applies the same vector 20+ times)."""
        if self._tau_source is not tau:
            moved = {}
            for k, v in tau.items():
                d = v.detach().to(self.rt.device, torch.float32, non_blocking=True)
                if not math.isfinite(d.sum().item()) and not torch.isfinite(d).all():
                    raise ValueError(f"task vector: key {k!r} contains NaN or Inf")
                moved[k] = d
            self._tau_source, self._tau_resident = tau, moved
        return self._tau_resident

    def _on_device(self, split: ImageSplit) -> torch.Tensor:
        if not self.rt.on_accelerator:
            return split.images
        key = id(split.images)
        if key not in self._resident or self._resident[key][0] is not split.images:
            self._resident[key] = (split.images, split.images.pin_memory().to(self.rt.device, non_blocking=True))
        return self._resident[key][1]

    @torch.no_grad()
    def logits(self, split: ImageSplit, head: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """float32 logits on the CPU, whatever the device and precision; ``rows``: of those images only
        (sliced from the resident copy, so a part of a split is not uploaded again)."""
        if split.file_backed:
            raise ValueError("file-backed split: decode it once with bench.data.prepare_eval before evaluating")
        images = self._on_device(split)
        per_image = 3 * self.backbone.image_size**2 * 4  # to_input's float32 (3, S, S)
        inputs = self._inputs.get(images, self.backbone.to_input, self.batch_size, per_image)
        source = images[rows] if inputs is None else inputs[rows]
        head = head.to(self.rt.device)
        outs = []
        for start in range(0, len(source), self.batch_size):
            batch = source[start : start + self.batch_size]
            x = self.backbone.to_input(batch) if inputs is None else batch
            with self.rt.autocast():
                features = self.forward(x)
            outs.append((self.scale * F.normalize(features.float(), dim=-1) @ head.T).cpu())
        return torch.cat(outs)


class _InputCache:
    """Normalised inputs of whole splits, within a byte budget (thread-safe: lanes share one)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(images) -> (images, inputs)
        self._lock = threading.Lock()

    def get(self, images: torch.Tensor, convert, batch_size: int, per_image: int) -> torch.Tensor | None:
        """The converted split (``per_image`` bytes an image), or None when it does not fit what is
        left of the budget."""
        with self._lock:
            entry = self._entries.get(id(images))
            if entry is not None and entry[0] is images:
                return entry[1]
            if len(images) == 0:
                return None
            used = sum(inputs.nbytes for _, inputs in self._entries.values())
            if used + per_image * len(images) > self.budget:
                return None
            inputs = torch.cat([convert(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])
            self._entries[id(images)] = (images, inputs)
            return inputs


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()
