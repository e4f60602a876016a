"""What a suite will cost, before it runs: fine-tuning runs, steps and images, evaluation forward
passes, FLOPs, what the cache already holds, and a time estimate at a given (or measured) throughput.

Split sizes come from the data when it is at hand (the same indexing a run does); for the paper's
datasets without a readable local copy, from the official split sizes below (marked "official" in the
output), after a warning that names the dataset and why its copy could not be read.
FLOPs per image are counted on the backbone itself (``torch.utils.flop_counter`` over one forward pass
at its image size, random weights: the count does not depend on them); a training image costs about
three forward passes (forward + backward).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from bench.errors import BenchError

# (train, test) images of the official splits, for plans made without the data at hand
OFFICIAL_SIZES = {
    "cars": (8144, 8041),
    "dtd": (3760, 1880),  # torchvision partition 1: train + val, test
    "eurosat": (21600, 2700),  # the task-vector literature's split of 27,000
    "gtsrb": (26640, 12630),
    "mnist": (60000, 10000),
    "resisc45": (18900, 6300),  # the task-vector literature's split of 31,500 (25,200 train+val)
    "sun397": (19850, 19850),  # partition 1
    "svhn": (73257, 26032),
    "imagenet": (1281167, 50000),
}


@dataclass
class Sizes:
    train: int  # the fine-tuning split (train minus Val)
    val: int
    test: int
    source: str


@dataclass
class Plan:
    suite: str
    finetune_runs: int = 0
    finetune_steps: int = 0
    train_images: int = 0
    eval_images: int = 0
    flops_per_image: float | None = None
    sizes: dict[str, Sizes] = field(default_factory=dict)
    # what each part of the suite spends: part -> [training images, evaluation images]
    parts: dict[str, list[int]] = field(default_factory=dict)

    def spend(self, part: str, train: int = 0, evaluate: int = 0) -> None:
        spent = self.parts.setdefault(part, [0, 0])
        spent[0] += train
        spent[1] += evaluate
        self.train_images += train
        self.eval_images += evaluate

    def shares(self) -> dict[str, float]:
        """Each part's share of the total, in forward-pass equivalents (a training image = 3)."""
        total = self.eval_images + 3 * self.train_images
        return {part: (evaluate + 3 * train) / total for part, (train, evaluate) in self.parts.items()} if total else {}

    @property
    def total_flops(self) -> float | None:
        if self.flops_per_image is None:
            return None
        return self.flops_per_image * (self.eval_images + 3 * self.train_images)

    def seconds(self, eval_ips: float, train_ips: float) -> float:
        return self.eval_images / eval_ips + self.train_images / train_ips


def _sizes(name: str, cfg) -> Sizes:
    from bench.data import load_task

    try:
        task = load_task(name, **cfg.data.load_kwargs())
        return Sizes(len(task.train), len(task.val), len(task.test), "data")
    except (BenchError, OSError) as exc:  # OSError: a folder this user may not read
        if name not in OFFICIAL_SIZES:
            raise
        reason = str(exc) if isinstance(exc, BenchError) else f"dataset {name!r}: cannot read its copy ({exc})"
        # a plan without the data is useful, but `run` on this config fails here: say why, never silently
        print(f"warning: {reason} [plan: using {name}'s official split sizes instead]", file=sys.stderr)
    n_train, n_test = OFFICIAL_SIZES[name]
    d = cfg.data
    n_val = min(int(round(n_train * d.val_fraction)), d.val_max)
    train, val, test = n_train - n_val, n_val, n_test
    if d.train_limit:
        train = min(train, d.train_limit)
    if d.eval_limit:
        val, test = min(val, d.eval_limit), min(test, d.eval_limit)
    return Sizes(train, val, test, "official")


