"""Where and in what precision a run computes: ``device: auto|cpu|cuda|cuda:N`` and
``precision: fp32|bf16|fp16`` of every suite, used by every stage of both protocols.

Mixed precision the usual way: weights, optimiser state and task vectors stay fp32 ("master
weights"); only forward passes run under ``torch.autocast`` in bf16/fp16 (fp16 training adds a
GradScaler). fp32 uses no autocast at all, so a CPU fp32 run computes exactly what it always did;
on CUDA fp32 means fp32 (TF32 off for matmuls and cuDNN convolutions alike).

What computed a cached product is part of its key (``Runtime.key``): the device *kind* ("cpu", or the
GPU's name and compute capability), compile and deterministic mode, whenever they differ from the
plain CPU run, so CPU and each GPU model keep apart entries in one shared cache while CPU keys stay
what they always were (and never depend on which CPU).
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


NO_GPU_VALUES = {"", "-1", "none", "nodevfiles", "void"}  # what schedulers write when no GPU is allotted


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"
    compile: bool = False
    deterministic: bool = True
    numerics: tuple[tuple[str, str], ...] = ()  # bench.numerics.check_process, for the manifest

    @property
    def kind(self) -> str:
        """What the numbers depend on: "cpu" (any CPU), or the GPU's name and compute capability."""
        if not self.on_accelerator:
            return "cpu"
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"cuda:{torch.cuda.get_device_name(self.device)}:sm{major}{minor}"

    def key(self) -> dict[str, object]:
        """The runtime's part of a cache key: empty for the plain CPU run (its keys predate this),
        the device kind, compile and deterministic mode for anything else."""
        if self.kind == "cpu" and not self.compile and self.deterministic:
            return {}
        return {"device_kind": self.kind, "compile": self.compile, "deterministic": self.deterministic}

    def key_suffix(self) -> str:
        """``key`` for a cache whose key is a version string: "" or "-<digest of key>"."""
        import hashlib
        import json

        extra = self.key()
        return f"-{hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:12]}" if extra else ""

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
        described = {"device": str(self.device), "device_name": name, "precision": self.precision, "kind": self.kind}
        return described | {f"numerics_{k}": v for k, v in self.numerics}


CPU = Runtime(torch.device("cpu"))


def gpu_expected() -> str | None:
    """Why this process should see a GPU (a scheduler gave it one), or None."""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        value = os.environ.get(var)
        if value is not None and value.strip().lower() not in NO_GPU_VALUES:
            return f"{var}={value}"
    if os.environ.get("NEGMERGE_EXPECT_GPU") == "1":
        return "this cluster job asked for --gpus-per-node >= 1"
    return None


def fp32_math(precision: str) -> None:
    """fp32 means fp32 on CUDA: no TF32 in matmuls, nor in cuDNN convolutions (ViT conv1, every
    ResNet conv), which torch allows by default; bf16/fp16 runs may use it."""
    allowed = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def resolve_runtime(
    device: str = "auto", precision: str = "fp32", compile: bool = False, deterministic: bool = True
) -> Runtime:
    """``auto`` = the first CUDA device when there is one; an unavailable device is one clear error.

    ``deterministic`` (the default): deterministic kernels wherever torch has them (a warning names an
    op that has none), cuDNN without autotuning, cuBLAS with a fixed workspace, so a rerun on the same
    machine reproduces every number; off trades that for cuDNN autotuning speed on GPUs.
    ``NEGMERGE_STRICT_DETERMINISM=1``: an op without a deterministic kernel raises instead of warning
    (the GPU check runs once so, to list them).

    ``auto`` inside a job that was given a GPU (``gpu_expected``) but whose torch sees none is an
    error, not a silent CPU run."""
    strict = os.environ.get("NEGMERGE_STRICT_DETERMINISM") == "1"
    torch.use_deterministic_algorithms(deterministic, warn_only=not strict)
    if not DEVICE_PATTERN.match(device):
        raise BenchError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        why = gpu_expected()
        if why and not torch.cuda.is_available():
            raise BenchError(
                f"device: auto, and a GPU was expected ({why}), but torch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); fix the driver or the "
                "torch build, or pass device=cpu to run on the CPU on purpose"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"device: {device} asked for, but torch sees no CUDA device here; use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(
                f"device: {device} asked for, but this machine has {torch.cuda.device_count()} CUDA devices"
            )
        if dev.index is not None:
            torch.cuda.set_device(dev)  # else pinning and caching allocators open a context on GPU 0
        if precision == "bf16" and torch.cuda.get_device_capability(dev) < (8, 0):
            major, minor = torch.cuda.get_device_capability(dev)
            raise BenchError(
                f"precision: bf16 on {torch.cuda.get_device_name(dev)} (compute capability {major}.{minor}) "
                "is emulated, slower than fp32; bf16 needs compute capability 8.0 (Ampere) or newer: use "
                "precision=fp16 or fp32 here"
            )
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        fp32_math(precision)
    if precision == "fp16" and dev.type == "cpu":
        raise BenchError("precision: fp16 autocast is for CUDA; use precision=bf16 on CPU")
    numerics = check_process(compile_on_cpu=compile and dev.type == "cpu")  # portable kernels, or why not
    return Runtime(dev, precision, compile, deterministic, tuple(numerics.items()))


def normalisation(
    cache: dict, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, C, 1, 1) tensors on ``device``, made once per device: made per batch they
    would be a blocking host-to-device copy every step."""
    if device not in cache:
        cache[device] = tuple(torch.tensor(v).view(1, -1, 1, 1).to(device) for v in (mean, std))
    return cache[device]
