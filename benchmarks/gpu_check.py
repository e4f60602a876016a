"""The GPU check (``nox -s gpu -- --out DIR``): one prepared call of at most ~10 minutes on a machine with
a CUDA device, every run in a fresh temporary cache (nothing replayed from an earlier run). Figures go
to ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``:

- the reduced real-backbone suite (ViT-B-32, random init) on CUDA in bf16, with the device memory
  allocated before/after and the peak of every stage; run twice, results.csv compared byte for byte;
- the same suite in fp16, compared with bf16 by ``negmerge-bench regress``;
- the same suite in fp32 with ``torch.use_deterministic_algorithms(True, warn_only=False)``: the ops
  without a deterministic kernel (also collected as warnings from the other runs);
- host syncs per training step and per lambda point (``torch.cuda.set_sync_debug_mode``, as
  ``benchmarks/sync_counts.py`` counts them on a CPU);
- fp32 logits of ViT-B-32 on the GPU against the CPU, TF32 off (what fp32 runs use) and on;
- eval / train images/s of ViT-B-32 at 224 in fp32 and bf16.

Without CUDA it says so and exits 0. ``--rehearse-on-cpu`` runs every section on the CPU with the
mini backbone (seconds to minutes; no GPU figure), so the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.cli import main  # noqa: E402

BUDGET_S = 560  # sections still to start past this are skipped (the call's limit is 600 s)
REDUCED = [
    "--set", "forget=[sklearn-digits]",
    "--set", "data={train_limit: 256, eval_limit: 256}",
    "--set", "finetune.grid={steps: [5, 10]}",
    "--set", "finetune.base={lr: 0.00001, batch_size: 64, warmup_steps: 2}",
    "--set", "baselines.ga.grid={steps: [2], lr: [0.00001]}",
    "--set", "selection.lambda_step=0.25",
    "--set", "eval_batch_size=256",
]  # fmt: skip
NON_DETERMINISTIC = "does not have a deterministic implementation"


class Check:
    """The sections, each timed and kept apart: one that fails is recorded and the rest still run."""

    def __init__(self, out: Path, device: str, backbone: str, started: float) -> None:
        self.out, self.device, self.backbone, self.started = out, device, backbone, started
        self.figures: dict[str, object] = {"device": device, "backbone": backbone, "sections": {}}
        self.nondeterministic: set[str] = set()
        self.gpu = device.startswith("cuda")

    def section(self, name: str, fn) -> None:
        elapsed = time.perf_counter() - self.started
        record: dict[str, object]
        if elapsed > BUDGET_S:
            record = {"status": "skipped", "why": f"time: {elapsed:.0f} s used of {BUDGET_S}"}
        else:
            start = time.perf_counter()
            print(f"[gpu-check] {name} ...", flush=True)
            try:
                record = {"status": "ok", **fn()}
            except Exception as exc:
                record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            record["seconds"] = round(time.perf_counter() - start, 1)
        self.figures["sections"][name] = record
        print(f"[gpu-check] {name}: {record['status']} ({record.get('seconds', 0)} s)", flush=True)
        self.write()

    # -- the reduced suite -------------------------------------------------------------------------------
    def suite(self, precision: str, tag: str, strict: bool = False, memory: bool = False) -> dict[str, object]:
        """One reduced run in a fresh cache; returns its exit code, folder and per-stage memory."""
        from bench.results import RunRecorder

        run_dir = self.out / "runs" / tag
        stages: dict[str, dict[str, float]] = {}
        timed = RunRecorder.timed

        @contextlib.contextmanager
        def timed_with_memory(recorder, stage: str):
            if not self.gpu:
                with timed(recorder, stage):
                    yield
                return
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                with timed(recorder, stage):
                    yield
            finally:
                torch.cuda.synchronize()
                stages[stage] = {
                    "allocated_before_mb": before / 2**20,
                    "allocated_after_mb": torch.cuda.memory_allocated() / 2**20,
                    "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                }

        env = {"NEGMERGE_STRICT_DETERMINISM": "1"} if strict else {}
        with tempfile.TemporaryDirectory() as cache, _environ(NEGMERGE_CACHE=cache, **env):
            RunRecorder.timed = timed_with_memory if memory else timed
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    argv = ["run", "mini-clip-tiny", "--out", str(run_dir), "--no-report", "--device", self.device]
                    argv += ["--precision", precision, "--set", f"backbone={{name: {self.backbone}, pretrained: null}}"]
                    code = main([*argv, *REDUCED])
            finally:
                RunRecorder.timed = timed
        self.nondeterministic |= {str(w.message).split(".")[0] for w in caught if NON_DETERMINISTIC in str(w.message)}
        return {"exit": code, "run_dir": str(run_dir), "stages": stages}

    def bf16_twice(self) -> dict[str, object]:
        first = self.suite("bf16", "bf16-a", memory=True)
        second = self.suite("bf16", "bf16-b")
        a, b = (Path(r["run_dir"]) / "results.csv" for r in (first, second))
        same = a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
        return {
            "exits": [first["exit"], second["exit"]],
            "results_identical": same,
            "memory_per_stage": first["stages"],
        }

    def fp16_vs_bf16(self) -> dict[str, object]:
        fp16 = self.suite("fp16" if self.gpu else "fp32", "fp16")  # a CPU refuses fp16: rehearsed in fp32
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["regress", fp16["run_dir"], "--against", str(self.out / "runs" / "bf16-a")])
        return {"exit": fp16["exit"], "regress_exit": code, "regress": printed.getvalue()}

    def strict_determinism(self) -> dict[str, object]:
        try:
            run = self.suite("fp32", "fp32-strict", strict=True)
            raised = ""
        except RuntimeError as exc:  # the first op without a deterministic kernel
            run, raised = {"exit": None}, str(exc).split("\n")[0]
        return {"exit": run["exit"], "raised": raised, "warned_ops": sorted(self.nondeterministic)}

    # -- kernels -----------------------------------------------------------------------------------------
    def syncs(self) -> dict[str, object]:
        from benchmarks.sync_counts import measure

        return measure(self.device)

    def fp32_logits(self) -> dict[str, object]:
        from bench.backbones import load_backbone
        from bench.data import ImageSplit
        from bench.device import fp32_math, resolve_runtime
        from bench.evaluate import Evaluator

        torch.manual_seed(0)
        backbone = load_backbone(self.backbone, None)
        size = backbone.image_size
        split = ImageSplit(
            labels=torch.zeros(64, dtype=torch.long),
            images=torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8),
        )
        head = torch.nn.functional.normalize(torch.randn(10, backbone.model.text_projection.shape[1]), dim=-1)
        cpu = Evaluator(backbone, batch_size=32).logits(split, head)
        out: dict[str, object] = {}
        rt = resolve_runtime(self.device, "fp32")
        for tf32 in (False, True):
            fp32_math("bf16" if tf32 else "fp32")  # TF32 allowed exactly as a bf16 run allows it
            got = Evaluator(backbone, batch_size=32, runtime=rt).logits(split, head)
            diff = (got - cpu).abs()
            out[f"tf32_{'on' if tf32 else 'off'}"] = {
                "max_abs_diff": diff.max().item(),
                "mean_abs_diff": diff.mean().item(),
                "argmax_agreement": (got.argmax(-1) == cpu.argmax(-1)).float().mean().item(),
            }
        fp32_math("fp32")
        return out

    def throughput(self) -> dict[str, object]:
        from bench.config import load_suite
        from bench.plan import measure_throughput

        out = {}
        for precision in ("fp32", "bf16"):
            overrides = [f"backbone={{name: {self.backbone}, pretrained: null}}", f"device={self.device}"]
            overrides += [f"precision={precision}", "eval_batch_size=256", "finetune.base={batch_size: 128}"]
            eval_ips, train_ips = measure_throughput(
                load_suite("mini-clip-tiny", overrides), batches=10 if self.gpu else 1
            )
            out[precision] = {"eval_images_per_s": round(eval_ips, 1), "train_images_per_s": round(train_ips, 1)}
        return out

    # -- output ------------------------------------------------------------------------------------------
    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.figures, indent=2, default=str) + "\n")
        lines = [f"# GPU check: {self.figures.get('device_name', self.device)}", ""]
        for name, record in self.figures["sections"].items():
            shown = {k: v for k, v in record.items() if k != "trace"}
            lines += [f"## {name} ({record['status']})", "", "```", json.dumps(shown, indent=2, default=str), "```", ""]
        (self.out / "gpu_check.md").write_text("\n".join(lines))


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("NEGMERGE_RUNS", "runs")) / "gpu-check")
    parser.add_argument("--rehearse-on-cpu", action="store_true", help="every section on the CPU, mini backbone")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.rehearse_on_cpu:
        print("gpu check skipped: torch sees no CUDA device here; nothing to check (run it where a GPU is lent)")
        return 0
    started = time.perf_counter()
    device, backbone = ("cpu", "mini-clip-vit") if args.rehearse_on_cpu else ("cuda", "ViT-B-32")
    check = Check(args.out, device, backbone, started)
    if check.gpu:
        major, minor = torch.cuda.get_device_capability()
        check.figures |= {"device_name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    check.figures["torch"] = torch.__version__
    check.section("host syncs", check.syncs)
    check.section("fp32 logits, GPU vs CPU", check.fp32_logits)
    check.section("throughput", check.throughput)
    check.section("bf16 twice", check.bf16_twice)
    check.section("fp16 vs bf16", check.fp16_vs_bf16)
    check.section("strict determinism", check.strict_determinism)
    check.figures["seconds"] = round(time.perf_counter() - started, 1)
    check.write()
    failed = [n for n, r in check.figures["sections"].items() if r["status"] == "failed"]
    print(f"[gpu-check] figures in {args.out}/gpu_check.json and .md; {len(failed)} sections failed {failed or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
