"""Batched, no-grad evaluation: the hot path of a run (every lambda of every method).

What an evaluator keeps on its device, within one byte budget (``Residency``): uint8 splits (on an
accelerator) and their normalised float inputs (a sweep feeds the same images 20+ times; converting
them once saves a few percent of a small encoder's forward). A split that does not fit streams batch
by batch through a small pinned staging buffer; the same elementwise ops either way, so the same
bits. A run releases a dataset's splits when its stages are done (``release``), so a run over eight
datasets holds one dataset (and the control) at a time, not all of them. The classifier is built
once and its weights swapped in place per lambda, so a grid point costs only the forward passes; its
logits leave the device once per split.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from bench.backbones import Backbone
from bench.data.registry import ImageSplit
from bench.device import CPU, Runtime
from bench.linearized import tangent

# Budget of the normalised inputs on a CPU (an accelerator's default: RESIDENT_FRACTION of its memory,
# uint8 uploads included). Past it (ViT-L at 224: 0.6 MB per image) splits are converted batch by batch.
INPUT_CACHE_BYTES = 1 << 30
RESIDENT_FRACTION = 0.25


def resident_budget(runtime: Runtime, budget_gb: float | None = None) -> int:
    """Bytes an evaluator may keep on its device: ``budget_gb`` when given, else INPUT_CACHE_BYTES on a
    CPU and RESIDENT_FRACTION of the accelerator's memory (the rest: encoder copies, theta_0, task
    vectors, activations, fine-tuning)."""
    if budget_gb is not None:
        return int(budget_gb * (1 << 30))
    if runtime.on_accelerator:
        return int(RESIDENT_FRACTION * torch.cuda.get_device_properties(runtime.device).total_memory)
    return INPUT_CACHE_BYTES


class Evaluator:
    """Owns one working copy of the image encoder on the run's device.

    ``load(state)`` copies weights in; ``load_edit(tau, coef)`` writes theta_0 + coef * tau straight
    into the resident parameters (theta_0 and tau live on the device: no state-dict rebuild, no disk
    read per lambda point; the same float32 ops as ``negmerge.apply``, so the same bits);
    ``load_edit(tau, coef, linear=True)`` keeps theta_0 and evaluates the encoder's linearisation,
    f(x; theta_0) + J (coef * tau) (``bench.linearized``: the primal is the encoder's own forward,
    so coef = 0 gives its bits). Splits are
    held on the device within ``budget`` bytes (``Residency``); ``copy_splits``: upload uint8 splits
    (default: on an accelerator; a CPU evaluates the host tensors in place).
    """

    def __init__(
        self,
        backbone: Backbone,
        batch_size: int = 512,
        runtime: Runtime = CPU,
        budget: int | None = None,
        copy_splits: bool | None = None,
    ) -> None:
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
        self._delta: dict[str, torch.Tensor] | None = None  # a linear edit's coef * tau (None: the encoder)
        self._heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(head) -> (head, on the device)
        self.copy_splits = runtime.on_accelerator if copy_splits is None else copy_splits
        self.residency = Residency(resident_budget(runtime) if budget is None else budget)
        self._staging = _Staging(runtime.device)

    def replica(self) -> Evaluator:
        """Another evaluator with its own copy of the encoder, sharing theta_0 and the resident splits
        (read-only): a lane of ``bench.lanes`` that can run a lambda point while this one runs another."""
        twin = Evaluator(self.backbone, self.batch_size, self.rt, budget=0, copy_splits=self.copy_splits)
        twin._theta0, twin.residency = self._theta0, self.residency
        return twin

    def set_base(self, theta0: Mapping[str, torch.Tensor]) -> None:
        """theta_0, kept on the device for ``load_edit``."""
        self._theta0 = {k: v.detach().to(self.rt.device, torch.float32) for k, v in theta0.items()}

    def release(self, *splits: ImageSplit | None) -> None:
        """Drop what is held for these splits (a dataset whose stages are done)."""
        for split in splits:
            if split is not None and split.images is not None:
                self.residency.release(split.images)

    @torch.no_grad()
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.params.keys():
            self.visual.load_state_dict(state, strict=True)  # names the missing / unexpected keys
        self._delta = None
        for k, p in self.params.items():
            p.copy_(state[k])

    @torch.no_grad()
    def load_edit(self, tau: Mapping[str, torch.Tensor], coef: float, linear: bool = False) -> None:
        """Weights = theta_0 + coef * tau, in place (theta_0 from ``set_base``); ``linear``: weights
        theta_0, outputs f(theta_0) + J (coef * tau)."""
        if self._theta0 is None:
            raise RuntimeError("load_edit needs set_base(theta_0) first")
        resident = self._resident_vector(tau)
        self._delta = None
        if linear:
            unknown = sorted(set(resident) - set(self.params))
            if unknown:
                raise ValueError(f"task vector: key {unknown[0]!r} is not a parameter of the image encoder")
            for k, p in self.params.items():
                p.copy_(self._theta0[k])
            self._delta = {k: torch.mul(d, float(coef)) for k, d in resident.items()}
            return
        for k, p in self.params.items():
            base = self._theta0[k]
            if k in resident:
                torch.add(base, torch.mul(resident[k], float(coef)), out=p)
            else:
                p.copy_(base)

    def _resident_vector(self, tau: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The task vector on the device, checked once (a sweep applies the same vector 20+ times), with
        one host read for all its tensors."""
        if self._tau_source is not tau:
            moved = {k: v.detach().to(self.rt.device, torch.float32, non_blocking=True) for k, v in tau.items()}
            sums = torch.stack([d.sum() for d in moved.values()]) if moved else torch.zeros(0)
            if not math.isfinite(sums.sum().item()):  # a huge finite sum can overflow: then look closer
                for k, d in moved.items():
                    if not torch.isfinite(d).all():
                        raise ValueError(f"task vector: key {k!r} contains NaN or Inf")
            self._tau_source, self._tau_resident = tau, moved
        return self._tau_resident

    def _head(self, head: torch.Tensor) -> torch.Tensor:
        """The head on the device, uploaded once (a lambda point alternates the forget and control heads)."""
        held = self._heads.get(id(head))
        if held is None or held[0] is not head:
            if len(self._heads) >= 8:
                self._heads.clear()
            held = self._heads[id(head)] = (head, head.to(self.rt.device))
        return held[1]

    def _images(self, images: torch.Tensor) -> torch.Tensor | None:
        """The split on the device: the host tensor itself (no copy), a resident copy, or None (stream it)."""
        if not self.copy_splits:
            return images
        return self.residency.get_or_add(
            images, "uint8", images.nbytes, lambda: self._staging.upload(images, self.batch_size)
        )

    def _inputs(self, images: torch.Tensor, on_device: torch.Tensor | None) -> torch.Tensor | None:
        """The split's normalised inputs, converted once, if they fit what is left of the budget."""
        per_image = 3 * self.backbone.image_size**2 * 4  # to_input's float32 (3, S, S)

        def convert() -> torch.Tensor:
            return torch.cat([self.backbone.to_input(b) for b in self._batches(images, on_device, slice(None))])

        return self.residency.get_or_add(images, "inputs", per_image * len(images), convert)

    def _batches(self, images: torch.Tensor, on_device: torch.Tensor | None, rows: slice):
        """uint8 batches of ``images[rows]`` on the device: slices of the resident copy, or staged uploads."""
        source = (images if on_device is None else on_device)[rows]
        for start in range(0, len(source), self.batch_size):
            batch = source[start : start + self.batch_size]
            yield batch if on_device is not None or not self.copy_splits else self._staging.stage(batch)

    @torch.no_grad()
    def logits(self, split: ImageSplit, head: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """float32 logits on the CPU, whatever the device and precision; ``rows``: of those images only
        (sliced from the resident copy, so a part of a split is not uploaded again)."""
        if split.file_backed:
            raise ValueError("file-backed split: decode it once with bench.data.prepare_eval before evaluating")
        on_device = self._images(split.images)
        inputs = self._inputs(split.images, on_device) if len(split.images) else None
        head = self._head(head)
        if inputs is not None:
            sliced = inputs[rows]
            batches = (sliced[s : s + self.batch_size] for s in range(0, len(sliced), self.batch_size))
        else:
            batches = (self.backbone.to_input(b) for b in self._batches(split.images, on_device, rows))
        outs = []
        for x in batches:
            with self.rt.autocast():
                features = self.forward(x)
                if self._delta is not None:
                    features = features + tangent(self.visual, self.params, self._delta, x)
            outs.append(self.scale * F.normalize(features.float(), dim=-1) @ head.T)
        if not outs:
            return torch.zeros(0, len(head))
        return torch.cat(outs).cpu()  # one device-to-host copy per split


class Residency:
    """What evaluators keep on their device, within a byte budget (thread-safe: lanes share one).

    First come, first held: a split that does not fit what is left is not held (it streams), and
    nothing is evicted behind a run's back; a run releases a dataset's splits when it is done with
    them. ``used`` and ``peak`` count the bytes held (the budget bounds both)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.peak = 0
        self._entries: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (id(images), kind)
        self._lock = threading.Lock()

    def get_or_add(self, images: torch.Tensor, kind: str, nbytes: int, make) -> torch.Tensor | None:
        """The held ``kind`` of ``images`` (made by ``make`` if it fits), or None."""
        with self._lock:
            entry = self._entries.get((id(images), kind))
            if entry is not None and entry[0] is images:
                return entry[1]
            if nbytes == 0 or self.used + nbytes > self.budget:
                return None
            held = make()
            self._entries[(id(images), kind)] = (images, held)
            self.used += held.nbytes
            self.peak = max(self.peak, self.used)
            return held

    def release(self, images: torch.Tensor) -> None:
        with self._lock:
            for kind in ("uint8", "inputs"):
                entry = self._entries.get((id(images), kind))
                if entry is not None and entry[0] is images:
                    del self._entries[(id(images), kind)]
                    self.used -= entry[1].nbytes


class _Staging:
    """Host-to-device copies through two reused pinned buffers of one batch each, instead of pinning a
    whole split (the caching host allocator keeps a pinned block, rounded up to a power of two, for
    the life of the process). A buffer is refilled once the copy out of it has finished."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor] = []
        self._events: list[object] = []
        self._turn = 0

    def stage(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` (host uint8) as a tensor on the device."""
        flat = batch.reshape(-1)
        if len(self._buffers) < 2 or self._buffers[0].numel() < flat.numel():
            self._buffers = [torch.empty(flat.numel(), dtype=batch.dtype, pin_memory=self.pinned) for _ in range(2)]
            self._events = [None, None]
        i, self._turn = self._turn, 1 - self._turn
        if self._events[i] is not None:
            self._events[i].synchronize()  # the copy that last read this buffer is done
        buffer = self._buffers[i][: flat.numel()]
        buffer.copy_(flat)
        out = buffer.to(self.device, non_blocking=self.pinned)
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self._events[i] = event
        elif out.data_ptr() == buffer.data_ptr():
            out = out.clone()  # the same device: the buffer is reused, so hand out a copy
        return out.view(batch.shape)

    def upload(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A whole split on the device, staged batch by batch."""
        out = torch.empty(images.shape, dtype=images.dtype, device=self.device)
        for start in range(0, len(images), batch_size):
            out[start : start + batch_size].copy_(self.stage(images[start : start + batch_size]), non_blocking=True)
        return out


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()
