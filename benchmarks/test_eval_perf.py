"""Lambda sweeps over a file-backed Val split vs the same images in memory (``./dev nox -s perf``).

The file-backed split is a WebDataset copy (PNG shards) of real MNIST digits; after the one-off
preprocessing into the uint8 cache it should cost what the in-memory split costs (target <= 1.2x).
For scale, the printed summary also gives the sweep without the cache (decoding and preprocessing
every image at every lambda point, as the harness did before). Figures, not assertions.
Set NEGMERGE_BENCH_EVAL_N (default 2000 images) to change the workload.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench.backbones import load_backbone, visual_state
from bench.data import ImageSplit, load_task, prepare_eval
from bench.data.preprocessed import PreprocessedCache
from bench.evaluate import Evaluator, top1
from bench.heads import build_head
from negmerge import apply
from tests.layouts import digits, write_wds

N = int(os.environ.get("NEGMERGE_BENCH_EVAL_N", "2000"))
LAMBDAS = [i / 10 for i in range(11)]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wds")
    (x, y), _ = digits(N, 1)
    write_wds(root, {"train": (x, y), "test": (x[:10], y[:10])}, DIGITS, ["a photo of the digit {c}."])
    # every image of train is Val here: val_fraction close to 1 keeps one fine-tuning image
    task = load_task("eurosat", roots={"eurosat": str(root)}, val_fraction=(N - 1) / N, val_max=N)
    backbone = load_backbone("mini-clip-vit", None)
    theta0 = visual_state(backbone)
    tau = {k: 0.01 * torch.randn_like(v) for k, v in theta0.items()}
    head = build_head(backbone, DIGITS, ["a photo of the digit {c}."])
    ev = Evaluator(backbone, batch_size=512)
    in_memory = ImageSplit(labels=task.val.labels, images=torch.stack([_pixels(task, i) for i in range(len(task.val))]))
    yield task, backbone, theta0, tau, head, ev, in_memory, tmp_path_factory.mktemp("preprocessed")
    _print_summary()


def _pixels(task, i: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(task.val.files.image(i)))


def _sweep(ev, theta0, tau, head, split) -> list[float]:
    accs = []
    for lam in LAMBDAS:
        ev.load(apply(theta0, tau, -lam))
        accs.append(top1(ev.logits(split, head), split.labels))
    return accs


def _timed(name: str, fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    RESULTS[name] = min(times)
    print(f"\n{name:>34}: {min(times):6.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")
    return min(times)


def test_sweep_in_memory(benchmark, setup):
    _, _, theta0, tau, head, ev, in_memory, _ = setup
    benchmark.pedantic(
        lambda: _timed("sweep, in-memory split", lambda: _sweep(ev, theta0, tau, head, in_memory)), rounds=1
    )


def test_sweep_file_backed_with_cache(benchmark, setup):
    task, backbone, theta0, tau, head, ev, in_memory, cache_dir = setup
    cache = PreprocessedCache(cache_dir, progress=False)
    start = time.perf_counter()
    prepared = prepare_eval(task, backbone.preprocess, cache, members=False)
    RESULTS["one-off preprocessing"] = time.perf_counter() - start
    print(f"\n{'one-off preprocessing (val+test)':>34}: {RESULTS['one-off preprocessing']:6.2f} s")
    # the same decisions as the in-memory split (the digits are the same images)
    assert _sweep(ev, theta0, tau, head, prepared.val) == _sweep(ev, theta0, tau, head, in_memory)
    benchmark.pedantic(
        lambda: _timed("sweep, file-backed (cached uint8)", lambda: _sweep(ev, theta0, tau, head, prepared.val)),
        rounds=1,
    )


def test_sweep_file_backed_without_cache(benchmark, setup):
    """What every lambda point cost before: decode and preprocess each image again."""
    task, backbone, theta0, tau, head, ev, _, _ = setup

    def sweep():
        for lam in LAMBDAS:
            ev.load(apply(theta0, tau, -lam))
            images = torch.stack(
                [backbone.preprocess(task.val.files.image(i)) for i in range(len(task.val))]
            )  # float, normalised
            with torch.no_grad():
                ev.visual(images)

    benchmark.pedantic(lambda: _timed("sweep, file-backed, no cache", sweep, repeats=1), rounds=1)


def _print_summary() -> None:
    if {"sweep, in-memory split", "sweep, file-backed (cached uint8)"} <= RESULTS.keys():
        ratio = RESULTS["sweep, file-backed (cached uint8)"] / RESULTS["sweep, in-memory split"]
        print(f"\n\n{N} Val images, {len(LAMBDAS)} lambda points, mini-clip-vit")
        print(f"file-backed (cached) / in-memory: {ratio:.2f}x (target <= 1.2)")
    if {"sweep, file-backed, no cache", "sweep, in-memory split"} <= RESULTS.keys():
        ratio = RESULTS["sweep, file-backed, no cache"] / RESULTS["sweep, in-memory split"]
        print(f"file-backed without cache / in-memory: {ratio:.2f}x")
