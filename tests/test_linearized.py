"""Linearised (tangent) fine-tuning, bench.linearized and bench.linear_finetune: the linear model is
the encoder at theta_0, its output moves by exactly J . Delta, it trains only what may train, and the
config and the pool keys treat the mode as they should (docs/metrics.md, "Linearised fine-tuning")."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.backbones import load_backbone
from bench.cli import main
from bench.codehash import closure, code_digest
from bench.config import load_suite
from bench.data.registry import ImageSplit
from bench.evaluate import Evaluator
from bench.finetune import FinetuneParams, finetune
from bench.linear_finetune import finetune_linear
from bench.linearized import LinearizedEncoder, tangent
from negmerge import task_vector
from tests.test_pool_keys import _clip_keys


@pytest.fixture(scope="module")
def backbone():
    """The project's mini encoder (mini-clip-vit), random init: what the linear model wraps."""
    return load_backbone("mini-clip-vit", None, seed=0)


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _delta(visual: torch.nn.Module, scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in visual.named_parameters()}


def test_the_linear_model_has_the_encoders_parameters(backbone):
    lin = LinearizedEncoder(backbone.visual)
    assert [n for n, _ in lin.named_parameters()] == [n for n, _ in backbone.visual.named_parameters()]
    assert list(lin.state_dict()) == list(backbone.visual.state_dict())
    twin = copy.deepcopy(lin)
    assert twin._skeleton._parameters is twin._parameters and twin.theta0["proj"] is not lin.theta0["proj"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_at_zero_delta_the_outputs_are_the_encoders_bits(backbone, mode):
    visual = getattr(copy.deepcopy(backbone.visual), mode)()
    lin = getattr(LinearizedEncoder(visual), mode)()
    x = _images()
    with torch.no_grad():
        assert torch.equal(lin(x), visual(x))
    if mode == "train":  # with gradients on, as in fine-tuning
        assert torch.equal(lin(x), visual(x))


def test_a_linear_edit_at_coef_zero_is_the_encoders_logits_and_a_nonzero_one_is_not(backbone):
    theta0 = {k: v.detach().clone() for k, v in backbone.visual.state_dict().items()}
    tau = _delta(backbone.visual, 1e-2)
    split = ImageSplit(labels=torch.zeros(10, dtype=torch.long), images=torch.randint(0, 255, (10, 28, 28)).byte())
    head = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    ev = Evaluator(backbone, batch_size=4)
    ev.set_base(theta0)
    ev.load(theta0)
    plain = ev.logits(split, head)
    ev.load_edit(tau, 0.0, linear=True)
    assert torch.equal(ev.logits(split, head), plain)
    ev.load_edit(tau, -0.5, linear=True)
    linear = ev.logits(split, head)
    ev.load_edit(tau, -0.5)
    nonlinear = ev.logits(split, head)
    assert not torch.equal(linear, plain) and not torch.equal(linear, nonlinear)
    ev.load(theta0)  # a later plain load is the encoder again, not the last edit
    assert torch.equal(ev.logits(split, head), plain)


def _double_reference(visual: torch.nn.Module, delta: dict[str, torch.Tensor], x: torch.Tensor, eps: float):
    """f(theta_0) + J . delta, J . delta as a central finite difference in float64, computed with the
    encoder's ordinary forward pass (no jvp): O(eps^2) truncation, ~1e-16 / eps rounding."""
    model = copy.deepcopy(visual).double().eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def at(t: float) -> torch.Tensor:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + t * delta[n].double())
            return model(x.double())

    return at(0.0) + (at(eps) - at(-eps)) / (2 * eps)


