"""Config validation errors name the field; the CLI lists and rejects clearly."""

from __future__ import annotations

import pytest

from bench.cli import main
from bench.config import load_suite
from bench.errors import BenchError


def test_training_method_without_settings_is_refused():
    with pytest.raises(BenchError, match="method 'ga' needs settings under baselines.ga"):
        load_suite("mini-clip", ["baselines={}", "methods=[zeroshot,ga]"])
    assert "ga" not in load_suite("mini-clip", ["baselines={}"]).methods  # the default skips it


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bogus=1", "bogus: Extra inputs are not permitted"),
        ("methods=[negmerge,lasso]", "methods: Value error, unknown method 'lasso'"),
        ("forget=[cifar7]", "forget: Value error, unknown dataset 'cifar7'"),
        ("control=nope", "control: Value error, unknown dataset 'nope'"),
        ("finetune.grid={}", "finetune.grid: Value error, the grid is empty"),
        ("finetune.grid={lr: []}", "finetune.grid: Value error, the grid is empty"),
        ("finetune.grid={learning_rate: [1]}", "unknown hyperparameter 'learning_rate'"),
        ("selection.floor=0", "selection.floor: Value error, floor must be in (0, 1]"),
        ("selection.floor=1.5", "selection.floor: Value error, floor must be in (0, 1]"),
        ("merge_params={tie: {k: 0.2}}", "merge_params: Value error, unknown merge 'tie'; did you mean 'ties'?"),
        ("methods=[negmerg]", "methods: Value error, unknown method 'negmerg'; did you mean 'negmerge'?"),
        ("methods=[zeroshot,rl]", "method 'rl' is not offered by protocol clip (it needs forget, relabel, retain)"),
        ("jobs=0", "jobs: Value error, jobs must be auto or >= 1, got 0"),
        ("methods=[retrain]", "method 'retrain' is not offered by protocol clip; offered: zeroshot, ga,"),
        ("baselines={salun: {grid: {lr: [0.1]}}}", "baselines: Value error, baseline 'salun' is not offered by"),
        (
            "gradient_ascent={grid: {lr: [0.1]}}",
            "gradient ascent is the method 'ga' now; move its grid to baselines.ga",
        ),
    ],
)
def test_bad_config_names_the_field(override, message):
    with pytest.raises(BenchError) as err:
        load_suite("mini-clip", [override])
    assert message in str(err.value)


def test_unknown_suite_and_bad_override():
    with pytest.raises(BenchError, match="unknown suite 'mini-clp'; known suites: .*mini-clip"):
        load_suite("mini-clp")
    with pytest.raises(BenchError, match="expected key=value"):
        load_suite("mini-clip", ["selection.floor"])


def test_unknown_backbone_fails_fast(capsys):
    assert (
        main(
            [
                "run",
                "mini-clip",
                "--set",
                "backbone.name=ViT-Q-99",
                "--set",
                "backbone.pretrained=null",
                "--out",
                "/tmp/negmerge-never-written",
            ]
        )
        == 2
    )
    assert "backbone.name: unknown model 'ViT-Q-99'" in capsys.readouterr().err


def test_missing_pretrained_weights_fail_fast_offline(monkeypatch):
    from bench.backbones import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/tmp/negmerge-empty-hf-home")
    with pytest.raises(BenchError, match="not in the local Hugging Face cache"):
        load_backbone("ViT-B-32", "openai")
    with pytest.raises(BenchError, match="checkpoint file /nonexistent.pt does not exist"):
        load_backbone("ViT-B-32", "/nonexistent.pt")
    with pytest.raises(BenchError, match="no pretrained tag 'nonsense'"):
        load_backbone("ViT-B-32", "nonsense")


