"""Portable CPU numerics (bench.numerics): the same bits whatever kernels this CPU would pick.

Each check runs a fresh interpreter, because torch reads its kernel choice once per process. The
workload trains what the suites train (linear layers with BatchNorm, a convolution, attention), so a
kernel family that changes any of their bits changes the hash.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import hashlib
import bench  # first: pins the kernels before torch loads
import torch
from torch import nn
from bench.numerics import check_process

info = check_process()
torch.set_num_threads(1)
torch.manual_seed(0)
mlp = nn.Sequential(nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
conv = nn.Conv2d(3, 8, 4, stride=4)
attn = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation="gelu")
params = [*mlp.parameters(), *conv.parameters(), *attn.parameters()]
opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
img = torch.randn(16, 3, 32, 32)
for step in range(20):
    b = slice((step * 64) % 256, (step * 64) % 256 + 64)
    tokens = conv(img).flatten(2).transpose(1, 2)  # (16, 64, 8): patch embedding, as a ViT's conv1
    tokens = torch.cat([tokens, tokens, tokens, tokens], -1)
    loss = nn.functional.cross_entropy(mlp(x[b]), y[b]) + attn(tokens).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
h = hashlib.sha256()
for p in params:
    h.update(p.detach().numpy().tobytes())
print(info["mode"], info["cpu_capability"], h.hexdigest()[:16])
"""


def _run(env: dict[str, str], code: str = WORKLOAD) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NEGMERGE_NUMERICS", "NEGMERGE_EMULATE"))}
    for key in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES", "NUMBA_CPU_NAME"):
        clean.pop(key, None)
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def _hash(env: dict[str, str]) -> tuple[str, str, str]:
    done = _run(env)
    assert done.returncode == 0, done.stderr[-2000:]
    mode, capability, digest = done.stdout.split()
    return mode, capability, digest


def _native_capability() -> str:
    done = _run({"NEGMERGE_NUMERICS": "native"}, "import torch; print(torch.backends.cpu.get_cpu_capability())")
    return done.stdout.strip()


def test_portable_bits_do_not_change_when_this_cpu_computes_like_another():
    mode, capability, portable = _hash({})
    assert (mode, capability) == ("portable", "AVX2")
    assert _hash({"NEGMERGE_EMULATE_CPU": "other"}) == (mode, capability, portable)


def test_without_portable_mode_another_kernel_family_changes_the_bits():
    """The switch the tests and CI use really is another machine: native kernels move the bits, so the
    test above would see anything portable mode failed to pin."""
    if _native_capability() == "DEFAULT":
        pytest.skip("this CPU runs torch's scalar kernels natively: there is no other family to switch to")
    native = _hash({"NEGMERGE_NUMERICS": "native"})
    other = _hash({"NEGMERGE_NUMERICS": "native", "NEGMERGE_EMULATE_CPU": "other"})
    assert native[0] == other[0] == "native"
    assert other[1] == "DEFAULT"
    assert native[2] != other[2]


def test_a_process_whose_kernels_are_already_chosen_is_refused_with_one_line():
    if _native_capability() in ("AVX2", "DEFAULT"):
        pytest.skip("this CPU's own kernels are portable mode's (or it has no AVX2): nothing to refuse")
    code = "import torch; torch.ones(3).sum(); import bench.numerics as n; n.check_process()"
    done = _run({}, code)  # torch chose its kernels before bench could pin them
    assert done.returncode != 0
    assert "portable numerics need torch's CPU kernels at AVX2" in done.stderr
    assert "NEGMERGE_NUMERICS=native" in done.stderr


def test_a_conflicting_kernel_variable_is_refused_naming_it():
    done = _run({"ATEN_CPU_CAPABILITY": "default"}, "import bench.numerics as n; n.check_process()")
    assert done.returncode != 0
    assert "portable numerics need ATEN_CPU_CAPABILITY=avx2" in done.stderr


def test_an_unknown_mode_is_one_error_naming_the_variable():
    done = _run({"NEGMERGE_NUMERICS": "fast"}, "import bench.numerics as n; n.check_process()")
    assert done.returncode != 0 and "NEGMERGE_NUMERICS='fast'" in done.stderr


def test_cache_keys_differ_between_numerics_modes():
    code = "from bench.codehash import code_digest; print(code_digest('bench.finetune'))"
    portable = _run({}, code).stdout.strip()
    native = _run({"NEGMERGE_NUMERICS": "native"}, code).stdout.strip()
    assert portable and native and portable != native