def flops_per_image(model_name: str) -> float:
    """Forward FLOPs of the image encoder for one image (counted, not looked up)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.backbones import load_backbone

    backbone = load_backbone(model_name, None)
    x = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    counter = FlopCounterMode(display=False)
    with counter:  # grad enabled: nn.MultiheadAttention's fused no-grad fast path is invisible to the counter
        backbone.visual(x)
    return float(counter.get_total_flops())


def plan_clip(cfg, count_flops: bool = True) -> Plan:
    from bench.selection import lambda_grid

    plan = Plan(cfg.name)
    n_lambdas = len(lambda_grid(cfg.selection.lambda_start, cfg.selection.lambda_stop, cfg.selection.lambda_step))
    control = plan.sizes[cfg.control] = _sizes(cfg.control, cfg)
    from baselines import get_method
    from bench.units import training_methods

    merges = [m for m in cfg.methods if get_method(m).kind == "merge"]
    singles = [m for m in cfg.methods if get_method(m).kind == "single"]
    references = [m for m in cfg.methods if get_method(m).kind == "reference"]
    for name in cfg.forget:
        s = plan.sizes[name] = _sizes(name, cfg)
        val_pass = s.val + control.val
        test_pass = s.test + control.test + (s.train + s.test if cfg.mia.enabled else 0)
        for seed in cfg.seeds:
            # a pool from disk (pool.from) costs no fine-tuning; its candidates are not counted here
            points = cfg.finetune.points(seed, cfg.finetune_per_dataset.get(name)) if cfg.finetune else []
            if singles or merges:
                _fine_tunes(plan, "candidate pool (fine-tuning)", points, s.train)
            for method in training_methods(cfg):
                settings = cfg.baselines[method].points(seed)
                _fine_tunes(plan, method, settings, s.train)
                plan.spend(method, evaluate=val_pass * len(settings) + test_pass)
            for method in references:  # theta_0's Val pass is every floor's reference
                plan.spend(method, evaluate=val_pass + test_pass)
            for method in merges:
                plan.spend(method, evaluate=val_pass * n_lambdas + test_pass)
            for method in singles:  # the best single reads every candidate's curve; the single run one
                curves = len(points) if get_method(method).candidate == "best" else 1
                shared = get_method(method).candidate == "default" and any(
                    get_method(m).candidate == "best" for m in singles
                )  # the single run's curve is one of the best single's: evaluated once
                plan.spend(method, evaluate=(0 if shared else val_pass * n_lambdas * curves) + test_pass)
            if cfg.ablation is not None and cfg.ablation.sizes is not None and len(points) > 2:
                sizes = [n for n in (cfg.ablation.sizes or range(2, len(points) + 1)) if 2 <= n <= len(points)]
                draws = sum(1 if n == len(points) else cfg.ablation.draws for n in sizes)
                plan.spend("pool-size ablation", evaluate=val_pass * n_lambdas * draws)
            if cfg.ablation is not None:  # the studies: a curve and a test pass per merge, no fine-tune
                studied = len(cfg.ablation.thresholds) + len(cfg.ablation.pools) * len(merges)
                plan.spend("threshold and sub-pool studies", evaluate=(val_pass * n_lambdas + test_pass) * studied)
    if count_flops:
        plan.flops_per_image = flops_per_image(cfg.backbone.name)
    return plan


def _fine_tunes(plan: Plan, part: str, points, n_train: int) -> None:
    for p in points:
        steps = p.total_steps(n_train)
        plan.finetune_runs += 1
        plan.finetune_steps += steps
        plan.spend(part, train=steps * p.batch_size * p.grad_accum)


def measure_throughput(cfg, batches: int = 3) -> tuple[float, float]:
    """(eval, train) images per second of the suite's image encoder on its device and precision
    (random weights, the suite's eval and fine-tuning batch sizes; after one warm-up batch)."""
    import copy

    from bench.backbones import load_backbone

    rt = cfg.runtime()
    backbone = load_backbone(cfg.backbone.name, None)
    visual = copy.deepcopy(backbone.visual).to(rt.device)
    size = backbone.image_size

    def timed(fn, n: int) -> float:
        fn()  # warm-up (compilation, cudnn autotuning)
        if rt.on_accelerator:
            torch.cuda.synchronize(rt.device)
        start = time.perf_counter()
        for _ in range(batches):
            fn()
        if rt.on_accelerator:
            torch.cuda.synchronize(rt.device)
        return batches * n / (time.perf_counter() - start)

    eval_batch = cfg.eval_batch_size
    x_eval = torch.randn(eval_batch, 3, size, size, device=rt.device)

    def forward():
        with torch.no_grad(), rt.autocast():
            visual.eval()(x_eval)

    train_batch = cfg.finetune.points(cfg.seeds[0])[0].batch_size if cfg.finetune else eval_batch
    x_train = torch.randn(train_batch, 3, size, size, device=rt.device)
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-5)

    def step():
        visual.train()
        with rt.autocast():
            loss = visual(x_train).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(forward, eval_batch), timed(step, train_batch)


def format_plan(plan: Plan, eval_ips: float | None, train_ips: float | None, measured: bool, control: str = "") -> str:
    lines = [f"plan for {plan.suite}"]
    for name, s in plan.sizes.items():
        role = "control " if name == control else "forget  "
        lines.append(f"  {role}{name:12s} train {s.train:>9,}  val {s.val:>6,}  test {s.test:>7,}  ({s.source} sizes)")
    lines.append(
        f"fine-tuning runs: {plan.finetune_runs:,} ({plan.finetune_steps:,} steps, {plan.train_images:,} training images)"
    )
    lines.append(f"evaluation forward passes: {plan.eval_images:,} images")
    if plan.total_flops is not None:
        lines.append(
            f"FLOPs: {plan.flops_per_image / 1e9:.2f} GFLOP per image forward; total {plan.total_flops / 1e15:,.1f} PFLOP "
            "(training image = 3 forward)"
        )
    if plan.parts:
        lines.append("share of the total cost (forward-pass equivalents; a training image = 3):")
        for part, share in sorted(plan.shares().items(), key=lambda kv: -kv[1]):
            train, evaluate = plan.parts[part]
            lines.append(f"  {part:30s} {100 * share:5.1f}%  ({train:,} training, {evaluate:,} evaluation images)")
    if eval_ips and train_ips:
        hours = plan.seconds(eval_ips, train_ips) / 3600
        how = "measured here" if measured else "given"
        lines.append(
            f"estimated time at {eval_ips:,.0f} eval / {train_ips:,.0f} train images/s ({how}): {hours:,.1f} device-hours"
        )
    return "\n".join(lines)


def make_plan(cfg, images_per_second: float | None, measure: bool) -> str:
    from bench.config import ClipSuite
    from bench.units import describe_plan, plan_units

    if not isinstance(cfg, ClipSuite):
        return f"plan for {cfg.name}\n" + describe_plan(plan_units(cfg))
    plan = plan_clip(cfg)
    eval_ips = train_ips = None
    if measure:
        eval_ips, train_ips = measure_throughput(cfg)
    elif images_per_second:
        eval_ips, train_ips = images_per_second, images_per_second / 3
    text = format_plan(plan, eval_ips, train_ips, measure, cfg.control)
    from bench.memplan import encoder_bytes, format_memory, memory_plan

    enc = encoder_bytes(cfg.backbone.name)
    text += "\n" + format_memory(memory_plan(cfg, plan.sizes, enc), enc)
    return text + "\ncluster job layout:\n" + describe_plan(plan_units(cfg))
