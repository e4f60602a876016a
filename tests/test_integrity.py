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
