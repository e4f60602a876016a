"""What portable CPU numerics (bench.numerics) cost: the suites' hot loops timed under portable and
native kernels (``./dev nox -s perf -- benchmarks/test_numerics_perf.py``).

torch reads its kernel choice once per process, so each mode runs in its own interpreter; the two
are run in turns, twice, and each workload's best time is kept (this machine's speed drifts).
Figures, not assertions: the ratios are printed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOADS = r"""
import json, time
import bench
import torch
import torch.nn.functional as F
from torch import nn
from bench.backbones import load_backbone
from bench.numerics import check_process

check_process()
torch.set_num_threads(1)
torch.manual_seed(0)

def best(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)

out = {}
mini = load_backbone("mini-clip-vit", None)
x = torch.randn(256, 3, mini.image_size, mini.image_size)
with torch.no_grad():
    out["mini-clip-vit forward (256 images)"] = best(lambda: mini.visual(x))
opt = torch.optim.AdamW(mini.visual.parameters(), lr=1e-4)
xb = x[:64]
def step():
    loss = mini.visual(xb).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
out["mini-clip-vit train step (64 images)"] = best(step)
mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
sgd = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
data, labels = torch.randn(3000, 784), torch.randint(0, 10, (3000,))
def epoch():
    for s in range(0, 3000, 128):
        loss = F.cross_entropy(mlp(data[s:s+128]), labels[s:s+128]); sgd.zero_grad(); loss.backward(); sgd.step()
out["MLP 512x512 epoch (3000 images)"] = best(epoch)
vit = load_backbone("ViT-B-32", None)
xv = torch.randn(16, 3, 224, 224)
with torch.no_grad():
    out["ViT-B-32 forward (16 images at 224)"] = best(lambda: vit.visual(xv), repeats=3)
print(json.dumps(out))
"""


def _measure(mode: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env |= {"NEGMERGE_NUMERICS": mode, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WORKLOADS], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_portable_vs_native_kernels(benchmark):
    runs: dict[str, list[dict[str, float]]] = {"portable": [], "native": []}

    def both():
        for mode in runs:
            runs[mode].append(_measure(mode))

    benchmark.pedantic(both, rounds=2, iterations=1)
    best = {mode: {k: min(r[k] for r in results) for k in results[0]} for mode, results in runs.items()}
    print("\nportable vs native CPU kernels (best of 2 processes x 5 repeats, seconds):")
    for name, native in best["native"].items():
        portable = best["portable"][name]
        print(f"  {name:40s} native {native:8.4f}  portable {portable:8.4f}  ratio {portable / native:.2f}x")
