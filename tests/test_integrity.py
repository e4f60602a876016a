"""A damaged cache heals: a truncated pool entry or cached evaluation is detected on the next read,
set aside in CACHE/quarantine and recomputed, and the run ends with the same results.csv."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from bench.cli import main

QUICK = ["--set", "forget=[sklearn-digits]", "--no-report"]


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.integration
def test_truncated_pool_entry_and_evaluation_are_recomputed(tiny_backbone, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_backbone.parent, cache / "backbones")
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "clean"), *QUICK]) == 0
    clean = pd.read_csv(tmp_path / "clean" / "results.csv")

    victim = sorted((cache / "pool").glob("*.safetensors"))[0]
    _truncate(victim)
    capsys.readouterr()
    assert main(["cache", "verify"]) == 1  # found, not yet repaired
    assert f"damaged: pool/{victim.stem}.json" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=f"{victim.stem}.*is damaged"):
        assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "healed-pool"), *QUICK]) == 0
    manifest = json.loads((tmp_path / "healed-pool" / "manifest.json").read_text())
    assert [p["cached"] for p in manifest["pool"] if p["key"] == victim.stem] == [False]  # recomputed
    assert len(list((cache / "quarantine" / "pool").iterdir())) == 2  # its record and its tensor file
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "healed-pool" / "results.csv"), clean)

    evaluation = sorted((cache / "evals").glob("*.json"))[0]
    _truncate(evaluation)
    with pytest.warns(UserWarning, match="is damaged"):
        assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "healed-eval"), *QUICK]) == 0
    assert (cache / "quarantine" / "evals").is_dir()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "healed-eval" / "results.csv"), clean)
    assert main(["cache", "verify"]) == 0


@pytest.mark.integration
def test_cache_gc_keeps_exactly_what_kept_runs_use(tiny_backbone, tmp_path, monkeypatch, capsys):
    """Two runs share a cache; gc keeping the first removes only what the second alone made, and the
    first then reruns entirely from the cache with the same results.csv."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_backbone.parent, cache / "backbones")
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    kept, other = tmp_path / "kept", tmp_path / "other"
    assert main(["run", "mini-clip-tiny", "--out", str(kept), *QUICK]) == 0
    assert main(["run", "mini-clip-tiny", "--out", str(other), *QUICK, "--set", "finetune.grid.steps=[3]"]) == 0
    files = {p for p in cache.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert main(["cache", "gc", "--keep", str(kept), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert {p for p in cache.rglob("*") if p.is_file()} == files  # a dry run removes nothing

    assert main(["cache", "gc", "--keep", str(kept)]) == 0
    gone = files - {p for p in cache.rglob("*") if p.is_file()}
    other_only = {p["key"] for p in json.loads((other / "manifest.json").read_text())["pool"]} - {
        p["key"] for p in json.loads((kept / "manifest.json").read_text())["pool"]
    }
    assert other_only and {p.name.split(".")[0] for p in gone if p.parent.name == "pool"} == other_only
    assert any(p.parent.name == "evals" for p in gone)  # the other run's evaluations went too

    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "again"), *QUICK]) == 0
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert all(p["cached"] for p in manifest["pool"])
    assert any("0 computed" in note for note in manifest["notes"])  # every evaluation came from the cache
    results = pd.read_csv(tmp_path / "again" / "results.csv")
    pd.testing.assert_frame_equal(results, pd.read_csv(kept / "results.csv"))

    assert main(["cache", "gc", "--keep", str(tmp_path)]) == 2  # not a run folder: one clear error
    assert "no readable manifest.json" in capsys.readouterr().err


def _small_filesystem(path, megabytes: int) -> bool:
    """A size-limited tmpfs at ``path`` (root only, where mounts are allowed); False if none can be made."""
    import os
    import subprocess

    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.integration
