"""Datasets: one registry for offline sources and the paper's datasets (local clip-benchmark layouts)."""

from bench.data.registry import DATASETS, ImageSplit, TaskData, load_task, prepare_eval

__all__ = ["DATASETS", "ImageSplit", "TaskData", "load_task", "prepare_eval"]
