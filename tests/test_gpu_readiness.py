"""What a first GPU run would hit, checked on the CPU (issue 29): evaluation residency within a byte
budget, loss scaling in every fp16 training loop, TF32 off in fp32, the runtime in every cache key, a
GPU that was given but is not seen, host syncs that do not grow with the steps, one lane per
accelerator. CUDA itself is faked where a check needs torch.cuda to answer (no kernel runs)."""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bench.backbones import load_backbone, visual_state
from bench.cli import main
from bench.data import ImageSplit
from bench.device import CPU, Runtime, fp32_math, gpu_expected, resolve_runtime
from bench.errors import BenchError
from bench.evaluate import Evaluator, Residency, _Staging
from bench.syncs import count_syncs

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="fakes or expects no CUDA (the GPU check runs on GPUs)")


def _case(sizes: tuple[int, ...] = (100, 60)):
    backbone = load_backbone("mini-clip-vit", None)
    theta0 = visual_state(backbone)
    tau = {k: 0.05 * torch.randn_like(v) for k, v in theta0.items()}
    splits = [
        ImageSplit(
            labels=torch.zeros(n, dtype=torch.long), images=torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        )
        for n in sizes
    ]
    head = F.normalize(torch.randn(10, backbone.model.text_projection.shape[1]), dim=-1)
    return backbone, theta0, tau, splits, head


# -- residency -------------------------------------------------------------------------------------------


def test_resident_bytes_stay_under_the_budget_while_larger_splits_are_evaluated_with_the_same_logits():
    backbone, theta0, tau, (big, small), head = _case()
    per_input = 3 * backbone.image_size**2 * 4
    budget = big.images.nbytes + small.images.nbytes + per_input * len(small) + 10  # big's inputs do not fit

    def sweep(ev: Evaluator) -> list[torch.Tensor]:
        ev.set_base(theta0)
        out = []
        for coef in (-0.2, -0.6):
            ev.load_edit(tau, coef)
            out += [ev.logits(big, head), ev.logits(small, head), ev.logits(big, head, rows=slice(32, 96))]
        return out

    reference = sweep(Evaluator(backbone, batch_size=32, budget=0))  # nothing held: every batch converted
    held = Evaluator(backbone, batch_size=32, budget=budget, copy_splits=True)
    assert big.images.nbytes + per_input * len(big) > budget - small.images.nbytes  # the big split cannot all stay
    got = sweep(held)
    assert all(torch.equal(a, b) for a, b in zip(reference, got, strict=True))
    assert 0 < held.residency.peak <= budget
    held.release(big, small)
    assert held.residency.used == 0
    tight = Evaluator(backbone, batch_size=32, budget=big.images.nbytes // 2, copy_splits=True)
    assert all(torch.equal(a, b) for a, b in zip(reference, sweep(tight), strict=True))  # all streamed
    assert tight.residency.peak <= big.images.nbytes // 2


def test_residency_is_first_come_and_released_explicitly():
    r = Residency(100)
    a, b = torch.zeros(60, dtype=torch.uint8), torch.zeros(50, dtype=torch.uint8)
    assert r.get_or_add(a, "uint8", 60, a.clone) is not None
    assert r.get_or_add(b, "uint8", 50, b.clone) is None  # would pass the budget: streamed, nothing evicted
    assert r.used == r.peak == 60
    r.release(a)
    assert r.used == 0 and r.get_or_add(b, "uint8", 50, b.clone) is not None


def test_staging_reuses_two_buffers_of_one_batch_and_hands_out_copies():
    staging = _Staging(torch.device("cpu"))
    images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    out = [staging.stage(images[s : s + 16]) for s in range(0, 70, 16)]
    assert len(staging._buffers) == 2 and all(b.numel() == 16 * 3 * 8 * 8 for b in staging._buffers)
    assert torch.equal(torch.cat(out), images)  # a reused buffer never overwrote a batch handed out
    assert torch.equal(staging.upload(images, 16), images)


# -- fp16 loss scaling -----------------------------------------------------------------------------------


class _SpyScaler:
    """A real, enabled GradScaler that counts its steps."""

    def __init__(self, log: list[str]) -> None:
        self.inner, self.log = torch.amp.GradScaler("cpu", enabled=True), log

    def scale(self, x):
        self.log.append("scale")
        return self.inner.scale(x)

    def unscale_(self, opt):
        return self.inner.unscale_(opt)

    def step(self, opt):
        self.log.append("step")
        return self.inner.step(opt)

    def update(self):
        self.log.append("update")
        return self.inner.update()


FP16 = Runtime(torch.device("cpu"), "fp16")  # resolve_runtime refuses fp16 on a CPU; the loops' wiring is checked here


@pytest.fixture
def scaler_log(monkeypatch):
    log: list[str] = []
    monkeypatch.setattr(Runtime, "grad_scaler", lambda self: _SpyScaler(log) if self.precision == "fp16" else None)
    return log


def test_protocol_b_training_steps_a_grad_scaler_in_fp16(scaler_log):
    from bench.classic_train import SgdParams, train
    from bench.classifiers import build_classifier
    from bench.data.classic import ClassicData

    x, y = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8), torch.randint(0, 10, (64,))
    data = ClassicData("fixture", 10, 1, (0.5,), (0.25,), x, y, x, y, x, y)
    model = build_classifier("small-resnet", 10, 1, [4, 4, 4], image_size=12)
    train(model, data, x, y, SgdParams(epochs=1, batch_size=16, augment=True), progress=False, runtime=FP16)
    assert scaler_log.count("step") == scaler_log.count("update") == scaler_log.count("scale") == 4


