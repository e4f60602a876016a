"""Portable CPU numerics: the same bits on every x86-64 CPU that has AVX2.

Why: torch picks its CPU kernels by the CPU it finds. The same commit then computes different bits on
an AVX-512 machine and an AVX2 one (ATen's vectorised kernels per ISA, MKL's GEMM branch, oneDNN's JIT
kernels, which also size their blocking to the caches), so training drifts, a selection flips, and a
committed reference fails ``regress`` on the next machine. Portable mode pins each layer to one
baseline before any kernel runs:

- ATen: ``ATEN_CPU_CAPABILITY=avx2`` (read once, at the first dispatched kernel);
- MKL (torch's BLAS): conditional numerical reproducibility, ``MKL_CBWR=AVX2,STRICT``;
- oneDNN: off for fp32 (``torch.backends.mkldnn.enabled = False``: convolutions and matmuls go through
  ATen and MKL, which are pinned above), and ``ONEDNN_MAX_CPU_ISA=AVX2`` for what still reaches it.

``NEGMERGE_NUMERICS=native`` keeps torch's own choices (fastest, machine-dependent bits). This module
must not import torch at import time: ``bench/__init__.py`` applies the environment before torch loads.

``NEGMERGE_EMULATE_CPU=other`` makes this machine compute the way a different CPU would, for tests and
CI: in native mode it switches every layer above to another kernel family (ATen's scalar ``default``
kernels, MKL's ``COMPATIBLE`` branch, oneDNN at SSE4.1); in portable mode, where those layers are
pinned, it perturbs the layers portable mode leaves to the machine (NumPy's SIMD dispatch, numba's
target CPU), so a test run under it shows what portable mode does and does not pin.
"""

from __future__ import annotations

import os

PORTABLE_CAPABILITY = "AVX2"
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# kernels another CPU would pick: used by NEGMERGE_EMULATE_CPU=other
OTHER_CPU_NATIVE_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}
OTHER_CPU_UNPINNED_ENV = {
    "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR",
    "NUMBA_CPU_NAME": "haswell",
}
MODES = ("portable", "native")


def mode() -> str:
    value = os.environ.get("NEGMERGE_NUMERICS", "portable")
    return value if value in MODES else "portable"


def emulating_other_cpu() -> bool:
    return os.environ.get("NEGMERGE_EMULATE_CPU", "") == "other"


def apply_environment() -> None:
    """Set the kernel-selection variables for this process and its children (before torch loads).

    Variables the user set stay theirs, except under emulation, which exists to override them."""
    if os.environ.get("NEGMERGE_NUMERICS", "portable") not in MODES:
        return  # reported as an error at run start (check_process), not at import
    pinned = dict(PORTABLE_ENV) if mode() == "portable" else {}
    if emulating_other_cpu():
        for key, value in OTHER_CPU_UNPINNED_ENV.items():
            os.environ[key] = value
        if not pinned:
            os.environ.update(OTHER_CPU_NATIVE_ENV)
    for key, value in pinned.items():
        os.environ.setdefault(key, value)


def tag() -> str:
    """What goes into cache keys: entries computed under different numerics never mix."""
    return "portable-avx2" if mode() == "portable" else "native"


def check_process(compile_on_cpu: bool = False) -> dict[str, str]:
    """Make the running process's kernels match the mode, or say exactly why they cannot.

    Called at the start of every run (``bench.device.resolve_runtime``). Returns what the manifest
    records. ``compile_on_cpu``: the run compiles its encoder for a CPU, which portable mode refuses
    (inductor generates and compiles kernels for the CPU it runs on)."""
    import torch

    from bench.errors import BenchError

    raw = os.environ.get("NEGMERGE_NUMERICS", "portable")
    if raw not in MODES:
        raise BenchError(f"NEGMERGE_NUMERICS={raw!r}: use 'portable' (the default) or 'native'")
    capability = torch.backends.cpu.get_cpu_capability()
    info = {"mode": mode(), "cpu_capability": capability, "emulating_other_cpu": str(emulating_other_cpu())}
    if mode() == "native":
        return info
    if compile_on_cpu:
        raise BenchError(
            "compile: true on a CPU generates kernels for this CPU (torch.compile), so its bits are this "
            "machine's and portable numerics cannot hold: set NEGMERGE_NUMERICS=native to compile on a CPU"
        )
    for key, value in PORTABLE_ENV.items():
        if os.environ.get(key) != value:
            raise BenchError(
                f"portable numerics need {key}={value}, but the environment sets {key}={os.environ.get(key)!r}; "
                "unset it, or set NEGMERGE_NUMERICS=native"
            )
    torch.backends.mkldnn.enabled = False
    if capability != PORTABLE_CAPABILITY:
        if capability == "DEFAULT":  # asked for AVX2 (checked above), and torch found no AVX2 here
            info["warning"] = "this CPU has no AVX2: portable numerics cannot hold here; results may differ"
            return info
        raise BenchError(
            f"portable numerics need torch's CPU kernels at AVX2, but this process already runs them at "
            f"{capability} (torch computed before negmerge-bench set ATEN_CPU_CAPABILITY={PORTABLE_ENV['ATEN_CPU_CAPABILITY']}); "
            "import bench before torch runs anything, export ATEN_CPU_CAPABILITY=avx2, or set NEGMERGE_NUMERICS=native"
        )
    return info
