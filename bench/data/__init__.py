"""Datasets: one registry for offline sources and real (clip-benchmark) datasets."""

from bench.data.registry import DATASETS, TaskData, load_task

__all__ = ["DATASETS", "TaskData", "load_task"]
