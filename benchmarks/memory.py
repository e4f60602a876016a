"""Peak anonymous memory of a function, measured in a fresh process.

RssAnon excludes file-backed pages, so memory-mapped safetensors reads (reclaimable page cache) do
not count, while tensors copied into the process do. A fresh process per measurement keeps one
phase's allocator state from hiding another's peak.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not in /proc/self/status (Linux only)")


def _child(fn: Callable[..., Any], args: tuple, threads: int, repeats: int, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(threads)
    baseline = rss_anon_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    done.set()
    sampler.join()
    peak = max(peak, rss_anon_bytes())
    queue.put({"seconds": min(times), "all_seconds": times, "peak_rss_anon": peak, "baseline_rss_anon": baseline})


def measure(fn: Callable[..., Any], *args: Any, threads: int = 2, repeats: int = 1) -> dict[str, Any]:
    """Run ``fn(*args)`` ``repeats`` times in one spawned process.

    Returns the fastest run's seconds (timed inside the child: process start and imports excluded;
    the minimum because this machine's speed drifts, and noise only ever adds time), every run's
    seconds, and the peak RssAnon in bytes over all runs.
    """
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, threads, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"measured process exited with {proc.exitcode}")
    return result