def test_fp16_saliency_gradients_are_taken_in_fp32(monkeypatch):
    from bench.classic_train import saliency_mask
    from bench.classifiers import build_classifier
    from bench.data.classic import ClassicData

    entered = []
    monkeypatch.setattr(Runtime, "autocast", lambda self: entered.append(self.precision) or torch.autocast("cpu"))
    x, y = torch.randint(0, 256, (32, 1, 12, 12), dtype=torch.uint8), torch.randint(0, 10, (32,))
    data = ClassicData("fixture", 10, 1, (0.5,), (0.25,), x, y, x, y, x, y)
    model = build_classifier("small-resnet", 10, 1, [4, 4, 4], image_size=12)
    saliency_mask(model, data, x, y, batch_size=16, runtime=FP16)
    assert entered == []
    saliency_mask(model, data, x, y, batch_size=16, runtime=Runtime(torch.device("cpu"), "bf16"))
    assert entered == ["bf16", "bf16"]


def test_pretraining_and_fine_tuning_step_a_grad_scaler_in_fp16(scaler_log, tmp_path):
    from bench.config import DataCfg, PretrainCfg
    from bench.finetune import FinetuneParams, finetune
    from bench.pretrain import _pretrain

    cfg = PretrainCfg(datasets={"sklearn-digits": 0.2}, steps=3, batch_size=8)
    _pretrain("mini-clip-vit", cfg, DataCfg(), tmp_path / "b.safetensors", False, FP16)
    assert scaler_log.count("step") == scaler_log.count("update") == 3
    scaler_log.clear()
    backbone, _, _, (split,), head = _case((32,))
    finetune(
        backbone, head, split, FinetuneParams(steps=2, batch_size=16, warmup_steps=1), progress=False, runtime=FP16
    )
    assert scaler_log.count("step") == 2


# -- CUDA settings, faked --------------------------------------------------------------------------------


