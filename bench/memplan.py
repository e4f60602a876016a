"""Estimated device-memory peak of a Protocol A run, per stage, for ``negmerge-bench plan``.

Counted, not looked up: parameter bytes of the suite's backbone, the bytes a training forward saves
for backward and the largest activation of an eval forward (one image, on the CPU, random weights:
neither depends on them), the split sizes of the plan. What the evaluator holds is simulated with the
rule ``bench.evaluate.Residency`` applies (first come, first held, within the budget; a dataset's
splits released after its stages), next to what the code before issue 29 held (every uint8 split
uploaded and kept for the whole run, pinned whole on the host; 1 GiB of converted inputs, never
released). An estimate: allocator fragmentation, cuDNN/cuBLAS workspaces and the CUDA context
(~0.5 GB) come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GB = 1e9
ASSUMED_GPU_BYTES = 80 * (1 << 30)  # a plan made without the GPU at hand: an 80 GB A100 / H100
OLD_INPUT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EncoderBytes:
    visual: int  # fp32 parameters of the image encoder
    model: int  # the whole CLIP model (the text tower builds the heads on the device)
    saved_per_image: int  # what a training forward keeps for backward, per image
    eval_per_image: int  # the largest live activations of an eval forward, per image (input + 2 outputs)
    image_size: int


def encoder_bytes(model_name: str) -> EncoderBytes:
    from bench.backbones import load_backbone

    backbone = load_backbone(model_name, None)
    visual, size = backbone.visual, backbone.image_size
    x = torch.zeros(1, 3, size, size)

    def saved_bytes(batch: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            visual(x.expand(batch, -1, -1, -1).contiguous())
        return sum(seen.values())

    saved = saved_bytes(2) - saved_bytes(1)  # per image: the weights it also saves cancel
    largest = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.nbytes)

    handles = [m.register_forward_hook(hook) for m in visual.modules()]
    with torch.no_grad():
        visual(x)
    for h in handles:
        h.remove()
    nbytes = sum(p.nbytes for p in visual.parameters())
    return EncoderBytes(nbytes, sum(p.nbytes for p in backbone.model.parameters()), saved, x.nbytes + 2 * largest, size)


def _held(offers: list[tuple[str, str, int]], budget: float, inputs_budget: float, held: dict) -> None:
    """Admit (name, kind, bytes) offers first come, first held: uint8 within ``budget``, converted inputs
    within ``inputs_budget`` and ``budget`` (the fix counts both against one budget)."""
    for name, kind, nbytes in offers:
        if (name, kind) in held:
            continue
        inputs = sum(b for (_, k), b in held.items() if k == "inputs")
        if sum(held.values()) + nbytes <= budget and (kind != "inputs" or inputs + nbytes <= inputs_budget):
            held[(name, kind)] = nbytes


def memory_plan(cfg, sizes: dict, enc: EncoderBytes, budget: int | None = None) -> dict[str, dict[str, float]]:
    """{stage: {"before": bytes, "after": bytes}}: the peak of each stage over the run."""
    from bench.evaluate import RESIDENT_FRACTION

    if budget is None:
        budget = (
            int(cfg.eval_resident_gb * (1 << 30))
            if cfg.eval_resident_gb
            else int(RESIDENT_FRACTION * ASSUMED_GPU_BYTES)
        )
    u8 = 3 * enc.image_size**2
    f32 = 4 * u8
    ctrl = sizes[cfg.control]
    eval_batch = cfg.eval_batch_size
    train_batch = max(p.batch_size for p in cfg.finetune.points(cfg.seeds[0]))
    eval_weights = 3 * enc.visual  # the lane's encoder, theta_0, the task vector being swept
    eval_act = eval_batch * (enc.eval_per_image + f32)  # a converted batch and the forward's activations
    train = 4 * enc.visual + train_batch * (enc.saved_per_image + f32)  # weights, grads, AdamW m and v
    peaks = {s: {"before": 0.0, "after": 0.0} for s in ("heads", "lambda sweep", "fine-tune", "test + MIA")}
    pinned_before = 0

    def split_offers(name: str, split: str, n: int) -> list[tuple[str, str, int]]:
        return [(f"{name}/{split}", "uint8", n * u8), (f"{name}/{split}", "inputs", n * f32)]

    for version in ("before", "after"):
        held: dict = {}
        limit = float("inf") if version == "before" else budget
        inputs_limit = OLD_INPUT_CACHE_BYTES if version == "before" else budget
        for name in cfg.forget:
            s = sizes[name]
            sweep = split_offers(name, "val", s.val) + split_offers(cfg.control, "val", ctrl.val)
            test = split_offers(name, "test", s.test) + split_offers(cfg.control, "test", ctrl.test)
            if cfg.mia.enabled:
                test += split_offers(name, "train", s.train)
            resident = sum(held.values())
            peaks["heads"][version] = max(peaks["heads"][version], resident + eval_weights + enc.model)
            _held(sweep, limit, inputs_limit, held)
            resident = sum(held.values())
            stage = peaks["lambda sweep"]
            stage[version] = max(stage[version], resident + eval_weights + eval_act)
            stage = peaks["fine-tune"]
            stage[version] = max(stage[version], resident + eval_weights + train)
            _held(test, limit, inputs_limit, held)
            stage = peaks["test + MIA"]
            stage[version] = max(stage[version], sum(held.values()) + eval_weights + eval_act)
            if version == "before":
                pinned_before = sum(1 << max(0, (b - 1).bit_length()) for (_, k), b in held.items() if k == "uint8")
            else:  # the dataset's stages are done: its splits leave the device, the control's stay
                held = {k: v for k, v in held.items() if k[0].startswith(f"{cfg.control}/")}
    peaks["pinned host memory"] = {"before": float(pinned_before), "after": float(2 * eval_batch * u8)}
    peaks["budget"] = {"before": float("inf"), "after": float(budget)}
    return peaks


def format_memory(peaks: dict[str, dict[str, float]], enc: EncoderBytes) -> str:
    budget = peaks["budget"]["after"]
    lines = [
        f"device memory, estimated peak per stage (fp32 weights; image encoder {enc.visual / GB:.2f} GB; "
        f"evaluator residency budget {budget / GB:.1f} GB; before = the code before issue 29):",
        f"  {'stage':20s} {'before':>10s} {'after':>10s}",
    ]
    for stage, v in peaks.items():
        if stage != "budget":
            lines.append(f"  {stage:20s} {v['before'] / GB:>8.1f} GB {v['after'] / GB:>7.1f} GB")
    return "\n".join(lines)
