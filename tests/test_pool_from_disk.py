"""``pool: {from: ..., theta0: ...}`` (Protocol A): a sweep already on disk replaces the pool's
fine-tuning, and gives the same result rows as the run that fine-tuned those candidates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.cli import main
from bench.config import load_suite
from bench.units import plan_units

pytestmark = pytest.mark.integration
COMMON = ["--no-report", "--set", "forget=[sklearn-digits]", "--set", "methods=[single_best, negmerge, ties]"]


def _run(tmp_path: Path, tiny_backbone: Path, monkeypatch, name: str, *extra: str) -> Path:
    cache = tmp_path / f"cache-{name}"
    shutil.copytree(tiny_backbone.parent, cache / "backbones")  # cold in everything but pretraining
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    out = tmp_path / name
    argv = ["run", "mini-clip-tiny", "--out", str(out), "--set", f"backbone.pretrained={tiny_backbone}", *COMMON]
    assert main([*argv, *extra]) == 0
    return out


def _hf_folder(state: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir()
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _same_results_no_training_cost(tuned: pd.DataFrame, loaded: pd.DataFrame) -> None:
    """The same result rows; a sweep from disk carries no training count, so its pool methods' training
    cost is blank (bench.cost), where the run that fine-tuned them counted it."""
    from bench.results import RESULT_COLUMNS

    pd.testing.assert_frame_equal(tuned[RESULT_COLUMNS], loaded[RESULT_COLUMNS])
    pooled = loaded.method.isin(["single_best", "single_run", "negmerge", "ties", "average", "magmax"])
    assert loaded.loc[pooled, "train_samples"].isna().all()
    assert tuned.loc[pooled, "train_samples"].notna().all()


def test_an_exported_pool_gives_the_same_result_rows(tiny_backbone, tmp_path, monkeypatch):
    tuned = _run(tmp_path, tiny_backbone, monkeypatch, "tuned")
    manifest = json.loads((tuned / "manifest.json").read_text())
    members = [m for m in manifest["pool"] if m["role"] == "fine-tune"]
    assert len(members) == 4
    # export as a user's sweep: theta_0 is the backbone checkpoint itself (keys under 'visual.'), the
    # candidates theta_0 + tau as plain encoder state dicts, one as a PyTorch file, one as a sharded
    # Hugging Face style folder
    theta0 = {k[len("visual.") :]: v for k, v in load_file(tiny_backbone).items() if k.startswith("visual.")}
    sweep = tmp_path / "sweep" / "sklearn-digits"
    sweep.mkdir(parents=True)
    for i, member in enumerate(members):
        tau = load_file(tmp_path / "cache-tuned" / "pool" / f"{member['key']}.safetensors")
        theta = {k: (v.float() + tau[k]).to(v.dtype) if k in tau else v for k, v in theta0.items()}
        if i == 1:
            torch.save({"state_dict": theta}, sweep / f"cand{i}.pt")
        elif i == 3:
            _hf_folder(theta, sweep / f"cand{i}")
        else:
            save_file(theta, sweep / f"cand{i}.safetensors")
    pool = f"pool={{from: '{tmp_path / 'sweep' / '{dataset}'}', theta0: '{tiny_backbone}'}}"
    cfg = load_suite("mini-clip-tiny", ["finetune=null", pool, "forget=[sklearn-digits]"])
    assert not [u for phase in plan_units(cfg) for u in phase if u.kind == "finetune"]  # no fine-tuning units

    loaded = _run(tmp_path, tiny_backbone, monkeypatch, "from-disk", "--set", "finetune=null", "--set", pool)
    a, b = pd.read_csv(tuned / "results.csv"), pd.read_csv(loaded / "results.csv")
    _same_results_no_training_cost(a, b)
    disk = json.loads((loaded / "manifest.json").read_text())
    files = [m["files"][0] for m in disk["pool"] if m["role"] == "from-disk"]
    assert [Path(f["file"]).name for f in files] == [
        "cand0.safetensors",
        "cand1.pt",
        "cand2.safetensors",
        "model-00001-of-00002.safetensors",  # cand3, a sharded folder: its first shard
    ]
    assert all(len(f["sha256"]) == 64 for f in files)
    assert not any(m["role"] == "fine-tune" for m in disk["pool"])


def test_a_sweep_of_another_model_is_refused_at_load_naming_the_key(tiny_backbone, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    theta0 = {k: v for k, v in load_file(tiny_backbone).items() if k.startswith("visual.")}
    bad = dict(theta0)
    key = next(iter(bad))
    bad[key] = torch.zeros(3)
    save_file(bad, sweep / "cand0.safetensors")
    monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_backbone.parent, tmp_path / "cache" / "backbones")
    argv = ["run", "mini-clip-tiny", "--out", str(tmp_path / "o"), "--set", f"backbone.pretrained={tiny_backbone}",
            *COMMON, "--set", "finetune=null", "--set", f"pool={{from: {sweep}, theta0: {tiny_backbone}}}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and repr(key) in err and "cand0.safetensors" in err, err


def test_classic_an_exported_pool_gives_the_same_result_rows(tmp_path, monkeypatch):
    """Protocol B: the Original is theta_0, the pool's parameters come from disk, BN-free MLP."""

    def run(name: str, *extra: str) -> Path:
        monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / f"cache-{name}"))
        out = tmp_path / name
        argv = [
            "run",
            "mini-classic-tiny",
            "--no-report",
            "--out",
            str(out),
            "--set",
            "methods=[single_best, negmerge]",
        ]
        assert main([*argv, *extra]) == 0
        return out

    tuned = run("tuned")
    manifest = json.loads((tuned / "manifest.json").read_text())
    cache = tmp_path / "cache-tuned"
    originals = [m for m in manifest["pool"] if m["role"] == "original"]
    members = [m for m in manifest["pool"] if m["role"] == "fine-tune"]
    seeds = manifest["config"]["seeds"]
    per_seed = len(members) // len(seeds)
    for s, seed in enumerate(seeds):
        original = load_file(
            cache / "classic-models" / f"{originals[s if len(originals) > 1 else 0]['key']}.safetensors"
        )
        folder = tmp_path / "sweep" / f"seed{seed}"
        folder.mkdir(parents=True)
        save_file(original, folder / "theta0.safetensors")
        for j, member in enumerate(members[s * per_seed : (s + 1) * per_seed]):
            tau = load_file(cache / "classic-pool" / f"{member['key']}.safetensors")
            theta = {k: (v.float() + tau[k]).to(v.dtype) if k in tau else v for k, v in original.items()}
            save_file(theta, folder / f"cand{j}.safetensors")
    sweep = tmp_path / "sweep" / "seed{seed}"
    loaded = run("from-disk", "--set", f"pool={{from: '{sweep}', theta0: '{sweep / 'theta0.safetensors'}'}}")
    _same_results_no_training_cost(pd.read_csv(tuned / "results.csv"), pd.read_csv(loaded / "results.csv"))
    disk = json.loads((loaded / "manifest.json").read_text())
    assert not any(m["role"] == "fine-tune" for m in disk["pool"])
    assert sum(m["role"] == "from-disk" for m in disk["pool"]) == len(members)