def test_a_small_delta_moves_the_output_by_j_delta(backbone):
    """In float64 the linear model agrees with an independent finite difference to ~1e-9; in float32
    (what runs) to float32's precision."""
    x = _images(4)
    delta = _delta(backbone.visual, 1e-3)
    reference = _double_reference(backbone.visual, delta, x, eps=1e-5)
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 2e-5)):
        lin = LinearizedEncoder(copy.deepcopy(backbone.visual).to(dtype)).eval()
        with torch.no_grad():
            for n, p in lin.named_parameters():
                p.add_(delta[n].to(dtype))
            out = lin(x.to(dtype)).double()
        scale = reference.abs().max().item()
        assert (out - reference).abs().max().item() <= tol * scale, dtype
    # the first-order term is what moved it: theta_0 + delta through the encoder itself is further off
    # than the finite difference's own error, so the check above can tell linear from non-linear
    with torch.no_grad():
        moved = copy.deepcopy(backbone.visual).double().eval()
        for n, p in moved.named_parameters():
            p.add_(delta[n].double())
        assert (moved(x.double()) - reference).abs().max().item() > 1e-8 * reference.abs().max().item()


def test_the_tangent_is_linear_in_delta(backbone):
    visual = copy.deepcopy(backbone.visual).double().eval()
    base = {n: p.detach() for n, p in visual.named_parameters()}
    x = _images(3).double()
    a, b = _delta(visual, 1.0, seed=2), _delta(visual, 1.0, seed=3)
    with torch.no_grad():
        combined = tangent(visual, base, {n: 2 * a[n] - 3 * b[n] for n in a}, x)
        parts = 2 * tangent(visual, base, a, x) - 3 * tangent(visual, base, b, x)
    assert torch.allclose(combined, parts, rtol=1e-10, atol=1e-10)


def _split(n: int = 32) -> ImageSplit:
    g = torch.Generator().manual_seed(0)
    return ImageSplit(
        labels=torch.randint(0, 3, (n,), generator=g), images=torch.randint(0, 255, (n, 28, 28), generator=g).byte()
    )


def test_a_linear_step_trains_only_the_listed_parameters(backbone):
    theta0 = {k: v.detach().clone() for k, v in backbone.visual.state_dict().items()}
    head = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    params = FinetuneParams(lr=1e-3, batch_size=8, steps=2, warmup_steps=0, freeze=("attention",))
    state = finetune_linear(backbone, head, _split(), params, progress=False)
    tau = task_vector(state, theta0)
    assert list(tau) == list(theta0)
    attention = [k for k in tau if "attn" in k.split(".")]
    assert attention and all(torch.count_nonzero(tau[k]) == 0 for k in attention)  # exactly zero
    assert all(torch.count_nonzero(tau[k]) > 0 for k in tau if k not in attention)
    assert all(torch.equal(v, theta0[k]) for k, v in backbone.visual.state_dict().items())  # theta_0 untouched
    standard = task_vector(finetune(backbone, head, _split(), params, progress=False), theta0)
    assert any(not torch.equal(tau[k], standard[k]) for k in tau if k not in attention)  # another model trained


def _refused(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "finetune.grid.mode=[standard, linear]",
            "finetune: Value error, grid.mode: the fine-tuning mode is not a hyperparameter",
        ),
        ("finetune.base.mode=linear", "finetune: Value error, base.mode: the fine-tuning mode is not a hyperparameter"),
        ("finetune.mode=tangent", "finetune.mode: Input should be 'standard' or 'linear'"),
        ("finetune.linear_eval=posthoc", "linear_eval: posthoc applies to linear candidates only"),
    ],
)
def test_protocol_a_mode_settings_are_checked_at_load(override, message, tmp_path, capsys):
    assert message in _refused(["run", "mini-clip-tiny", "--set", override, "--out", str(tmp_path)], capsys)


@pytest.mark.parametrize("section", ["pool", "finetune"])
def test_protocol_b_refuses_linear_with_the_reason(section, tmp_path, capsys):
    err = _refused(["run", "mini-classic-tiny", "--set", f"{section}.mode=linear", "--out", str(tmp_path)], capsys)
    assert f"{section}.mode: 'linear' is not offered by Protocol B" in err and "BatchNorm" in err
    assert load_suite("mini-classic-tiny", ["pool.mode=standard"]) == load_suite("mini-classic-tiny")


