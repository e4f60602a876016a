"""Where and in what precision a run computes: ``device: auto|cpu|cuda|cuda:N`` and
``precision: fp32|bf16|fp16`` of every suite, used by every stage of both protocols.

Mixed precision the usual way: weights, optimiser state and task vectors stay fp32 ("master
weights"); only forward passes run under ``torch.autocast`` in bf16/fp16 (fp16 training adds a
GradScaler). fp32 uses no autocast at all, so a CPU fp32 run computes exactly what it always did.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from bench.errors import BenchError
from bench.numerics import check_process

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"
    compile: bool = False
    numerics: tuple[tuple[str, str], ...] = ()  # bench.numerics.check_process, for the manifest

    @property
    def on_accelerator(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """Context for forward passes: autocast in bf16/fp16, nothing at all in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def grad_scaler(self):
        """fp16 training needs loss scaling; bf16 and fp32 do not (a disabled scaler is a no-op)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True) if self.on_accelerator else x

    def describe(self) -> dict[str, str]:
        name = torch.cuda.get_device_name(self.device) if self.on_accelerator else "cpu"
        described = {"device": str(self.device), "device_name": name, "precision": self.precision}
        return described | {f"numerics_{k}": v for k, v in self.numerics}


CPU = Runtime(torch.device("cpu"))


def resolve_runtime(
    device: str = "auto", precision: str = "fp32", compile: bool = False, deterministic: bool = True
) -> Runtime:
    """``auto`` = the first CUDA device when there is one; an unavailable device is one clear error.

    ``deterministic`` (the default): deterministic kernels wherever torch has them (a warning names an
    op that has none), cuDNN without autotuning, cuBLAS with a fixed workspace, so a rerun on the same
    machine reproduces every number; off trades that for cuDNN autotuning speed on GPUs."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    numerics = check_process()  # portable CPU kernels (bench.numerics), or one clear error why not
    if not DEVICE_PATTERN.match(device):
        raise BenchError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"device: {device} asked for, but torch sees no CUDA device here; use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(
                f"device: {device} asked for, but this machine has {torch.cuda.device_count()} CUDA devices"
            )
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise BenchError("precision: fp16 autocast is for CUDA; use precision=bf16 on CPU")
    return Runtime(dev, precision, compile, tuple(numerics.items()))
