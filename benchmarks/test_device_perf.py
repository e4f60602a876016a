"""Overheads of the harness over bare PyTorch, on this machine's device (``./dev nox -s perf``):

(a) one lambda point of a sweep (apply theta_0 - lam * tau in place + zero-shot logits over a split)
    vs a bare forward pass of the image encoder over the same images at the same batch size
    (target <= 1.15x), for the mini backbone and a random-init ViT-B-32 at 224 on a small split;
(b) one fine-tuning step of ``bench.finetune`` vs a bare forward + backward + AdamW step on the same
    batch (target <= 1.2x).
Figures, not assertions; the ratios are printed at the end. Best of several repeats, the two sides
of a ratio interleaved (this machine's speed drifts by tens of percent within minutes).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from bench.backbones import load_backbone, visual_state
from bench.data import ImageSplit
from bench.evaluate import Evaluator, top1
from bench.finetune import FinetuneParams, finetune

RESULTS: dict[str, float] = {}
CASES = {"mini-clip-vit": (2048, 512, 64), "ViT-B-32": (64, 32, 16)}  # images, eval batch, train batch


def _best(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _best_interleaved(a, b, repeats: int = 5) -> tuple[float, float]:
    """Best times of ``a`` and ``b``, run in turns: a drift of the machine's speed hits both alike."""
    a(), b()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    name = request.param
    n, eval_batch, train_batch = CASES[name]
    backbone = load_backbone(name, None)
    size = backbone.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    split = ImageSplit(labels=torch.randint(0, 10, (n,)), images=images)
    head = F.normalize(torch.randn(10, backbone.model.text_projection.shape[1]), dim=-1)
    yield name, backbone, split, head, eval_batch, train_batch
    _summary(name)


def test_lambda_point_vs_bare_forward(benchmark, case):
    name, backbone, split, head, eval_batch, _ = case
    theta0 = visual_state(backbone)
    tau = {k: 0.01 * torch.randn_like(v) for k, v in theta0.items()}
    ev = Evaluator(backbone, batch_size=eval_batch)
    ev.set_base(theta0)

    def lambda_point():
        ev.load_edit(tau, -0.5)
        top1(ev.logits(split, head), split.labels)

    visual = ev.visual
    inputs = [backbone.to_input(split.images[s : s + eval_batch]) for s in range(0, len(split), eval_batch)]

    @torch.no_grad()
    def bare():
        for x in inputs:
            visual(x)

    point, bare_forward = benchmark.pedantic(lambda: _best_interleaved(lambda_point, bare), rounds=1)
    RESULTS[f"{name} lambda point"], RESULTS[f"{name} bare forward"] = point, bare_forward


def test_finetune_step_vs_bare_step(benchmark, case):
    name, backbone, split, head, _, train_batch = case
    steps = 10
    params = FinetuneParams(lr=1e-5, batch_size=train_batch, steps=steps, warmup_steps=1)
    RESULTS[f"{name} finetune step"] = (
        benchmark.pedantic(lambda: _best(lambda: finetune(backbone, head, split, params, progress=False), 3), rounds=1)
        / steps
    )
    import copy

    visual = copy.deepcopy(backbone.visual).train()
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-5)
    x = backbone.to_input(split.images[:train_batch])
    y = split.labels[:train_batch]
    scale = backbone.model.logit_scale.exp().item()

    def bare_steps():
        for _ in range(steps):
            loss = F.cross_entropy(scale * F.normalize(visual(x), dim=-1) @ head.T, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    RESULTS[f"{name} bare step"] = _best(bare_steps, 3) / steps


def _summary(name: str) -> None:
    r = RESULTS
    if f"{name} lambda point" in r and f"{name} bare forward" in r:
        ratio = r[f"{name} lambda point"] / r[f"{name} bare forward"]
        print(
            f"\n{name}: lambda point {r[f'{name} lambda point']:.3f} s vs bare forward "
            f"{r[f'{name} bare forward']:.3f} s = {ratio:.2f}x (target <= 1.15)"
        )
    if f"{name} finetune step" in r and f"{name} bare step" in r:
        ratio = r[f"{name} finetune step"] / r[f"{name} bare step"]
        print(
            f"{name}: fine-tuning step {r[f'{name} finetune step'] * 1e3:.1f} ms vs bare step "
            f"{r[f'{name} bare step'] * 1e3:.1f} ms = {ratio:.2f}x (target <= 1.2)"
        )
