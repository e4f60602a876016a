"""Device and precision: the same code on CPU in fp32 (bit-identical), in bf16 (autocast), clear errors
for a device or precision this machine cannot give, in-place lambda points, and the cost plan."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from bench.backbones import load_backbone, visual_state
from bench.cli import main
from bench.device import CPU, resolve_runtime
from bench.errors import BenchError
from bench.evaluate import Evaluator
from negmerge import apply

QUICK = ["--set", "forget=[sklearn-digits]"]


def test_load_edit_gives_the_bits_of_apply():
    backbone = load_backbone("mini-clip-vit", None)
    theta0 = visual_state(backbone)
    tau = {k: 0.01 * torch.randn_like(v) for k, v in theta0.items() if k != "proj"}  # one key absent
    in_place, rebuilt = Evaluator(backbone), Evaluator(backbone)
    in_place.set_base(theta0)
    for coef in (-0.35, 1.0):
        in_place.load_edit(tau, coef)
        rebuilt.load(apply(theta0, tau, coef))
        assert all(torch.equal(in_place.params[k], rebuilt.params[k]) for k in theta0)


def _edit_case(n: int):
    """The mini encoder, theta_0, a random task vector, n random images and a random head."""
    from bench.data import ImageSplit

    backbone = load_backbone("mini-clip-vit", None)
    theta0 = visual_state(backbone)
    tau = {k: 0.05 * torch.randn_like(v) for k, v in theta0.items()}
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    split = ImageSplit(labels=torch.zeros(n, dtype=torch.long), images=images)
    return backbone, theta0, tau, split, torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)


def test_lanes_evaluate_lambda_points_concurrently_with_the_bits_of_one_lane():
    from bench.lanes import Lanes

    backbone, theta0, tau, split, head = _edit_case(96)
    lambdas = [0.1 * i for i in range(9)]

    def point(ev: Evaluator, lam: float) -> torch.Tensor:
        ev.load_edit(tau, -lam)
        return ev.logits(split, head)

    def sweep(n: int) -> list[torch.Tensor]:
        ev = Evaluator(backbone, batch_size=32)
        ev.set_base(theta0)
        lanes = Lanes(ev, n)
        assert len({id(e.visual) for e in lanes.evaluators}) == n  # each lane its own encoder
        try:
            return lanes.map(point, lambdas)
        finally:
            lanes.close()

    one, three = sweep(1), sweep(3)
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))
    assert not torch.equal(one[0], one[-1])  # the points differ: the lanes did not share weights


def test_inputs_converted_once_per_split_give_the_bits_of_per_batch_conversion(monkeypatch):
    """The normalised-input cache is a speed setting: whole splits, row slices on batch boundaries (a
    lane's chunk) and a split past the byte budget all give the logits of per-batch conversion."""
    import bench.evaluate as evaluate
    from bench.data import ImageSplit

    backbone, theta0, tau, split, head = _edit_case(100)
    other = ImageSplit(labels=split.labels[:40], images=torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8))
    converted = []
    monkeypatch.setattr(backbone, "to_input", lambda x, f=backbone.to_input: converted.append(len(x)) or f(x))

    def scores(budget: int) -> list[torch.Tensor]:
        monkeypatch.setattr(evaluate, "INPUT_CACHE_BYTES", budget)
        ev = Evaluator(backbone, batch_size=32)
        ev.set_base(theta0)
        ev.load_edit(tau, -0.4)
        twice = [ev.logits(split, head), ev.logits(split, head, rows=slice(32, 96)), ev.replica().logits(split, head)]
        return twice + [ev.logits(other, head)]

    per_batch = scores(0)
    assert sum(converted) == 100 + 64 + 100 + 40  # every call converts its batches again
    converted.clear()
    one_split = 100 * 3 * 28 * 28 * 4  # room for the first split only: the second is converted per batch
    cached = scores(one_split)
    assert sum(converted) == 100 + 40  # the split once (shared with the replica); the other per batch
    assert all(torch.equal(a, b) for a, b in zip(per_batch, cached, strict=True))
    assert torch.equal(per_batch[1], per_batch[0][32:96])


def test_a_failing_lambda_point_stops_the_sweep_with_its_error():
    from bench.lanes import Lanes

    lanes = Lanes(Evaluator(load_backbone("mini-clip-vit", None)), 2)

    def point(ev, lam):
        if lam == 3:
            raise ValueError("task vector: key 'proj' contains NaN or Inf")
        return lam

    with pytest.raises(ValueError, match="NaN or Inf"):
        lanes.map(point, range(8))
    lanes.close()


