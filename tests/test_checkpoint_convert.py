"""``negmerge-bench convert``: pickled whole models and state dicts become safetensors without
importing or running anything the pickle names; payloads are refused and never run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.backbones import register_suite_configs
from bench.cli import main


@pytest.fixture(scope="module")
def clip_model():
    register_suite_configs()
    torch.manual_seed(0)
    return open_clip.create_model("mini-clip-vit", pretrained=None)


def _convert(capsys, src: Path, out: Path, *flags: str) -> str:
    assert main(["convert", str(src), str(out), *flags]) == 0
    return capsys.readouterr().out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_a_pickled_whole_open_clip_model_gives_its_state_dict(clip_model, tmp_path, capsys):
    torch.save(clip_model, tmp_path / "whole.pt")
    printed = _convert(capsys, tmp_path / "whole.pt", tmp_path / "whole.safetensors")
    _assert_same(load_file(tmp_path / "whole.safetensors"), clip_model.state_dict())
    assert "visual.*" in printed and "transformer.*" in printed
    assert "attn_mask" not in load_file(tmp_path / "whole.safetensors")  # a non-persistent buffer


def test_a_pickled_state_dict_and_an_open_clip_checkpoint(clip_model, tmp_path, capsys):
    half = {k: v.to(torch.bfloat16) for k, v in clip_model.state_dict().items()}
    torch.save(half, tmp_path / "sd.pt")
    torch.save(
        {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in half.items()}}, tmp_path / "ck.pt"
    )
    for name in ("sd", "ck"):
        _convert(capsys, tmp_path / f"{name}.pt", tmp_path / f"{name}.safetensors")
        _assert_same(load_file(tmp_path / f"{name}.safetensors"), half)


WRAPPER = textwrap.dedent(
    """
    import sys, torch, open_clip
    from safetensors.torch import save_file
    from bench.backbones import register_suite_configs

    class ImageEncoder(torch.nn.Module):  # task_vectors' wrapper, defined only in this process
        def __init__(self):
            super().__init__()
            register_suite_configs()
            torch.manual_seed(1)
            self.model, self.train_preprocess, self.val_preprocess = open_clip.create_model_and_transforms(
                "mini-clip-vit", pretrained=None
            )
            self.cache_dir = "/nowhere"
            delattr(self.model, "transformer")

    encoder = ImageEncoder()
    torch.save(encoder, sys.argv[1])
    save_file({k: v.clone() for k, v in encoder.state_dict().items()}, sys.argv[2])
    """
)


def test_a_wrapper_class_that_is_not_importable_converts_exactly(tmp_path, capsys):
    script = tmp_path / "make.py"
    script.write_text(WRAPPER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, str(script), str(tmp_path / "enc.pt"), str(tmp_path / "ref.safetensors")],
                   check=True, env=env, capture_output=True)  # fmt: skip
    with pytest.raises(pickle.UnpicklingError, match="ImageEncoder"):  # a safe torch.load refuses the class
        torch.load(tmp_path / "enc.pt", weights_only=True)
    printed = _convert(capsys, tmp_path / "enc.pt", tmp_path / "enc.safetensors")
    assert "model.visual.*" in printed
    ref = load_file(tmp_path / "ref.safetensors")
    _assert_same(load_file(tmp_path / "enc.safetensors"), ref)
    _convert(capsys, tmp_path / "enc.pt", tmp_path / "stripped.safetensors", "--strip-prefix", "model.")
    _assert_same(load_file(tmp_path / "stripped.safetensors"), {k[len("model.") :]: v for k, v in ref.items()})


class _System:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Eval:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({str(self.path)!r}, 'w')",))


class _Call:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # an unknown callable with an object as argument
        return (torch.nn.functional.relu, (torch.zeros(2),))


@pytest.mark.parametrize("payload", [_System, _Eval, _Call])
def test_a_malicious_pickle_exits_2_and_its_payload_never_runs(payload, tmp_path, capsys):
    victim = tmp_path / "pwned"
    torch.save({"w": torch.ones(3), "x": payload(victim)}, tmp_path / "evil.pt")
    assert main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "refused" in err and len(err.splitlines()) == 1, err
    assert not victim.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_strip_prefix_that_does_not_fit_and_an_existing_out_are_refused(clip_model, tmp_path, capsys):
    torch.save(clip_model.state_dict(), tmp_path / "sd.pt")
    assert main(["convert", str(tmp_path / "sd.pt"), str(tmp_path / "o.safetensors"), "--strip-prefix", "model."]) == 2
    assert "'model.'" in capsys.readouterr().err
    save_file({"a": torch.zeros(1)}, tmp_path / "o.safetensors")
    assert main(["convert", str(tmp_path / "sd.pt"), str(tmp_path / "o.safetensors")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "sd.pt"), str(tmp_path / "o.safetensors"), "--overwrite"]) == 0
