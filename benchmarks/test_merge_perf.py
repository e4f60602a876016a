"""Merge speed and memory against one plain read of the inputs (``./dev nox -s perf``); figures, not
assertions.

Two workloads: K=10 task vectors shaped like open_clip ViT-B-32's image encoder (3.5 GB, in page
cache), and the paper's largest: K=30 shaped like ViT-L/14's (36 GB, more than this machine's memory,
so every pass reads the disk). Each phase runs in a fresh process, timed inside it (best of REPEATS for
the fast phases at ViT-B-32, once at ViT-L/14), with its peak anonymous memory; the pools are made in
a temporary folder and deleted after. NEGMERGE_BENCH_SCALES (default "ViT-B-32,ViT-L-14") picks the
workloads; NEGMERGE_BENCH_DIR keeps a pool between runs instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.memory import measure
from benchmarks.merge_workload import naive_merge, read_once, streaming_merge, visual_shapes, write_pool

WORKLOADS = {"ViT-B-32": 10, "ViT-L-14": 30}  # encoder -> K
SCALES = [s.strip() for s in os.environ.get("NEGMERGE_BENCH_SCALES", ",".join(WORKLOADS)).split(",") if s.strip()]
MERGES = ["negmerge", "average", "magmax", "ties", "dare", "iso_c"]  # each with its default parameters
# x one plain read (issue #15); DARE (p=0.5 over the uniform merge) is element-wise like them. Iso-C has
# no target: its mean streams like the uniform merge, then one float64 SVD per matrix dominates (its
# time minus the uniform merge's is the SVDs' cost)
TARGETS = {"negmerge": 1.5, "average": 1.5, "magmax": 2.0, "ties": 4.0, "dare": 2.0}
GB = 1e9
RESULTS: dict[str, dict[str, dict[str, float]]] = {}


@pytest.fixture(scope="module", params=SCALES)
def pool(request, tmp_path_factory):
    name = request.param
    keep = os.environ.get("NEGMERGE_BENCH_DIR")
    directory = Path(keep) / name if keep else tmp_path_factory.mktemp(name)
    paths = write_pool(directory, WORKLOADS[name], visual_shapes(name))
    read_once(paths)  # warm the page cache as far as it holds the pool, so phases start alike
    yield name, paths
    _print_summary(name)
    if not keep:
        shutil.rmtree(directory, ignore_errors=True)


def _run(benchmark, scale: str, phase: str, fn, *args, repeats: int) -> None:
    result = benchmark.pedantic(measure, args=(fn, *args), kwargs={"repeats": repeats}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS.setdefault(scale, {})[phase] = result
    runs = ", ".join(f"{t:.2f}" for t in result["all_seconds"])
    print(
        f"\n{scale} {phase:>9}: {result['seconds']:7.2f} s (runs: {runs})   peak RssAnon {result['peak_rss_anon'] / GB:5.2f} GB"
    )


def _repeats(scale: str) -> int:
    return 1 if scale != "ViT-B-32" else 3


def test_read_once(benchmark, pool):
    scale, paths = pool
    _run(benchmark, scale, "read", read_once, paths, repeats=_repeats(scale))


@pytest.mark.parametrize("method", MERGES)
def test_streaming_merge(benchmark, pool, method):
    scale, paths = pool
    _run(benchmark, scale, method, streaming_merge, paths, method, repeats=_repeats(scale))


def test_naive_stack_merge(benchmark, pool):
    scale, paths = pool
    if scale != "ViT-B-32":
        pytest.skip(f"stacking {len(paths)} {scale} vectors needs more memory than this machine has")
    _run(benchmark, scale, "naive", naive_merge, paths, repeats=1)


def _print_summary(scale: str) -> None:
    r = RESULTS.get(scale, {})
    if "read" not in r:
        return
    read = r["read"]["seconds"]
    print(f"\n\nK={WORKLOADS[scale]} {scale} image-encoder task vectors: one plain read {read:.2f} s")
    print(f"{'phase':>9} {'seconds':>8} {'x read':>7} {'target':>7} {'peak RssAnon GB':>16}")
    for phase, result in r.items():
        target = f"<= {TARGETS[phase]}" if phase in TARGETS else ""
        ratio = result["seconds"] / read
        print(f"{phase:>9} {result['seconds']:8.2f} {ratio:7.2f} {target:>7} {result['peak_rss_anon'] / GB:16.2f}")
