"""Damaged image files in real dataset layouts (torchvision's DTD, clip-benchmark's WebDataset export):
one ``error:`` line naming the dataset, the file or sample and the fix, exit 2, before any fine-tune
for an evaluation split; with ``data.bad_images=skip`` the run completes and lists what it left out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from bench.cli import main
from bench.data import load_task
from bench.data.damaged import BadImage
from tests.layouts import colour_images, dtd_image, truncate, write_dtd, write_wds, zero_wds_payload

TEXTURES = ["banded", "blotchy", "braided", "bubbly"]
FAST = [  # the reduced suite, made smaller: two fine-tunes of a few steps (jobs=2: made ahead, in parallel)
    "--set",
    "jobs=2",
    "--set",
    "finetune.grid={steps: [2, 3]}",
    "--set",
    "baselines.ga.grid={steps: [1], lr: [0.0001]}",
    "--set",
    "selection.lambda_step=0.5",
    "--set",
    "data.eval_limit=100",
]


@pytest.fixture(scope="module")
def dtd_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "cb"
    return write_dtd(root, {"train": colour_images(60, 0), "test": colour_images(24, 1)}, TEXTURES)


@pytest.fixture(scope="module")
def wds_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "wds_eurosat"
    splits = {"train": colour_images(60, 2), "test": colour_images(24, 3)}
    return write_wds(root, splits, TEXTURES, ["a photo of {c}."], shard_size=10)


def _run(tiny_backbone: Path, tmp_path: Path, monkeypatch, capsys, dataset: str, root: Path, *extra: str):
    """A reduced Protocol A run on one damaged copy, in a fresh cache: (exit code, stderr, cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    capsys.readouterr()
    argv = ["run", "mini-clip-tiny", "--out", str(tmp_path / "run"), "--set", f"backbone.pretrained={tiny_backbone}"]
    argv += ["--set", f"forget=[{dataset}]", *FAST, "--set", f"data.roots={{{dataset}: {root}}}", *extra]
    code = main(argv)
    return code, capsys.readouterr().err, cache


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Caught" not in err, err
    return errors[0]


def _fine_tunes_started(cache: Path) -> list[Path]:
    return [p for p in (cache / "pool").glob("*") if not p.name.endswith(".lock")]


def _damaged_copy(source: Path, tmp_path: Path) -> Path:
    return shutil.copytree(source, tmp_path / "copy")


@pytest.mark.integration
def test_truncated_jpeg_in_a_test_split_stops_before_any_fine_tune(
    dtd_copy, tiny_backbone, tmp_path, monkeypatch, capsys
):
    root = _damaged_copy(dtd_copy, tmp_path)
    bad = truncate(dtd_image(root, "test", 5))
    code, err, cache = _run(tiny_backbone, tmp_path, monkeypatch, capsys, "dtd", root, "--set", "data.workers=1")
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error: dataset 'dtd' (test split): file ") and str(bad) in line
    assert "image file is truncated" in line and "data.bad_images=skip" in line
    assert not _fine_tunes_started(cache)  # the pool's fine-tunes (two, made ahead) never began


@pytest.mark.integration
def test_corrupt_payload_in_a_wds_test_shard_names_shard_and_sample(
    wds_copy, tiny_backbone, tmp_path, monkeypatch, capsys
):
    root = _damaged_copy(wds_copy, tmp_path)
    shard = zero_wds_payload(root, "test", "s0000013")
    code, err, cache = _run(tiny_backbone, tmp_path, monkeypatch, capsys, "eurosat", root)
    assert code == 2
    line = _one_error_line(err)
    assert f"error: dataset 'eurosat' (test split): shard {shard} sample s0000013 is damaged" in line
    assert "cannot identify image file" in line and "BytesIO" not in line
    assert not _fine_tunes_started(cache)


def _a_fine_tuning_image(root: Path) -> Path:
    """The file of an image in the fine-tuning part of DTD's train split (not in Val)."""
    task = load_task("dtd", roots={"dtd": str(root)}, eval_limit=100)
    files = task.train.files
    return Path(files.base._image_files[int(files.indices[0])])


@pytest.mark.integration
def test_truncated_jpeg_in_a_train_split_stops_the_fine_tune_with_one_line(
    dtd_copy, tiny_backbone, tmp_path, monkeypatch, capsys
):
    """MIA off, so the fine-tuning split is not decoded for evaluation: the fine-tunes' DataLoader worker
    processes (inside the run's forked fine-tune workers) meet the damaged file."""
    root = _damaged_copy(dtd_copy, tmp_path)
    bad = truncate(_a_fine_tuning_image(root))
    extra = ["--set", "mia.enabled=false", "--set", "data.workers=1"]
    code, err, cache = _run(tiny_backbone, tmp_path, monkeypatch, capsys, "dtd", root, *extra)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("error: dataset 'dtd' (train split): file ") and str(bad) in line
    assert "image file is truncated" in line
    assert not list((cache / "pool").glob("*.safetensors"))  # no candidate written from a damaged split


@pytest.mark.integration
def test_skip_leaves_damaged_images_out_and_lists_them(dtd_copy, tiny_backbone, tmp_path, monkeypatch, capsys):
    """Also: progress on a non-interactive stderr is plain lines, not a carriage-return stream."""
    root = _damaged_copy(dtd_copy, tmp_path)
    bad_test = truncate(dtd_image(root, "test", 5))
    bad_train = truncate(_a_fine_tuning_image(root))
    monkeypatch.setenv("NEGMERGE_PROGRESS_SECONDS", "0")  # a line at every update: the most a log can get
    extra = ["--set", "data.bad_images=skip", "--set", "progress=true"]
    code, err, _ = _run(tiny_backbone, tmp_path, monkeypatch, capsys, "dtd", root, *extra)
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    left_out = {
        (b["split"], Path(b["problem"].split(" file ")[1].split(" is damaged")[0])) for b in manifest["bad_images"]
    }
    assert left_out == {("test", bad_test), ("train", bad_train)}
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert str(bad_test) in summary and str(bad_train) in summary
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert {"zeroshot", "negmerge"} <= set(results[results.dataset == "dtd"].method)
    assert "\r" not in err
    assert any(line.startswith("[progress] ") for line in err.splitlines())


def test_skip_checks_each_split_once_and_keeps_the_rest(dtd_copy, tmp_path):
    from bench.data.damaged import BadImageCheck

    root = _damaged_copy(dtd_copy, tmp_path)
    truncate(dtd_image(root, "test", 5))
    task = load_task("dtd", roots={"dtd": str(root)})
    check = BadImageCheck(tmp_path / "bad-images")
    clean = check.clean(task)
    assert len(clean.test) == len(task.test) - 1 and len(clean.train) == len(task.train)
    kept = [int(i) for i in clean.test.files.indices]
    assert kept == [i for i in range(len(task.test)) if i != 5]
    assert torch.equal(clean.test.labels, task.test.labels[kept])
    again = BadImageCheck(tmp_path / "bad-images")
    (root / "dtd" / "dtd" / "images").rename(root / "gone")  # the check is read from the cache, not redone
    assert len(again.clean(task).test) == len(task.test) - 1


class _Damaged(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == 2:
            raise BadImage("dataset 'x' (test split): file /d/2.jpg is damaged (OSError: truncated); fix it")
        return torch.zeros(1)


def test_a_bench_error_in_a_dataloader_worker_comes_back_as_its_own_line():
    with pytest.raises(BadImage) as err:
        list(DataLoader(_Damaged(), num_workers=1))
    assert str(err.value) == "dataset 'x' (test split): file /d/2.jpg is damaged (OSError: truncated); fix it"


def test_pool_keys_name_the_training_images_skip_left_out(tmp_path):
    """Same count, other damaged file: another training set, so another pool entry. Images left out
    of Val/test or of another dataset do not change what the pool trains on; an intact copy's keys
    stay what they were."""
    from types import SimpleNamespace

    from bench.config import load_suite
    from bench.data.damaged import BadImageCheck
    from bench.device import CPU
    from bench.protocol_clip import ClipRun, Grid

    cfg = load_suite("mini-clip-tiny")
    run = ClipRun(cfg, tmp_path / "out", tmp_path / "cache")
    run.backbone_id, run.bad, run.rt = "backbone", BadImageCheck(tmp_path / "bad-images"), CPU
    task, grid = SimpleNamespace(name="dtd"), Grid(cfg.finetune.points(0), "fine-tune", list(range(50)), 1)

    def key(*dropped: tuple[str, str, str]) -> str:
        run.bad.dropped = [{"dataset": d, "split": s, "problem": p} for d, s, p in dropped]
        spec = run._spec(grid, 0, task)
        return run.pool.key(spec)

    intact = key()
    assert "left_out" not in run._spec(grid, 0, task)
    one, other = key(("dtd", "train", "file /a.jpg")), key(("dtd", "train", "file /b.jpg"))
    assert len({intact, one, other}) == 3
    assert key(("dtd", "test", "file /a.jpg"), ("cars", "train", "file /c.jpg")) == intact


def _read_everything(split, rounds: int) -> int:
    """Images of ``split`` that did not decode to what was written, over ``rounds`` passes."""
    import numpy as np

    expected, _ = colour_images(60, 2)
    wrong = 0
    for _ in range(rounds):
        for i in range(len(split)):
            try:
                wrong += not np.array_equal(np.asarray(split[i][0]), expected[i].numpy())
            except OSError:
                wrong += 1
    return wrong


def _child(split, rounds: int) -> None:
    import os

    os._exit(min(_read_everything(split, rounds), 100))


def test_a_forked_worker_reads_wds_shards_beside_its_parent(wds_copy):
    """A run decodes its evaluation splits (opening the shards) before it forks its fine-tune workers:
    parent and child then read the same shards at once and must never see each other's bytes."""
    import multiprocessing

    from bench.data.wds import WdsSplit

    split = WdsSplit(wds_copy, "train", "eurosat")
    assert _read_everything(split, 1) == 0  # every shard's handle is open now, before the fork
    child = multiprocessing.get_context("fork").Process(target=_child, args=(split, 30))
    child.start()
    wrong_here = _read_everything(split, 30)
    child.join()
    assert (wrong_here, child.exitcode) == (0, 0)
