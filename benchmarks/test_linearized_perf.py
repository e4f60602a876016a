"""A linearised fine-tuning step against a bare jvp step and a standard step (``./dev nox -s perf``).

Three steps on the same batch, each zero-grad, forward, cross-entropy through a fixed zero-shot head,
backward and AdamW:

- linear: the harness's step (``bench.linearized.LinearizedEncoder`` inside ``ZeroShotClassifier``,
  gradient clipping as ``bench.finetune`` does): the encoder's own forward for the primal, then
  ``jvp`` over ``functional_call`` with attention routed through a per-thread torch-function mode;
- bare jvp: the least a jvp step can be: one ``torch.func.jvp`` whose primal and tangent are both
  used, the math attention kernel chosen by the global ``sdpa_kernel`` flag, no clipping (target:
  linear <= 1.2x this);
- standard: the encoder itself (what linear costs relative to ordinary fine-tuning).

For the mini encoder (mini-clip-vit at 28 px, batch 64) and a random-init ViT-B-32 at 224 px (batch
NEGMERGE_BENCH_LINEAR_BATCH, default 4: the shared 2-core machine; best of NEGMERGE_BENCH_LINEAR_ROUNDS,
default 3). One thread. Figures, not assertions.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.backbones import load_backbone
from bench.heads import ZeroShotClassifier
from bench.linearized import LinearizedEncoder

torch.set_num_threads(1)
BATCH_B32 = int(os.environ.get("NEGMERGE_BENCH_LINEAR_BATCH", "4"))
CASES = {"mini-clip-vit": (28, 64), "ViT-B-32": (224, BATCH_B32)}  # name -> (image size, batch)
ROUNDS = {"mini-clip-vit": 5, "ViT-B-32": int(os.environ.get("NEGMERGE_BENCH_LINEAR_ROUNDS", "3"))}
RESULTS: dict[tuple[str, str], float] = {}


def _setup(name: str):
    size, batch = CASES[name]
    backbone = load_backbone(name, None, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    width = backbone.visual.output_dim
    head = F.normalize(torch.randn(10, width, generator=g), dim=-1)
    return backbone.visual, x, y, head


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)


def _module_step(model: torch.nn.Module, head, x, y, clip: bool):
    clf = ZeroShotClassifier(model, head, 100.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(trainable)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(clf(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    return step


def _bare_jvp_step(visual: torch.nn.Module, head, x, y):
    skeleton = copy.deepcopy(visual).train()
    theta0 = {n: p.detach().clone() for n, p in skeleton.named_parameters()}
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in skeleton.named_parameters()}
    opt = _adamw(list(theta.values()))

    def f(params):
        return functional_call(skeleton, params, (x,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):
            out, dout = jvp(f, (theta0,), ({n: theta[n] - theta0[n] for n in theta},))
        logits = 100.0 * F.normalize(out + dout, dim=-1) @ head.T
        F.cross_entropy(logits, y).backward()
        opt.step()

    return step


def _time(benchmark, name: str, kind: str, step) -> None:
    step()  # warm-up: allocator, optimiser state
    times = []

    def timed() -> None:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    benchmark.pedantic(timed, rounds=ROUNDS[name], iterations=1)
    RESULTS[(name, kind)] = min(times)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    yield request.param, _setup(request.param)
    _print(request.param)


def test_linear_step(benchmark, case):
    name, (visual, x, y, head) = case
    _time(benchmark, name, "linear", _module_step(LinearizedEncoder(visual).train(), head, x, y, clip=True))


def test_bare_jvp_step(benchmark, case):
    name, (visual, x, y, head) = case
    _time(benchmark, name, "bare jvp", _bare_jvp_step(visual, head, x, y))


def test_standard_step(benchmark, case):
    name, (visual, x, y, head) = case
    _time(benchmark, name, "standard", _module_step(copy.deepcopy(visual).train(), head, x, y, clip=True))


def _print(name: str) -> None:
    got = {kind: t for (n, kind), t in RESULTS.items() if n == name}
    if {"linear", "bare jvp", "standard"} <= got.keys():
        size, batch = CASES[name]
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"\n\n{name} at {size} px, batch {batch}, 1 thread, load {' '.join(load)} (best of {ROUNDS[name]}):")
        print("  " + ", ".join(f"{k} {got[k] * 1000:.1f} ms" for k in ("linear", "bare jvp", "standard")))
        print(f"  linear / bare jvp: {got['linear'] / got['bare jvp']:.2f}x (target <= 1.2)")
        print(f"  linear / standard: {got['linear'] / got['standard']:.2f}x")