def test_the_linear_suite_and_posthoc_load():
    cfg = load_suite("mini-clip-linear")
    assert cfg.finetune.mode == "linear" and cfg.finetune.linear_eval == "linear"
    assert load_suite("mini-clip-linear", ["finetune.linear_eval=posthoc"]).finetune.linear_eval == "posthoc"
    tiny = load_suite("mini-clip-tiny").model_dump()
    linear = cfg.model_dump()
    assert {k for k in tiny if tiny[k] != linear[k]} == {"name", "description", "finetune"}
    assert {k for k in tiny["finetune"] if tiny["finetune"][k] != linear["finetune"][k]} == {"mode"}


def test_the_mode_is_in_the_pool_key_and_the_standard_keys_are_as_before(tmp_path):
    """A linear candidate has its own key (the mode in its spec, the linear code in its version);
    a standard one's spec has exactly the fields it had before modes, under the version of
    bench.finetune's closure, which holds none of the linear code (so its keys are unchanged)."""
    standard, ga = _clip_keys(tmp_path)
    linear, linear_ga = _clip_keys(tmp_path, overrides=["finetune.mode=linear"])
    assert linear_ga == ga  # gradient ascent trains the encoder in either suite
    assert len(set(linear)) == 4 and not set(linear) & set(standard)
    assert _clip_keys(tmp_path, overrides=["finetune.mode=standard"]) == [standard, ga]
    assert _clip_keys(tmp_path, overrides=["finetune.mode=linear", "finetune.linear_eval=posthoc"])[0] == linear
    files = {p.name for p in closure("bench.finetune")}
    assert not files & {"linearized.py", "linear_finetune.py", "protocol_clip.py", "config.py", "evaluate.py"}
    assert code_digest("bench.linear_finetune") != code_digest("bench.finetune")


def test_the_linear_spec_is_the_standard_spec_plus_the_mode(tmp_path):
    from bench.data.damaged import BadImageCheck
    from bench.device import CPU
    from bench.protocol_clip import ClipRun
    from bench.units import Unit
    from tests.test_pool_keys import _task

    specs = []
    for mode in ("standard", "linear"):
        run = ClipRun(load_suite("mini-clip-tiny", [f"finetune.mode={mode}"]), tmp_path / "out", tmp_path / "cache")
        run.backbone_id, run.rt, run.bad = "b0", CPU, BadImageCheck(tmp_path / "bad")
        task = _task()
        grid = run._grid(Unit("finetune", 0, task.name), task)
        specs.append((run._spec(grid, 0, task), run._pool_of(grid).version))
    (standard, v_standard), (linear, v_linear) = specs
    assert set(standard) == {"backbone", "dataset", "split", "n_train", "params", "direction", "precision"}
    assert linear == {**standard, "mode": "linear"}
    assert v_standard == code_digest("bench.finetune") and v_linear == code_digest("bench.linear_finetune")


@pytest.mark.parametrize(
    "overrides, edits, tag",
    [
        ([], False, {}),
        (["finetune.mode=linear"], True, {"eval": "linear"}),
        (["finetune.mode=linear", "finetune.linear_eval=posthoc"], False, {"eval": "posthoc"}),
    ],
)
def test_how_the_pool_vectors_are_applied_is_in_their_evaluation_keys(overrides, edits, tag, tmp_path):
    """A linear pool's vectors are edits of the linear model unless posthoc; the two share the pool's
    keys, so the evaluations carry which (a standard suite's evaluation keys get nothing new)."""
    from bench.protocol_clip import ClipRun

    run = ClipRun(load_suite("mini-clip-tiny", overrides), tmp_path / "out", tmp_path / "cache")
    assert run.linear_edits is edits and run.vector_tag == tag