def test_compile_true_evaluates_the_compiled_encoder_and_follows_in_place_edits(monkeypatch, tmp_path):
    """compile: true wraps the encoder in torch.compile (inductor, on CPU here): the same predictions as
    eager, and a lambda point written in place reaches the compiled graph (parameters are its inputs).
    Inductor compiles for this CPU, so a CPU compile runs with native numerics (bench.numerics)."""
    monkeypatch.setenv("NEGMERGE_NUMERICS", "native")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # inductor reads it: its AVX2 code gave NaN here
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # its cache ignores the ISA
    backbone, theta0, tau, split, head = _edit_case(64)
    eager, compiled = Evaluator(backbone), Evaluator(backbone, runtime=resolve_runtime("cpu", compile=True))
    assert compiled.forward is not compiled.visual  # the torch.compile wrapper
    for ev in (eager, compiled):
        ev.set_base(theta0)
    for coef in (0.0, -0.7):
        eager.load_edit(tau, coef)
        compiled.load_edit(tau, coef)
        a, b = eager.logits(split, head), compiled.logits(split, head)
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-4)
        # the same prediction wherever the top two logits are further apart than allclose allows them
        # to move (a closer pair may swap on another CPU's kernels and still be within tolerance)
        top2 = a.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * (1e-3 + 1e-4 * a.abs().max())
        assert clear.float().mean() > 0.9 and torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def test_compile_on_a_cpu_is_refused_under_portable_numerics():
    with pytest.raises(BenchError, match="compile: true on a CPU generates kernels for this CPU"):
        resolve_runtime("cpu", compile=True)


def test_bf16_autocast_on_cpu_changes_the_forward_not_the_weights():
    backbone = load_backbone("mini-clip-vit", None)
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    from bench.data import ImageSplit

    split = ImageSplit(labels=torch.zeros(8, dtype=torch.long), images=images)
    head = torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)
    fp32 = Evaluator(backbone).logits(split, head)
    bf16 = Evaluator(backbone, runtime=resolve_runtime("cpu", "bf16")).logits(split, head)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=0.5)


def test_a_bf16_lambda_point_sees_the_edit_as_fp32_does():
    """The edit theta_0 + coef * tau must reach bf16's autocast matmuls, not a stale or pre-rounded copy:
    the change an edit makes to the logits points the same way in bf16 as in fp32 (cosine > 0.9; an edit
    of 10% of each tensor's std gives 0.99 over seeds, docs/metrics.md "Precision and the lambda curve")."""
    from bench.data import ImageSplit

    torch.manual_seed(0)
    backbone = load_backbone("mini-clip-vit", None)
    theta0 = visual_state(backbone)
    tau = {k: 0.1 * v.std().clamp_min(1e-3) * torch.randn_like(v) for k, v in theta0.items()}
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    split = ImageSplit(labels=torch.zeros(64, dtype=torch.long), images=images)
    head = torch.nn.functional.normalize(torch.randn(10, 64), dim=-1)

    def edit_effect(runtime, coef):
        evaluator = Evaluator(backbone, runtime=runtime)
        evaluator.set_base(theta0)
        evaluator.load_edit(tau, 0.0)
        base = evaluator.logits(split, head)
        evaluator.load_edit(tau, coef)
        return evaluator.logits(split, head) - base

    for coef in (-0.5, 0.5):
        fp32, bf16 = edit_effect(CPU, coef), edit_effect(resolve_runtime("cpu", "bf16"), coef)
        assert fp32.abs().mean() > 0.05  # an edit that moves the logits well past bf16's rounding
        assert torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0) > 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_an_unavailable_device_is_one_clear_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / "cache"))
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "error: device: cuda asked for, but torch sees no CUDA device here" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    with pytest.raises(BenchError, match="fp16 autocast is for CUDA"):
        resolve_runtime("cpu", "fp16")
    assert resolve_runtime("auto").device == CPU.device and resolve_runtime("auto").kind == "cpu"


def test_a_malformed_device_is_a_config_error(tmp_path, capsys):
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path), "--set", "device=gpu0"]) == 2
    assert "device: Value error, device must be auto, cpu, cuda or cuda:N, got 'gpu0'" in capsys.readouterr().err


def test_classic_training_and_logits_in_bf16_on_cpu():
    """Protocol B's training step and logits run their layers under bf16 autocast (seen by a hook on
    every Linear/Conv layer), keep fp32 master weights, and so train another model than fp32 from the
    same start, close to it."""
    from bench.classic_train import SgdParams, logits_of, train
    from bench.classifiers import build_classifier
    from bench.data.classic import load_classic

    data = load_classic("fashion-mnist", train_limit=256, test_limit=64, val_size=32, split_seed=0)

    def trained(runtime) -> tuple[torch.nn.Module, torch.Tensor, set[torch.dtype], set[torch.dtype]]:
        torch.manual_seed(0)
        model = build_classifier("small-resnet", data.num_classes, data.in_channels, [8, 8, 8])
        seen: set[torch.dtype] = set()
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for m in layers]
        params = SgdParams(epochs=1, batch_size=64)
        train(model, data, data.train_x, data.train_y, params, progress=False, runtime=runtime)
        in_training = set(seen)
        seen.clear()
        logits = logits_of(model, data, data.test_x, runtime=runtime)
        for hook in hooks:
            hook.remove()
        return model, logits, in_training, seen

    bf16_model, bf16_logits, *bf16_seen = trained(resolve_runtime("cpu", "bf16"))
    _, fp32_logits, *fp32_seen = trained(CPU)
    assert bf16_seen == [{torch.bfloat16}] * 2 and fp32_seen == [{torch.float32}] * 2  # training, then logits
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())  # master weights stay fp32
    assert bf16_logits.dtype == torch.float32 and torch.isfinite(bf16_logits).all()
    assert not torch.equal(bf16_logits, fp32_logits)
    # bf16 rounding, not another model: 0.45% of the largest logit on this machine, 5% allowed
    assert (bf16_logits - fp32_logits).abs().max() < 0.05 * fp32_logits.abs().max()


