"""The committed references hold on another machine: each reduced suite is rerun cold in a process
whose CPU computes the way another CPU would (bench.numerics, NEGMERGE_EMULATE_CPU=other), and
``regress`` against ``results/<suite>`` must pass. Under portable numerics (the default) the run is
expected to reproduce the reference's bytes; the test requires only what a user on another machine
is promised, that no metric moves beyond seed noise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.parametrize("suite", ["mini-classic-tiny", "mini-clip-tiny"])
def test_committed_reference_holds_when_this_cpu_computes_like_another(suite, tiny_backbone, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    if suite.startswith("mini-clip"):  # same numerics, same key: the session's pretrained backbone serves
        shutil.copytree(tiny_backbone.parent, cache / "backbones")
    env = os.environ | {"NEGMERGE_EMULATE_CPU": "other", "NEGMERGE_CACHE": str(cache)}
    bench = [sys.executable, "-m", "bench"]
    run = subprocess.run(
        [*bench, "run", suite, "--out", str(out), "--no-report"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reference = ROOT / "results" / suite
    regress = subprocess.run(
        [*bench, "regress", str(out), "--against", str(reference)], env=env, capture_output=True, text=True
    )
    assert regress.returncode == 0, regress.stdout[-3000:] + regress.stderr[-2000:]
    same = (out / "results.csv").read_bytes() == (reference / "results.csv").read_bytes()
    print(
        f"{suite} under another CPU's kernels: results.csv {'byte-identical to' if same else 'differs from'} the reference"
    )
