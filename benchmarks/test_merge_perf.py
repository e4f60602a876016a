"""Merge speed and memory at ViT-B-32 scale (``./dev nox -s perf``); figures, not assertions.

Prints streaming vs naive peak anonymous memory and streaming time / plain read time, all in one run.
The figures are the printed lines, timed inside each phase's fresh process (best of REPEATS for the
fast phases); pytest-benchmark's own table also counts that process's start-up and torch import.
Set NEGMERGE_BENCH_K (default 10) and NEGMERGE_BENCH_DIR (default a temp dir) to change the workload.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.memory import measure
from benchmarks.merge_workload import naive_merge, read_once, streaming_merge, vit_b32_visual_shapes, write_pool

K = int(os.environ.get("NEGMERGE_BENCH_K", "10"))
REPEATS = 3  # for the phases that take seconds; the naive path and TIES run once
GB = 1e9
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    directory = Path(os.environ.get("NEGMERGE_BENCH_DIR") or tmp_path_factory.mktemp("pool"))
    paths = write_pool(directory, K, vit_b32_visual_shapes())
    read_once(paths)  # warm the page cache so every phase reads from memory alike
    yield paths
    _print_summary()


def _run(benchmark, name: str, fn, *args, repeats: int = REPEATS) -> None:
    result = benchmark.pedantic(measure, args=(fn, *args), kwargs={"repeats": repeats}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    RESULTS[name] = result
    runs = ", ".join(f"{t:.2f}" for t in result["all_seconds"])
    print(
        f"\n{name:>18}: {result['seconds']:7.2f} s (runs: {runs})   peak RssAnon {result['peak_rss_anon'] / GB:5.2f} GB"
    )


def test_read_once(benchmark, pool):
    _run(benchmark, "read K files", read_once, pool)


@pytest.mark.parametrize("method", ["negmerge", "average", "magmax", "ties"])
def test_streaming_merge(benchmark, pool, method):
    _run(benchmark, f"stream {method}", streaming_merge, pool, method, repeats=1 if method == "ties" else REPEATS)


def test_naive_stack_merge(benchmark, pool):
    _run(benchmark, "naive negmerge", naive_merge, pool, repeats=1)


def _print_summary() -> None:
    if not {"read K files", "stream negmerge", "naive negmerge"} <= RESULTS.keys():
        return
    read, stream, naive = RESULTS["read K files"], RESULTS["stream negmerge"], RESULTS["naive negmerge"]
    print(f"\n\nK={K} ViT-B-32 image-encoder task vectors")
    print(f"streaming negmerge peak RssAnon: {stream['peak_rss_anon'] / GB:.2f} GB (target < 1.5)")
    print(f"naive stack-all peak RssAnon:    {naive['peak_rss_anon'] / GB:.2f} GB (expected > 3.5)")
    print(f"memory ratio naive/streaming:    {naive['peak_rss_anon'] / stream['peak_rss_anon']:.2f}x")
    print(f"time ratio streaming/read-once:  {stream['seconds'] / read['seconds']:.2f}x (target <= 2.5)")