@dataclass
class FakeGpu:
    name: str = "NVIDIA A100-SXM4-80GB"
    capability: tuple[int, int] = (8, 0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda answering as a machine with two GPUs of ``gpu`` (no kernel is ever launched)."""
    gpu, current = FakeGpu(), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu.name)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    yield types.SimpleNamespace(gpu=gpu, current=current)
    matmul, cudnn, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    torch.use_deterministic_algorithms(False)


@no_cuda
def test_fp32_on_cuda_turns_tf32_off_for_matmuls_and_cudnn_and_makes_cuda_n_current(fake_cuda):
    rt = resolve_runtime("cuda:1", "bf16")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    rt = resolve_runtime("cuda:1", "fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert fake_cuda.current[-1] == torch.device("cuda:1") and rt.kind == "cuda:NVIDIA A100-SXM4-80GB:sm80"
    fp32_math("bf16")
    assert torch.backends.cudnn.allow_tf32


@no_cuda
def test_bf16_below_compute_capability_8_is_refused(fake_cuda):
    fake_cuda.gpu.name, fake_cuda.gpu.capability = "Tesla V100-SXM2-32GB", (7, 0)
    with pytest.raises(BenchError, match=r"bf16 on Tesla V100.*compute capability 7\.0.*8\.0"):
        resolve_runtime("cuda", "bf16")
    assert resolve_runtime("cuda", "fp16").precision == "fp16"


@no_cuda
def test_the_runtime_is_part_of_every_cache_key(fake_cuda, tmp_path, monkeypatch):
    """A plain CPU run keeps its keys; another device kind (each GPU model), compile or non-deterministic
    kernels give other keys: pool specs, evaluation contexts, heads, pretrained backbones."""
    import bench.heads as heads
    import bench.pretrain as pretrain
    from bench.config import DataCfg, PretrainCfg
    from bench.pool import CandidatePool

    a100 = Runtime(torch.device("cuda:0"))
    assert CPU.key() == {} and CPU.key_suffix() == "" and CPU.kind == "cpu"
    kinds = {a100.kind}
    fake_cuda.gpu.name, fake_cuda.gpu.capability = "NVIDIA H100 80GB HBM3", (9, 0)
    kinds.add(a100.kind)
    assert len(kinds) == 2
    runtimes = [
        CPU,
        a100,
        Runtime(torch.device("cpu"), compile=True),
        Runtime(torch.device("cpu"), deterministic=False),
    ]
    pool = CandidatePool(tmp_path / "pool")
    assert len({pool.key({"dataset": "x", **rt.key()}) for rt in runtimes}) == 4
    assert len({rt.key_suffix() for rt in runtimes}) == 4

    made = []
    monkeypatch.setattr(pretrain, "_pretrain", lambda *a: made.append(a[3]) or a[3])
    monkeypatch.setattr(heads, "build_head", lambda *a: torch.zeros(2, 3))
    cfg = PretrainCfg(datasets={"sklearn-digits": 0.1})
    paths = {pretrain.pretrained_checkpoint("m", cfg, DataCfg(), tmp_path, False, rt) for rt in runtimes}
    assert len(paths) == 4
    for rt in runtimes:
        heads.cached_head(None, "b", ["a"], ["{c}"], tmp_path, rt)
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 4


@no_cuda
def test_clip_runs_put_the_runtime_into_pool_specs_and_evaluation_contexts(fake_cuda):
    from bench.config import load_suite
    from bench.finetune import FinetuneParams
    from bench.protocol_clip import ClipRun, Grid

    cfg = load_suite("mini-clip-tiny")
    grid = Grid([FinetuneParams(steps=1)], "fine-tune", ImageSplit(labels=torch.zeros(3)), 1)
    task = types.SimpleNamespace(name="sklearn-digits")
    specs = [
        ClipRun._spec(types.SimpleNamespace(cfg=cfg, backbone_id="b", rt=rt, _left_out=lambda task: {}), grid, 0, task)
        for rt in (CPU, Runtime(torch.device("cuda:0")))
    ]
    assert "device_kind" not in specs[0] and specs[1]["device_kind"] == "cuda:NVIDIA A100-SXM4-80GB:sm80"


# -- a GPU that was given but is not seen ----------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("var, value", [("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_JOB_GPUS", "3")])
def test_a_run_that_expects_a_gpu_and_finds_none_exits_2(var, value, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("NEGMERGE_CACHE", str(tmp_path / "cache"))
    assert main(["run", "mini-clip-tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: device: auto, and a GPU was expected ({var}={value}), but torch sees no CUDA device" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert resolve_runtime("cpu").kind == "cpu"  # asking for the CPU on purpose is no error


@no_cuda
@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_an_empty_gpu_list_expects_no_gpu(value, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    monkeypatch.delenv("SLURM_JOB_GPUS", raising=False)
    monkeypatch.delenv("SLURM_STEP_GPUS", raising=False)
    monkeypatch.delenv("NEGMERGE_EXPECT_GPU", raising=False)
    assert gpu_expected() is None and resolve_runtime("auto").kind == "cpu"


@no_cuda
def test_cluster_jobs_with_gpus_expect_one_and_share_an_inductor_cache(tmp_path, capsys, monkeypatch):
    from bench.cluster import job_environment

    env = job_environment(tmp_path, expect_gpu=True)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") and env["NEGMERGE_CACHE"] == str(tmp_path)
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NEGMERGE_EXPECT_GPU", env["NEGMERGE_EXPECT_GPU"])
    with pytest.raises(BenchError, match="--gpus-per-node >= 1"):
        resolve_runtime("auto")
    assert "NEGMERGE_EXPECT_GPU" not in job_environment(tmp_path, expect_gpu=False)
    argv = ["run", "mini-clip-tiny", "--out", str(tmp_path / "run"), "--executor", "local", "--gpus-per-node", "1"]
    assert main(argv) == 2
    assert "error: --gpus-per-node 1: local jobs run on this machine, where torch sees 0 CUDA devices" in (
        capsys.readouterr().err
    )


def test_one_evaluation_lane_on_an_accelerator():
    from bench.lanes import resolve_jobs

    with pytest.warns(UserWarning, match="jobs: 4 on an accelerator runs as 1"):
        assert resolve_jobs(4, 1, on_accelerator=True) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_jobs("auto", 1, on_accelerator=True) == 1
    assert resolve_jobs(4, 1, on_accelerator=False) == 4


# -- host syncs ------------------------------------------------------------------------------------------


def test_training_steps_add_no_host_syncs_and_a_lambda_point_one_per_split():
    """Counted by ``bench.syncs`` (on a CPU: the calls that sync on a GPU); the project's own lines only."""
    from bench.finetune import CHECK_EVERY, FinetuneParams, _batches, finetune

    backbone, theta0, tau, (split, control), head = _case((64, 48))
    assert (
        next(_batches(split, backbone, FinetuneParams(batch_size=8), torch.Generator(), grayscale=False, workers=0))[
            0
        ].dtype
        == torch.uint8
    )  # in-memory batches travel as uint8; normalised on the device

    def tune(steps: int) -> int:
        with count_syncs() as n:
            finetune(backbone, head, split, FinetuneParams(steps=steps, batch_size=16, warmup_steps=1), progress=False)
        return n.in_project

    assert tune(3) == tune(CHECK_EVERY - 1)  # the finiteness flag is read at the end, not per step
    assert tune(CHECK_EVERY) == tune(3) + 1  # ... and every CHECK_EVERY steps

    ev = Evaluator(backbone, batch_size=16)
    ev.set_base(theta0)
    ev.load_edit(tau, -0.1)
    ev.logits(split, head)
    with count_syncs() as n:
        for coef in (-0.2, -0.3, -0.4):
            ev.load_edit(tau, coef)
            ev.logits(split, head), ev.logits(control, head)
    assert n.in_project == 3 * 2  # one device-to-host copy per split, not one per batch (7 batches)


def test_a_diverged_loss_is_still_caught_by_the_deferred_flag():
    from bench.finetune import Diverged, FinetuneParams, finetune

    backbone, _, _, (split,), head = _case((32,))
    with pytest.raises(Diverged, match="NaN/Inf by step 2"):
        finetune(backbone, head * float("nan"), split, FinetuneParams(steps=2, batch_size=16), progress=False)


# -- the plan's memory estimate --------------------------------------------------------------------------


def test_the_plan_estimates_device_memory_per_stage_within_the_residency_budget():
    """clip-vit-b32 at the paper's split sizes: before the fix every split stays on the device (the
    last dataset's test stage holds all of them); after it, what the evaluator holds is within budget."""
    from bench.config import load_suite
    from bench.memplan import EncoderBytes, memory_plan
    from bench.plan import plan_clip

    cfg = load_suite("clip-vit-b32")
    plan = plan_clip(cfg, count_flops=False)
    enc = EncoderBytes(visual=10**8, model=2 * 10**8, saved_per_image=10**7, eval_per_image=10**6, image_size=224)
    budget = 4 << 30
    peaks = memory_plan(cfg, plan.sizes, enc, budget=budget)
    held_by_model = 3 * enc.visual + cfg.eval_batch_size * (enc.eval_per_image + 4 * 3 * 224**2)
    assert peaks["test + MIA"]["after"] <= budget + held_by_model
    every_split = sum(s.val + s.test + s.train for n, s in plan.sizes.items() if n != cfg.control)
    every_split += plan.sizes[cfg.control].val + plan.sizes[cfg.control].test
    assert peaks["test + MIA"]["before"] >= every_split * 3 * 224**2  # all uint8 splits, never released
    assert all(v["after"] < v["before"] for k, v in peaks.items() if k != "budget")


def test_a_fine_tune_only_unit_builds_no_evaluator(tmp_path, monkeypatch):
    """A cluster unit that makes one pool entry evaluates nothing, so it holds no evaluation copy of the
    encoder (ViT-L/14: ~2.4 GB with theta_0 and a task vector) next to the one it trains."""
    import bench.protocol_clip as protocol_clip
    from bench.config import load_suite
    from bench.runner import run_suite
    from bench.units import Unit

    def no_evaluator(*args, **kwargs):
        raise AssertionError("a fine-tune-only unit built an Evaluator")

    monkeypatch.setattr(protocol_clip, "Evaluator", no_evaluator)
    overrides = ["backbone={name: mini-clip-vit, pretrained: null}", "forget=[sklearn-digits]", "progress=false"]
    overrides += ["data={train_limit: 64, eval_limit: 32}", "finetune.grid={steps: [2]}", "device=cpu"]
    cfg = load_suite("mini-clip-tiny", overrides)
    run_suite(cfg, tmp_path / "unit", tmp_path / "cache", Unit("finetune", cfg.seeds[0], "sklearn-digits", index=0))
    assert len(list((tmp_path / "cache" / "pool").glob("*.safetensors"))) == 1


@no_cuda
def test_classic_runs_key_models_pool_and_evaluations_by_the_runtime(fake_cuda, tmp_path):
    from bench.config import load_suite
    from bench.protocol_classic import ClassicRun

    keys = []
    for rt in (CPU, Runtime(torch.device("cuda:0"))):
        run = ClassicRun(load_suite("mini-classic-tiny"), tmp_path / "out", tmp_path / "cache")
        run.rt = rt
        run._key_by_runtime()
        keys.append((run.models.key({"role": "original"}), run.pool.key({"df": "x"}), run.evals._path({"model": "m"})))
    assert all(a != b for a, b in zip(*keys, strict=True))
    plain = ClassicRun(load_suite("mini-classic-tiny"), tmp_path / "out", tmp_path / "cache")
    assert keys[0] == (
        plain.models.key({"role": "original"}),
        plain.pool.key({"df": "x"}),
        plain.evals._path({"model": "m"}),
    )
