"""Host-device syncs per training step and per lambda point (``bench.syncs``), on this machine's device:
a Protocol A fine-tune of the mini encoder, a Protocol B SGD run, and a lambda sweep over a forget and
a control split. ``python benchmarks/sync_counts.py [cpu|cuda] [--json FILE]``. The GPU check runs the
same measurement on CUDA (``benchmarks/gpu_check.py``)."""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from bench.backbones import load_backbone, visual_state
from bench.data import ImageSplit
from bench.device import resolve_runtime
from bench.syncs import count_syncs


def _per(fn, n_small: int, n_large: int, device) -> tuple[float, dict[str, float]]:
    """Syncs per unit of work made by the project's lines (the difference of two run lengths, so
    one-off setup syncs cancel), and every site's count per unit (torch's own too)."""
    with count_syncs(device) as small:
        fn(n_small)
    with count_syncs(device) as large:
        fn(n_large)
    steps = n_large - n_small
    sites = {k: (v - small.sites.get(k, 0)) / steps for k, v in large.sites.items() if v != small.sites.get(k, 0)}
    return (large.in_project - small.in_project) / steps, sites


def measure(device: str = "cpu", backbone_name: str = "mini-clip-vit") -> dict[str, object]:
    from bench.classic_train import SgdParams, train
    from bench.classifiers import build_classifier
    from bench.data.classic import ClassicData
    from bench.evaluate import Evaluator
    from bench.finetune import FinetuneParams, finetune

    rt = resolve_runtime(device)
    torch.manual_seed(0)
    backbone = load_backbone(backbone_name, None)
    size = backbone.image_size
    n = 64
    split = ImageSplit(
        labels=torch.randint(0, 10, (n,)), images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    )
    width = backbone.model.text_projection.shape[1]
    head = F.normalize(torch.randn(10, width), dim=-1)

    def fine_tune(steps: int) -> None:
        params = FinetuneParams(steps=steps, batch_size=16, warmup_steps=1)
        finetune(backbone, head, split, params, progress=False, runtime=rt)

    x = torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (256,))
    data = ClassicData("fixture", 10, 3, (0.5,) * 3, (0.25,) * 3, x, y, x[:8], y[:8], x[:8], y[:8])

    def sgd(steps: int) -> None:
        torch.manual_seed(0)
        model = build_classifier("small-resnet", 10, 3, [4, 4, 4], image_size=16)
        params = SgdParams(epochs=steps / 8, batch_size=32, augment=True)
        train(model, data, x, y, params, progress=False, runtime=rt)

    theta0 = visual_state(backbone)
    tau = {k: 0.01 * torch.randn_like(v) for k, v in theta0.items()}
    control = ImageSplit(labels=split.labels, images=split.images.flip(0).contiguous())
    ev = Evaluator(backbone, batch_size=16, runtime=rt)
    ev.set_base(theta0)

    def sweep(points: int) -> None:
        for i in range(points):
            ev.load_edit(tau, -0.1 * (i + 1))
            ev.logits(split, head), ev.logits(control, head)

    sweep(1)  # uploads and converted inputs: a sweep's one-off work
    out: dict[str, object] = {"device": str(rt.device), "backbone": backbone_name, "eval_batches_per_point": 8}
    for name, fn, a, b in (
        ("finetune step", fine_tune, 4, 12),
        ("sgd step", sgd, 8, 24),
        ("lambda point", sweep, 2, 6),
    ):
        per, sites = _per(fn, a, b, rt.device)
        out[name] = {"syncs": per, "sites": sites}
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    target = args[args.index("--json") + 1] if "--json" in args else None
    figures = measure(args[0] if args and not args[0].startswith("--") else "cpu")
    text = json.dumps(figures, indent=2)
    print(text)
    if target:
        with open(target, "w") as fh:
            fh.write(text + "\n")