@pytest.mark.parametrize("what", ["suites", "methods", "datasets", "backbones"])
def test_list(capsys, what):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert {"suites": "mini-clip", "methods": "negmerge", "datasets": "fashion-mnist", "backbones": "ViT-B-32"}[
        what
    ] in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods=[retrain,unlearn9]", "methods: Value error, unknown method 'unlearn9'"),
        ("baselines={ft: {base: {}}, sgd: {base: {}}}", "baselines: Value error, unknown baseline 'sgd'"),
        ("merge_params={tie: {k: 0.2}}", "merge_params: Value error, unknown merge 'tie'"),
        ("pool.grid={momentum: []}", "pool.grid: Value error, the grid is empty"),
        ("pool.base={learning_rate: 0.1}", "unknown SGD setting 'learning_rate'"),
        (
            "baseline_params.rl.retain_fracton=0.5",
            "baseline_params: Value error, unknown rl parameter 'retain_fracton'",
        ),
        (
            "baseline_params.salun.retain_fraction=0",
            "baseline_params: Value error, salun.retain_fraction must be in (0, 1]",
        ),
        ("selection.rule=closest", "selection.rule: Input should be 'floor', 'avg_gap' or 'control_only'"),
        ("forget={mode: class}", "forget.classes: class-wise forgetting needs at least one class"),
        ("protocol=other", "protocol: expected one of clip, classic"),
    ],
)
def test_bad_classic_config_names_the_field(override, message):
    with pytest.raises(BenchError) as err:
        load_suite("mini-classic", [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("merge_params.ties.k=2", "merge_params: Value error, ties: k must be a fraction in (0, 1], got 2"),
        ("merge_params.negmerge.threshold=0", "negmerge: threshold must be a number in (0, 1], got 0"),
        ("merge_params.ties.kk=0.1", "unknown ties parameter 'kk'; known: k, scope"),
        ("merge_params.dare.p=1", "merge_params: Value error, dare: p must be a drop probability in [0, 1), got 1"),
        ("merge_params.dare.base=magmax", "dare: base must be one of average, ties, negmerge, got 'magmax'"),
        ("merge_params.dare={base: ties, base_params: {k: 2}}", "dare: base_params: k must be a fraction in (0, 1]"),
        ("merge_params.iso_c.rank=4", "unknown iso_c parameter 'rank'; known: none"),
        ("finetune.base.lr=-1", "finetune: Value error, invalid fine-tuning setting: lr must be > 0, got -1"),
        ("finetune.base.batch_size=0", "invalid fine-tuning setting: batch_size must be >= 1, got 0"),
        ("finetune.grid.randaug=[m9-n2]", "randaug 'm9-n2' is not a timm RandAugment string"),
        ("finetune.base.freeze=[mlp]", "freeze: unknown group 'mlp'; known: attention"),
    ],
)
def test_bad_training_and_merge_settings_fail_at_load(override, message, tmp_path, capsys):
    """Refused before anything is fine-tuned (they used to fail minutes in, at training or merge time)."""
    assert main(["run", "mini-clip-tiny", "--set", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    assert main(["run", "mini-clip-tiny", "--out", str(target)]) == 2
    assert f"--out: {target} is a file" in capsys.readouterr().err


def test_a_damaged_results_csv_is_one_clear_error(tmp_path, capsys):
    import shutil
    from pathlib import Path

    run = shutil.copytree(Path(__file__).parents[1] / "results" / "mini-clip-tiny", tmp_path / "run")
    (run / "results.csv").write_text('suite,backbone\n"unterminated,x\n')
    assert main(["report", str(run)]) == 2
    assert f"error: {run / 'results.csv'} is damaged" in capsys.readouterr().err


def test_ctrl_c_says_the_run_can_be_resumed(monkeypatch, capsys):
    import bench.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.cli, "cmd_status", interrupted)
    assert main(["status", "mini-clip-tiny"]) == 130
    assert "interrupted: everything finished so far is cached" in capsys.readouterr().err


def test_a_full_disk_leaves_no_partial_file_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import shutil
    from pathlib import Path

    import bench.report
    from bench.io import write_atomic

    def full(f):
        f.write(b"part" if "b" in f.mode else "part")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.txt"))

    with pytest.raises(OSError):
        write_atomic(tmp_path / "x.txt", full)
    assert list(tmp_path.iterdir()) == []  # neither the entry nor its temporary file

    run = shutil.copytree(Path(__file__).parents[1] / "results" / "mini-clip-tiny", tmp_path / "run")
    monkeypatch.setattr(bench.report, "write_atomic", lambda path, write, mode="w": write_atomic(path, full, mode))
    assert main(["report", str(run)]) == 2
    assert "error: no space left writing" in capsys.readouterr().err


def test_the_jobs_flag_overrides_the_suite():
    from bench.cli import _runtime_overrides, build_parser

    args = build_parser().parse_args(["run", "mini-clip", "--jobs", "3", "--set", "jobs=1"])
    assert load_suite("mini-clip", _runtime_overrides(args)).jobs == 3
    assert load_suite("mini-clip").jobs == "auto"
