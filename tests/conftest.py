import os
from pathlib import Path

import pytest

# isort: off
import bench  # noqa: F401  (first: pins the CPU kernels, bench.numerics, before torch loads)
import torch

# isort: on
from bench.numerics import check_process

torch.set_num_threads(int(os.environ.get("NEGMERGE_THREADS", "1")))
check_process()  # the tests compute with the kernels runs use (portable unless NEGMERGE_NUMERICS=native)


@pytest.fixture(scope="session")
def clip_cache(tmp_path_factory) -> Path:
    """One cache for the Protocol A integration tests: the tiny backbone is pretrained once per session."""
    return tmp_path_factory.mktemp("clip-cache")


@pytest.fixture(scope="module")
def module_env():
    """Environment changes for module fixtures, undone when the module ends (NEGMERGE_CACHE must never
    leak into later tests or, run alone, into the user's default cache)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def tiny_backbone(clip_cache) -> Path:
    """mini-clip-tiny's pretrained backbone in ``clip_cache/backbones`` (made once per session); copy
    that folder into an empty cache to start a run cold in everything but pretraining."""
    from bench.config import load_suite
    from bench.pretrain import pretrained_checkpoint

    cfg = load_suite("mini-clip-tiny")
    return pretrained_checkpoint(cfg.backbone.name, cfg.pretrain, cfg.data, clip_cache, progress=False)
