"""The GPU check (``./dev nox -s gpu``): the reduced real-backbone path on CUDA end to end in bf16, then
ViT-B-32 image-encoder throughput at 224 in fp32 and bf16 (eval forward and fine-tuning step, images/s).
Exits 0 with a message where there is no CUDA device."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.cli import main
from bench.config import load_suite
from bench.plan import measure_throughput

REDUCED = [
    "--set", "backbone={name: ViT-B-32, pretrained: null}",
    "--set", "forget=[sklearn-digits]",
    "--set", "data={train_limit: 256, eval_limit: 256}",
    "--set", "finetune.grid={steps: [5, 10]}",
    "--set", "finetune.base={lr: 0.00001, batch_size: 64, warmup_steps: 2}",
    "--set", "baselines.ga.grid={steps: [2], lr: [0.00001]}",
    "--set", "selection.lambda_step=0.25",
    "--set", "eval_batch_size=256",
]  # fmt: skip


def run() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU session has nothing to check (run it where a GPU is)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        argv = ["run", "mini-clip-tiny", "--out", str(Path(tmp) / "run"), "--no-report", "--device", "cuda"]
        code = main([*argv, "--precision", "bf16", *REDUCED])
        print(f"reduced ViT-B-32 suite on cuda/bf16: exit {code} in {time.perf_counter() - start:.1f} s")
        if code != 0:
            return code
    print(f"{'precision':>9} {'eval img/s':>11} {'train img/s':>12}   (ViT-B-32 at 224, batch 256 eval / 128 train)")
    for precision in ("fp32", "bf16"):
        cfg = load_suite(
            "mini-clip-tiny",
            [
                "backbone={name: ViT-B-32, pretrained: null}",
                "device=cuda",
                f"precision={precision}",
                "eval_batch_size=256",
                "finetune.base={batch_size: 128}",
            ],
        )
        eval_ips, train_ips = measure_throughput(cfg, batches=10)
        print(f"{precision:>9} {eval_ips:>11,.0f} {train_ips:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