def test_plan_counts_the_paper_setting(capsys):
    assert main(["plan", "clip-vit-b32", "--images-per-second", "3000"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning runs: 312 (" in out  # 30 candidates + 9 gradient-ascent settings, x 8 datasets
    assert "GFLOP per image forward" in out and "device-hours" in out
    assert "phase 1: 312 units (240 finetune, 72 ga)" in out


@pytest.mark.integration
def test_bf16_on_cpu_runs_the_reduced_suite_end_to_end(tiny_backbone, tmp_path, monkeypatch):
    """The same pretrained backbone; fine-tuning and evaluation in bf16 beside fp32. What holds on any
    CPU: the bf16 run records its precision and makes its own fine-tunes (precision is in the pool keys),
    reports every method fp32 does, its selections keep the floor against its own zero-shot, and its
    numbers moved (autocast reached the forward passes) while zero-shot stayed near fp32's. Which
    lambdas bf16 selects differs between CPUs (and may from fp32's): printed, not asserted."""
    import json

    from tests.results_shape import assert_reported

    cache = tmp_path / "cache"
    shutil.copytree(tiny_backbone.parent, cache / "backbones")
    monkeypatch.setenv("NEGMERGE_CACHE", str(cache))
    argv = ["run", "mini-clip-tiny", "--no-report", "--set", f"backbone.pretrained={tiny_backbone}", *QUICK]
    assert main([*argv, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert main([*argv, "--out", str(tmp_path / "fp32")]) == 0
    runs = ("bf16", "fp32")
    results = {p: pd.read_csv(tmp_path / p / "results.csv") for p in runs}
    manifests = {p: json.loads((tmp_path / p / "manifest.json").read_text()) for p in runs}
    curves = {p: pd.read_csv(tmp_path / p / "curves.csv") for p in runs}
    assert {p: m["runtime"]["precision"] for p, m in manifests.items()} == {"bf16": "bf16", "fp32": "fp32"}
    pools = {p: {e["key"] for e in m["pool"]} for p, m in manifests.items()}
    assert len(pools["bf16"]) == 5 and not pools["bf16"] & pools["fp32"]  # 4 candidates and GA, each made twice
    assert not any(e["cached"] for e in manifests["fp32"]["pool"])

    methods = {"zeroshot", "single_best", "single_run", "average", "ties", "magmax", "dare", "iso_c", "negmerge", "ga"}
    assert set(results["bf16"].method) == set(results["fp32"].method) == methods
    for method in methods:  # its results, or (GA's setting may miss the floor in bf16) its row saying so
        assert_reported(results["bf16"], manifests["bf16"], method, 0, {"forget_acc", "control_acc", "mia_efficacy"})
    val = results["bf16"][results["bf16"].split == "val"].pivot_table(index="method", columns="metric", values="value")
    floor = manifests["bf16"]["config"]["selection"]["floor"]
    selected = val.control_acc.dropna()
    assert (selected >= floor * selected["zeroshot"] - 1e-9).all()  # the rule, in bf16's own terms

    points = curves["bf16"].merge(curves["fp32"], on=["dataset", "seed", "method", "lam"], suffixes=("", "_fp32"))
    assert len(points) == len(curves["fp32"]) == len(curves["bf16"])
    moved = (
        (points.forget_val - points.forget_val_fp32).abs().max(),
        (points.control_val - points.control_val_fp32).abs().max(),
    )
    assert max(moved) > 0  # some prediction of the ~60 lambda points x 300 images flipped under bf16

    def zero_shot(p: str) -> pd.Series:
        r = results[p]
        return (
            r[(r.method == "zeroshot") & r.metric.isin(["forget_acc", "control_acc"])]
            .set_index(["split", "metric"])
            .value
        )

    drift = (zero_shot("bf16") - zero_shot("fp32")).abs().max()
    assert drift <= 5.0  # bf16 rounding of the same encoder (1.7 points measured on another CPU), not a broken forward
    lams = {p: r[r.split == "val"].groupby("method").lam.first() for p, r in results.items()}
    changed = lams["bf16"].compare(lams["fp32"])
    print(f"\nbf16 vs fp32: curves move up to {max(moved):.2f} points, zero-shot {drift:.2f}; lambdas that differ:")
    print(changed if not changed.empty else "none")


def test_deterministic_kernels_are_the_default_and_can_be_turned_off():
    try:
        resolve_runtime("cpu", deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        resolve_runtime("cpu")
        assert torch.are_deterministic_algorithms_enabled()
        from bench.config import load_suite

        assert load_suite("mini-classic-tiny").deterministic
    finally:
        torch.use_deterministic_algorithms(False)