def test_a_really_full_disk_stops_the_run_cleanly_and_the_rerun_resumes(tiny_backbone, tmp_path, monkeypatch, capsys):
    """The cache on a 1 MB file system (the pretrained backbone linked in from outside): the run stops
    with one line and exit code 2 when the disk fills, no temporary or half-written entry is left, every
    entry on disk verifies, and the same run resumes from those entries once there is room."""
    import subprocess

    small = tmp_path / "small"
    if not _small_filesystem(small, 1):
        pytest.skip("no size-limited file system can be mounted here (needs root); the injected-ENOSPC test covers it")
    room = tmp_path / "room"
    try:
        (small / "backbones").symlink_to(tiny_backbone.parent, target_is_directory=True)
        monkeypatch.setenv("NEGMERGE_CACHE", str(small))
        capsys.readouterr()
        assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "full"), *QUICK]) == 2
        assert "error: no space left writing" in capsys.readouterr().err
        assert not list(small.rglob("*.tmp"))  # no temporary file left behind
        assert main(["cache", "verify"]) == 0  # every entry on disk is whole
        kept = {p.name for p in (small / "pool").glob("*.safetensors")}
        shutil.copytree(small, room, symlinks=True)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert kept, "the disk filled before the first candidate: nothing to resume from"
    monkeypatch.setenv("NEGMERGE_CACHE", str(room))
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "resumed"), *QUICK]) == 0
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert {f"{p['key']}.safetensors" for p in manifest["pool"] if p["cached"]} == kept  # nothing redone


def _one_entry(root):
    """A pool with one entry, and the list its maker appends to each time it runs."""
    import torch

    from bench.pool import CandidatePool

    pool, made = CandidatePool(root, version="test"), []
    spec = {"candidate": 1}

    def make():
        made.append(1)
        return {"w": torch.arange(6.0)}

    entry = pool.get_or_create(spec, make)
    return pool, spec, make, entry, made


def _other_tensors(path) -> None:
    """Another valid safetensors file in its place (another entry's file copied over it)."""
    import torch

    from negmerge import save_state

    save_state({"w": torch.arange(9.0)}, path)


def _other_metadata(path) -> None:
    """The same tensors with other metadata: a longer header, still valid."""
    from safetensors.torch import load_file

    from negmerge import save_state

    save_state(load_file(path), path, metadata={"key": "x" * 40})


@pytest.mark.parametrize("damage", [_other_tensors, _other_metadata])
def test_a_valid_tensor_file_of_another_size_is_set_aside_on_read(tmp_path, damage):
    """A readable safetensors file whose size differs from the size its record holds: only the size
    check sees it (the header is valid). The next read quarantines the entry and recomputes it, and
    `cache verify` names the size."""
    from bench.integrity import verify_cache

    pool, spec, make, entry, made = _one_entry(tmp_path / "pool")
    recorded = json.loads(entry.path.with_suffix(".json").read_text())["size"]
    damage(entry.path)
    assert entry.path.stat().st_size != recorded
    checked, problems = verify_cache(tmp_path)
    assert checked == 1 and [p["problem"] for p in problems] == [
        f"{entry.path.name} has {entry.path.stat().st_size} bytes, its record says {recorded}"
    ]
    with pytest.warns(UserWarning, match=f"{entry.key}.*is damaged.*its record says {recorded}"):
        again = pool.get_or_create(spec, make)
    assert made == [1, 1] and not again.cached  # recomputed, not trusted
    assert len(list((tmp_path / "quarantine" / "pool").iterdir())) == 2  # its record and its tensor file
    assert verify_cache(tmp_path) == (1, [])


def test_a_same_size_change_is_found_by_its_content_hash(tmp_path):
    """One flipped byte of tensor data keeps the size and the header: a read trusts it (the cheap
    checks), `cache verify` finds it by the recorded sha256 and `--repair` sets it aside."""
    from bench.integrity import verify_cache

    pool, spec, make, entry, made = _one_entry(tmp_path / "pool")
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0x01
    entry.path.write_bytes(bytes(data))
    assert pool.get_or_create(spec, make).cached and made == [1]  # a read checks size and header only
    _, problems = verify_cache(tmp_path)
    assert [p["problem"] for p in problems] == [f"{entry.path.name}'s content hash differs from its record"]
    verify_cache(tmp_path, repair=True)
    assert not entry.path.exists() and len(list((tmp_path / "quarantine" / "pool").iterdir())) == 2
    assert not pool.get_or_create(spec, make).cached and made == [1, 1]
