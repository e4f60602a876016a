"""Protocol A (docs/protocols.md#protocol-a): CLIP task negation with a shared candidate pool.

For each seed and forget dataset, in stages: zero-shot reference; fine-tune the pool (cached); build
every merge's task vector from the same pool; sweep lambda on Val and select by the control-floor rule
(``bench.selection``, at every configured rule and floor, all from the same Val curves); evaluate the
test splits once per distinct chosen lambda, with membership inference;
the pool-size ablation; and the training-based methods (``baselines``), each a grid selected on Val.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from baselines import get_merge, get_method
from bench.backbones import Backbone, load_backbone, visual_state
from bench.codehash import code_digest
from bench.config import ClipSuite
from bench.cost import FREE, Cost, charge, forward_flops
from bench.data import ImageSplit, TaskData, load_task, prepare_eval
from bench.data.damaged import BadImageCheck
from bench.data.preprocessed import PreprocessedCache
from bench.errors import BenchError
from bench.evalcache import EvalCache, vector_id
from bench.evaluate import Evaluator, resident_budget, top1
from bench.finetune import FinetuneParams, finetune
from bench.heads import cached_head
from bench.lanes import Lanes, resolve_jobs
from bench.linear_finetune import finetune_linear
from bench.metrics import membership_metrics
from bench.pool import CandidatePool, PoolEntry
from bench.pretrain import pretrained_checkpoint
from bench.progress import progress_bar
from bench.results import RunRecorder
from bench.selection import Criterion, Selection, best_single, criteria, lambda_grid, select_lambda
from bench.studies import pool_members, study_row
from bench.units import PRODUCE, Unit, plan_units, training_methods, uses_pool
from negmerge import consensus_rate, task_vector


@dataclass(frozen=True)
class Edit:
    """theta_0 + coef * tau, applied by the evaluator in place on its device (no state dict is built);
    ``linear``: on the encoder's linearisation around theta_0, f(theta_0) + J (coef * tau)."""

    tau: Mapping[str, torch.Tensor]
    coef: float
    linear: bool = False


Weights = Mapping[str, torch.Tensor] | Edit


def _load(ev: Evaluator, state: Weights) -> None:
    """Put ``state`` into the lane ``ev``: an edit in place, or a whole state dict."""
    if isinstance(state, Edit):
        ev.load_edit(state.tau, state.coef, linear=state.linear)
    else:
        ev.load(state)


@dataclass(frozen=True)
class Grid:
    """Fine-tuning settings of one kind of pool entry: what they train on and in which direction."""

    points: list[FinetuneParams]
    tag: str  # "fine-tune" (the candidate pool) or a training method's name
    data: ImageSplit
    direction: int  # 1 descends the loss, -1 ascends it
    mode: str = "standard"  # "linear": the encoder's linearisation is trained (finetune.mode)


@dataclass
class EvalContext:
    """Everything evaluating one (seed, forget dataset) needs: the stages below take only this."""

    task: TaskData
    head: torch.Tensor
    control: TaskData
    head_c: torch.Tensor
    seed: int
    row: dict[str, Any]
    zs_val: tuple[float, float] = (
        math.nan,
        math.nan,
    )  # theta_0's (forget, control) Val top-1, set by the zero-shot stage

    @property
    def zs_control_val(self) -> float:
        """The floor's reference."""
        return self.zs_val[1]


@dataclass(frozen=True)
class ClipSets:
    """Protocol A's data for training-based methods: the forget set only (``baselines.training``)."""

    forget: ImageSplit

    @property
    def retain(self) -> ImageSplit:
        raise BenchError("Protocol A has no retain set")

    def relabelled(self, split, generator):
        raise BenchError("Protocol A does not relabel")

    def subsample(self, split, fraction, generator):
        raise BenchError("Protocol A does not subsample training sets")

    def concat(self, *splits):
        raise BenchError("Protocol A does not concatenate training sets")


class ClipRun:
    """The whole suite, or one work unit of it (``bench.units``: a fine-tune or a sweep)."""

    def __init__(
        self, cfg: ClipSuite, out: Path, cache: Path, unit: Unit | None = None, producer: bool = False
    ) -> None:
        """``unit``: run just that work unit; ``producer``: a worker that makes pool entries on demand."""
        self.cfg, self.out, self.cache, self.unit, self.producer = cfg, Path(out), Path(cache), unit, producer
        self.made_ahead: set[str] = set()  # pool keys this run's producers made (bench.producers)
        self.criteria = criteria(cfg.selection.rule_list, cfg.selection.floor_list)  # the first: the main table's
        self.rec = RunRecorder(self.out, cfg, selection_rule=self.criteria[0].rule)
        self._tests: dict[str, Future[dict[str, float]]] = {}  # this run's test evaluations, by what they measured
        self.pool = CandidatePool(self.cache / "pool")
        self.linear_pool = CandidatePool(self.cache / "pool", code_digest("bench.linear_finetune"))
        linear = cfg.finetune is not None and cfg.finetune.mode == "linear"
        # the pool's vectors (single best, merges, ablation) are applied to the linear model, except posthoc
        self.linear_edits = linear and cfg.finetune.linear_eval == "linear"
        self.vector_tag = {"eval": cfg.finetune.linear_eval} if linear else {}  # in their evaluations' keys
        self.lambdas = lambda_grid(cfg.selection.lambda_start, cfg.selection.lambda_stop, cfg.selection.lambda_step)
        self._pending: list[Callable[[], None]] = []  # recorder calls waiting for test metrics (_later)
        self._scoring: ThreadPoolExecutor | None = None  # the membership attacks, beside the lanes

    # -- evaluation helpers ----------------------------------------------------------------------
    def _accuracy(
        self, state: Weights, split_name: str, ctx: EvalContext, ev: Evaluator | None = None
    ) -> tuple[float, float]:
        """(forget, control) top-1 of ``state`` on ``split_name`` (val or test): on lane ``ev`` (a sweep's
        point), or spread over all lanes in batch-aligned chunks (a single evaluation)."""
        f_split, c_split = getattr(ctx.task, split_name), getattr(ctx.control, split_name)
        if split_name == "val":
            self.rec.count_pass("val")
        jobs = [(f_split, ctx.head), (c_split, ctx.head_c)]
        if ev is None:
            logits = self.lanes.logits(lambda lane: _load(lane, state), jobs)
        else:
            _load(ev, state)
            logits = [ev.logits(split, head) for split, head in jobs]
        return top1(logits[0], f_split.labels), top1(logits[1], c_split.labels)

    def _curves(
        self, ctx: EvalContext, vectors: list[tuple[str, Callable[[], Mapping[str, torch.Tensor]]]], desc: str
    ) -> list[tuple[list[float], list[float]]]:
        """Forget and control Val top-1 of theta_0 - lambda * tau at every lambda, for each (vector id,
        make tau) of a stage (cached per curve). The points of every curve not in the cache go to the
        evaluation lanes as one queue, so no lane waits for the others at the end of each curve; each
        tau is made when its first point starts and dropped after its last. lambda = 0 is theta_0
        itself, whose scores the zero-shot stage has."""
        whats = [
            {"curve": vid, "task": ctx.task.name, "lambdas": self.lambdas, **self.vector_tag} for vid, _ in vectors
        ]
        todo = [i for i, what in enumerate(whats) if self.evals.peek(what) is None]
        computed: dict[int, list[list[float]]] = {}
        if todo:
            nonzero = [lam for lam in self.lambdas if lam != 0.0]
            held = _OnDemand({i: vectors[i][1] for i in todo}, uses=len(nonzero))
            items = [(i, lam) for i in todo for lam in nonzero]

            def point(ev: Evaluator, item: tuple[int, float]) -> tuple[float, float]:
                i, lam = item
                try:
                    return self._accuracy(Edit(held.get(i), -lam, self.linear_edits), "val", ctx, ev)
                finally:
                    held.release(i)

            with progress_bar(total=len(items), desc=desc, enabled=self.cfg.progress) as bar:
                scores = dict(zip(items, self.lanes.map(point, items, done=lambda: bar.update()), strict=True))
            for i in todo:
                points = [ctx.zs_val if lam == 0.0 else scores[(i, lam)] for lam in self.lambdas]
                computed[i] = [[f for f, _ in points], [c for _, c in points]]
        out = []
        for i, what in enumerate(whats):
            # computed here: written now; found: read (another process may have written one meanwhile)
            forget, control = self.evals.get_or_compute(what, lambda i=i: computed[i])
            out.append((forget, control))
        return out

    def _cached_test(
        self, vid: str, lam: float, state_fn, ctx: EvalContext, tag: Mapping[str, str] | None = None
    ) -> Future[dict[str, float]]:
        """Test metrics at a selected point (cached). The logits are computed now, on the lanes; the
        scores (the membership attack fits an SVC: seconds of one core) on a background thread while
        the lanes go on with the next stage. Whoever records them waits (``_later``). ``tag``: how the
        pool's vectors are applied (``vector_tag``), for their evaluations' keys."""
        what = {"test": vid, "lam": lam, "task": ctx.task.name, "seed": ctx.seed, **(tag or {})}
        key = json.dumps(what, sort_keys=True)
        if key not in self._tests:  # several criteria that chose the same point share one evaluation
            self._tests[key] = self._new_test(what, state_fn, ctx)
        return self._tests[key]

    def _new_test(self, what: dict[str, Any], state_fn, ctx: EvalContext) -> Future[dict[str, float]]:
        def compute_here() -> dict[str, float]:
            return self._test_scores(self._test_logits(state_fn(), ctx), ctx)

        if self.evals.peek(what) is not None or self._scoring is None:
            done: Future[dict[str, float]] = Future()
            done.set_result(self.evals.get_or_compute(what, compute_here))
            return done
        logits = self._test_logits(state_fn(), ctx)
        return self._scoring.submit(self.evals.get_or_compute, what, lambda: self._test_scores(logits, ctx))

    def _test_logits(self, state, ctx: EvalContext) -> list[torch.Tensor]:
        """Logits of the forget and control test splits (and, with MIA on, of the forget set's training
        split), each split computed once, spread over the evaluation lanes."""
        task = ctx.task
        self.rec.count_pass("test")
        jobs = [(task.test, ctx.head), (ctx.control.test, ctx.head_c)]
        if self.cfg.mia.enabled:
            jobs.append((task.train_eval, ctx.head))
        return self.lanes.logits(lambda ev: _load(ev, state), jobs)

    def _test_scores(self, logits: list[torch.Tensor], ctx: EvalContext) -> dict[str, float]:
        """Test top-1 of the forget and control tasks and, with MIA on, membership inference."""
        task, mia = ctx.task, self.cfg.mia.enabled
        metrics = {
            "forget_acc": top1(logits[0], task.test.labels),
            "control_acc": top1(logits[1], ctx.control.test.labels),
        }
        if mia:
            # members: the forget set's fine-tuning split, half to train the attacker and half as its
            # targets; non-members: the forget test split (docs/metrics.md#membership-inference).
            member_logits, members = logits[2], task.train_eval.labels
            order = torch.randperm(len(members), generator=torch.Generator().manual_seed(ctx.seed))
            attack, target = order[: len(order) // 2], order[len(order) // 2 :]
            metrics |= membership_metrics(
                shadow=(member_logits[attack], members[attack]),
                nonmembers=(logits[0], task.test.labels),
                targets=(member_logits[target], members[target]),
                exposed=(member_logits, task.train.labels),
                max_per_class=self.cfg.mia.max_per_class,
                seed=ctx.seed,
            )
        return metrics

    # -- the pool and trained models -------------------------------------------------------------
    def _grid(self, unit: Unit, task: TaskData) -> Grid:
        """The fine-tuning settings a produce unit's kind names: the pool, or a training method's."""
        if unit.kind == "finetune":
            points = self.cfg.finetune.points(unit.seed, self.cfg.finetune_per_dataset.get(task.name))
            return Grid(points, "fine-tune", task.train, 1, self.cfg.finetune.mode)
        method = unit.method
        recipe = (
            get_method(method)
            .training(**self._params(method, "baseline_params"))
            .recipe(ClipSets(task.train), unit.seed)
        )
        if recipe.l1_alpha or recipe.saliency_sparsity is not None:
            raise BenchError(f"{method}: Protocol A's fine-tuning has no l1 penalty or saliency mask")
        return Grid(self.cfg.baselines[method].points(unit.seed), method, recipe.data, recipe.direction)

    def _spec(self, grid: Grid, i: int, task: TaskData) -> dict[str, Any]:
        made_by = {} if grid.tag == "fine-tune" else {"method": grid.tag}  # pool keys predate the registry
        mode = {} if grid.mode == "standard" else {"mode": grid.mode}  # standard keys: as before modes
        return {
            "backbone": self.backbone_id,
            "dataset": task.name,
            "split": self.cfg.data.load_kwargs(),
            "n_train": len(grid.data),
            "params": asdict(grid.points[i]),
            "direction": grid.direction,
            "precision": self.cfg.precision,
            **self.rt.key(),  # device kind, compile, deterministic (empty for a plain CPU run)
            **made_by,
            **mode,
            **self._left_out(task),
        }

    def _left_out(self, task: TaskData) -> dict[str, str]:
        """Which damaged training images ``data.bad_images=skip`` left out, for a pool key (nothing
        when none were: the keys of intact copies stay as they were)."""
        dropped = [d["problem"] for d in self.bad.dropped if d["dataset"] == task.name and d["split"] == "train"]
        if not dropped:
            return {}
        return {"left_out": hashlib.sha256("\n".join(dropped).encode()).hexdigest()[:16]}

    def _candidates(self, unit: Unit, task: TaskData, head) -> list[PoolEntry]:
        """Pool entries: task vectors of fine-tuning with each setting of the unit's grid (made now
        where missing); a unit with an ``index``: just that one."""
        grid = self._grid(unit, task)
        entries = []
        for i, params in enumerate(grid.points):
            if unit.index is not None and i != unit.index:
                continue

            def make(params=params, i=i):
                ft = (finetune_linear if grid.mode == "linear" else finetune)(
                    self.backbone,
                    head,
                    grid.data,
                    params,
                    direction=grid.direction,
                    desc=f"{grid.tag} {task.name} {i + 1}/{len(grid.points)}",
                    progress=self.cfg.progress,
                    grayscale=task.grayscale,
                    workers=self.cfg.data.workers,
                    runtime=self.rt,
                )
                return task_vector(ft, self.theta0)

            entry = self._pool_of(grid).get_or_create(self._spec(grid, i, task), make)
            if entry.key in self.made_ahead:  # made by this run's own workers: computed, not reused
                entry = replace(entry, cached=False)
            self.rec.pool_member(entry, grid.tag, params.label())
            entries.append(entry)
        return entries

    def _pool_of(self, grid: Grid) -> CandidatePool:
        """The cache of ``grid``'s entries: one folder, keyed by the code that makes them (linear
        candidates: ``bench.linear_finetune``'s closure, so the standard keys stay as they were)."""
        return self.linear_pool if grid.mode == "linear" else self.pool

    def _pool(self, seed: int, task: TaskData, head) -> list[PoolEntry]:
        if self.cfg.pool is not None:
            return self._pool_from_disk(seed, task)
        return self._candidates(Unit("finetune", seed, task.name), task, head)

    def _pool_from_disk(self, seed: int, task: TaskData) -> list[PoolEntry]:
        """``pool.from``: the user's sweep, keys mapped onto the image encoder and checked
        (bench.checkpoints.sweep)."""
        from bench.checkpoints.sweep import pool_from_disk

        source, spec = self.cfg.pool, {"backbone": self.backbone_id, "dataset": task.name}
        return pool_from_disk(self.pool, self.rec, source.from_, source.theta0, task.name, seed, self.theta0, spec)

    def _method_models(self, method: str, seed: int, task: TaskData, head) -> list[PoolEntry]:
        """A training-based method's settings, each trained from theta_0 as its recipe says."""
        return self._candidates(Unit("baseline", seed, task.name, method=method), task, head)

    def _produce_ahead(self, tasks: dict[str, TaskData]) -> None:
        """With ``jobs`` > 1 on a CPU, the fine-tunes this run still lacks are made first, ``jobs`` at a
        time in worker processes (``bench.producers``); the stages then find them in the pool."""
        if self.lanes is None or self.unit is not None or len(self.lanes) < 2 or self.rt.on_accelerator:
            return
        units = [u for u in plan_units(self.cfg)[0] if u.kind in PRODUCE]
        missing, cost = [], {}
        for u in units:
            task = tasks[u.dataset]
            grid = self._grid(u, task)
            if not self._pool_of(grid).has(self._spec(grid, u.index, task)):
                missing.append(u)
                params = grid.points[u.index]  # steps, doubled with RandAugment: longest first balances the processes
                cost[u] = params.total_steps(len(grid.data)) * params.grad_accum * (2 if params.randaug else 1)
        if len(missing) < 2:
            return
        missing.sort(key=lambda u: -cost[u])
        from functools import partial

        from bench.producers import produce_in_workers

        with self.rec.timed("fine-tunes, in parallel"):
            spawned = partial(_producer, self.cfg.model_dump_json(), str(self.out), str(self.cache))
            self.made_ahead = produce_in_workers(self, spawned, missing, len(self.lanes), self.cfg.progress)
        self.rec.note(f"{len(missing)} fine-tunes made up to {len(self.lanes)} at a time (this and worker processes)")

    def produce(self, unit: Unit) -> list[str]:
        """Make one produce unit's entry (``bench.producers``; a spawned worker sets up on first use);
        returns the keys it made (empty when another run had made it)."""
        if not hasattr(self, "tasks"):
            self.tasks = self._setup()
        task = self.tasks[unit.dataset]
        return [e.key for e in self._candidates(unit, task, self._head(task)) if not e.cached]

    def quiet(self) -> None:
        """No progress bars (a worker process: the parent shows the one bar)."""
        self.cfg = self.cfg.model_copy(update={"progress": False})

    # -- setup -----------------------------------------------------------------------------------
    def _backbone(self) -> Backbone:
        pretrained = self.cfg.backbone.pretrained
        if pretrained == "pretrain":
            with self.rec.timed("pretrain"):
                pretrained = str(
                    pretrained_checkpoint(
                        self.cfg.backbone.name,
                        self.cfg.pretrain,
                        self.cfg.data,
                        self.cache,
                        progress=self.cfg.progress,
                        runtime=self.rt,
                    )
                )
        with self.rec.timed("load backbone"):
            return load_backbone(self.cfg.backbone.name, pretrained)

    def _load_tasks(self) -> tuple[TaskData | None, dict[str, TaskData]]:
        """Index every dataset first: a bad root or a split that cannot be made fails before any work.
        A unit loads only its own dataset (and the control, if it evaluates)."""
        kwargs = self.cfg.data.load_kwargs()
        names = [self.unit.dataset] if self.unit else self.cfg.forget
        with self.rec.timed("index datasets"):
            control = None if self._producing else load_task(self.cfg.control, **kwargs)
            tasks = {name: load_task(name, **kwargs) for name in names}
        if self.cfg.data.bad_images == "skip":  # every split checked once (cached), damaged images left out
            with self.rec.timed("check images"):
                control = None if control is None else self.bad.clean(control)
                tasks = {name: self.bad.clean(task) for name, task in tasks.items()}
            self.rec.bad_images = self.bad.dropped
            if self.bad.dropped:
                n = len(self.bad.dropped)
                self.rec.note(f"{n} damaged image{'s' * (n != 1)} left out (data.bad_images=skip; listed below)")
        return control, tasks

    @property
    def _producing(self) -> bool:
        """This run is one unit that makes one pool entry (and evaluates nothing)."""
        return self.producer or (self.unit is not None and self.unit.kind in PRODUCE)

    def _prepare_eval(self, task: TaskData, members: bool) -> TaskData:
        with self.rec.timed(f"preprocess {task.name}"):
            return prepare_eval(task, self.backbone.preprocess, self.preprocessed, members=members)

    def _setup(self) -> dict[str, TaskData]:
        """Runtime, datasets, backbone, evaluator and caches; returns the forget tasks."""
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        self.rt = cfg.runtime()  # an unavailable device fails here, before any work
        self.rec.runtime = self.rt.describe()
        self.bad = BadImageCheck(self.cache / "bad-images", cfg.data.workers)
        control, tasks = self._load_tasks()
        self.backbone = self._backbone()
        self.backbone_id = self.backbone.identity()
        self.theta0 = visual_state(self.backbone)
        self.ev: Evaluator | None = None
        self.lanes: Lanes | None = None
        if not self._producing:  # a fine-tune-only unit holds no evaluation copy of the encoder
            budget = resident_budget(self.rt, cfg.eval_resident_gb)
            self.ev = Evaluator(self.backbone, cfg.eval_batch_size, self.rt, budget=budget)
            self.ev.set_base(self.theta0)
            self.lanes = Lanes(self.ev, resolve_jobs(cfg.jobs, cfg.threads, self.rt.on_accelerator))
        self.rec.runtime["jobs"] = len(self.lanes) if self.lanes else 1
        self.evals = EvalCache(
            self.cache / "evals",
            {
                "backbone": self.backbone_id,
                "data": cfg.data.load_kwargs(),
                "control": cfg.control,
                "mia": cfg.mia.model_dump(),
                "precision": cfg.precision,
                **({"left_out": self.bad.digest()} if self.bad.digest() else {}),  # data.bad_images=skip
                **self.rt.key(),
            },
            code_modules=("bench.evaluate", "bench.heads", "bench.protocol_clip"),
        )
        self.preprocessed = PreprocessedCache(self.cache / "preprocessed", cfg.data.workers, cfg.progress)
        if not self._producing:
            self.control = self._prepare_eval(control, members=False)
            self.head_c = self._head(self.control)
        return tasks

    def _params(self, method: str, section: str) -> dict[str, Any]:
        """A method's parameters from ``merge_params`` / ``baseline_params``, defaults filled in."""
        return get_method(method).resolved(getattr(self.cfg, section).get(method, {}))

    def _head(self, task: TaskData):
        return cached_head(self.backbone, self.backbone_id, task.classnames, task.templates, self.cache, self.rt)

    # -- cost ------------------------------------------------------------------------------------
    @property
    def _curve_points(self) -> int:
        """Val passes of one lambda curve (lambda = 0 is theta_0, scored once by the zero-shot stage)."""
        return sum(lam != 0.0 for lam in self.lambdas)

    @property
    def _default_index(self) -> int:
        """The single run's place in the pool: the grid's default setting (a pool from disk: its first
        candidate, in the sweep's order)."""
        return self.cfg.finetune.default_index if self.cfg.pool is None else 0

    @functools.cached_property
    def _flops_per_image(self) -> float:
        size = self.backbone.image_size
        return forward_flops(self.backbone.visual, torch.zeros(1, 3, size, size))

    def _cost(self, ctx: EvalContext, unlearn=(), select=(), val_points: int = 0) -> Cost:
        """A method's cost (bench.cost): its training from the pool records, and ``val_points`` Val
        passes over forget and control Val, plus theta_0's pass that sets the floor's reference."""
        val_pass = len(ctx.task.val) + len(ctx.control.val)
        return charge(unlearn, select, (val_points + 1) * val_pass, self._flops_per_image)

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> RunRecorder:
        tasks = self.tasks = self._setup()
        if not self._producing:  # every evaluation split decoded before any fine-tune: a damaged image stops it now
            self.prepared = {
                name: self._prepare_eval(task, members=self.cfg.mia.enabled) for name, task in tasks.items()
            }
        self._produce_ahead(tasks)
        if not self._producing:
            from bench.metrics import preload

            preload()  # before any fine-tune this process may make beside the scoring thread
            self._scoring = ThreadPoolExecutor(1, thread_name_prefix="scoring")
        try:
            self._evaluate_all(tasks)
            with self.rec.timed("test metrics, waited for"):
                self._flush()
        finally:
            if self.lanes is not None:
                self.lanes.close()
            if self._scoring is not None:
                self._scoring.shutdown(cancel_futures=True)
        self.rec.note(f"evaluation cache: {self.evals.hits} hits, {self.evals.misses} computed")
        self.rec.cache_entries["evals"] = sorted(self.evals.used)
        if self.preprocessed.built:
            self.rec.note(f"preprocessed {self.preprocessed.built} file-backed splits into the cache")
        self.rec.finish()
        return self.rec

    def _evaluate_all(self, tasks: dict[str, TaskData]) -> None:
        for seed in self.cfg.seeds:
            for name in self.cfg.forget:
                if self.unit is not None and (self.unit.seed, self.unit.dataset) != (seed, name):
                    continue
                head = self._head(tasks[name])
                if self._producing:
                    self._candidates(self.unit, tasks[name], head)
                    continue
                row = dict(backbone=f"{self.cfg.backbone.name}/{self.cfg.backbone.pretrained}", dataset=name, seed=seed)
                task = self.prepared[name]
                self._evaluate_task(EvalContext(task, head, self.control, self.head_c, seed, row))
                self.ev.release(
                    task.val, task.test, task.train_eval
                )  # its stages are done: its splits leave the device

    def _evaluate_task(self, ctx: EvalContext) -> None:
        """Every stage for one (seed, forget dataset)."""
        cfg, name, seed = self.cfg, ctx.task.name, ctx.seed
        with self.rec.timed(f"zero-shot {name}"):
            self._zero_shot(ctx)
        if uses_pool(cfg.methods):
            with self.rec.timed(f"pool {name} seed {seed}"):
                entries = self._pool(seed, ctx.task, ctx.head)
                ok = [e for e in entries if e.status == "ok"]
            if not ok:
                self._later(
                    partial(self.rec.note, f"{name} seed {seed}: every candidate failed; no task-vector method can run")
                )
                return
            vectors = self._merges(ctx, ok)
            for method in vectors:  # a merge's model needs every candidate; its selection, one curve
                self.rec.charge(ctx.row, method, self._cost(ctx, unlearn=ok, val_points=self._curve_points))
            with self.rec.timed(f"lambda sweep {name} seed {seed}"):
                self._single_vectors(ctx, ok, entries[self._default_index])
                self._sweep_merges(ctx, vectors)
            if cfg.ablation is not None and cfg.ablation.sizes is not None and len(ok) > 2:
                with self.rec.timed(f"pool-size ablation {name} seed {seed}"):
                    self._ablation(ctx, ok)
            if cfg.ablation is not None and (cfg.ablation.thresholds or cfg.ablation.pools):
                with self.rec.timed(f"studies {name} seed {seed}"):
                    self._studies(ctx, ok)
        for method in training_methods(cfg):
            with self.rec.timed(f"{method} {name} seed {seed}"):
                self._training_method(ctx, method)

    # -- stages ----------------------------------------------------------------------------------
    def _zero_shot(self, ctx: EvalContext) -> None:
        ctx.zs_val = tuple(
            self.evals.get_or_compute({"zero-shot val": ctx.task.name}, lambda: self._accuracy(self.theta0, "val", ctx))
        )
        forget_val = ctx.zs_val[0]
        test = self._cached_test("zero-shot", 0.0, lambda: self.theta0, ctx)
        for method in self.cfg.methods:
            if get_method(method).kind == "reference":
                self.rec.charge(ctx.row, method, FREE)
                for crit in self.criteria:
                    self._result(ctx, method, Selection(0.0, forget_val, ctx.zs_control_val, False), test, crit)

    def _merges(self, ctx: EvalContext, ok: list[PoolEntry]) -> dict[str, tuple[str, Any]]:
        """Every merge method's vector from the same pool: method -> (vector id, vector)."""
        vectors: dict[str, Any] = {}
        for method in self.cfg.methods:
            if get_method(method).kind != "merge":
                continue
            params = self._params(method, "merge_params")
            with self.rec.timed(f"merge {method} {ctx.task.name}"):
                merged = get_merge(method)([e.path for e in ok], **params)
            vectors[method] = (vector_id(method, params, [e.key for e in ok]), merged)
            self._later(partial(self.rec.extra, ctx.row, method, "consensus_rate", consensus_rate(merged)))
        return vectors

    def _later(self, record: Callable[[], None]) -> None:
        """A recorder call, kept in program order and made by ``_flush`` once the test metrics it
        waits for are in: results.csv is the same whatever finishes first."""
        self._pending.append(record)

    def _result(
        self,
        ctx: EvalContext,
        method: str,
        sel: Selection,
        test: Future | None,
        crit: Criterion,
        chosen: str | None = None,
    ) -> None:
        self._later(
            lambda: self.rec.result(
                ctx.row, method, sel, test.result() if test else {}, crit.floor, chosen=chosen, rule=crit.rule
            )
        )

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for record in pending:
            record()

    def _select(
        self, ctx: EvalContext, forget: list[float], control: list[float], crit: Criterion, lambdas=None
    ) -> Selection:
        lambdas = self.lambdas if lambdas is None else lambdas
        return select_lambda(lambdas, forget, control, ctx.zs_control_val, crit.floor, crit.rule)

    def _single_vectors(self, ctx: EvalContext, ok: list[PoolEntry], default: PoolEntry) -> None:
        """Single task vectors, each candidate swept on its own. ``single_best`` reports the candidate
        whose selected point forgets most (the whole sweep is its price); ``single_run`` the one
        fine-tune at the grid's default setting (``default``), as a user without a sweep has it."""
        methods = {get_method(m).candidate: m for m in self.cfg.methods if get_method(m).kind == "single"}
        if not methods:
            return
        swept = ok if "best" in methods else [e for e in ok if e.key == default.key]
        taus = [partial(load_file, entry.path) for entry in swept]
        curves = self._curves(
            ctx, [(e.key, tau) for e, tau in zip(swept, taus, strict=True)], f"lambda: {len(swept)} candidates"
        )
        for entry, (fv, cv) in zip(swept, curves, strict=True):
            self.rec.curve(ctx.row, f"candidate:{ok.index(entry)}", self.lambdas, fv, cv, label=entry.spec["params"])
        for crit in self.criteria:
            singles = [self._select(ctx, fv, cv, crit) for fv, cv in curves]
            if "best" in methods:
                self._single_best(ctx, methods["best"], swept, singles, taus, crit)
            if "default" in methods:
                self._single_run(ctx, methods["default"], default, swept, singles, taus, crit)

    def _single_best(self, ctx: EvalContext, method: str, ok: list, singles: list, taus: list, crit) -> None:
        best = best_single(singles, crit.rule)
        points = len(ok) * self._curve_points  # every candidate's curve is read to find the best
        if best is None:
            self.rec.charge(ctx.row, method, self._cost(ctx, select=ok, val_points=points), crit)
            self._result(ctx, method, singles[0], None, crit)
            return
        self.rec.charge(ctx.row, method, self._cost(ctx, unlearn=[ok[best]], select=ok, val_points=points), crit)
        self._result(
            ctx,
            method,
            singles[best],
            self._vector_test(ok[best], singles[best], taus[best], ctx),
            crit,
            chosen=ok[best].key,
        )

    def _single_run(
        self, ctx: EvalContext, method: str, default: PoolEntry, swept: list, singles: list, taus: list, crit
    ) -> None:
        self.rec.charge(ctx.row, method, self._cost(ctx, unlearn=[default], val_points=self._curve_points), crit)
        if default.status != "ok":
            failed = Selection(None, None, None, False, f"the default setting's fine-tune failed: {default.error}")
            self._result(ctx, method, failed, None, crit)
            return
        j = [e.key for e in swept].index(default.key)
        test = self._vector_test(default, singles[j], taus[j], ctx) if singles[j].feasible else None
        self._result(ctx, method, singles[j], test, crit, chosen=default.key)

    def _vector_test(self, entry: PoolEntry, sel: Selection, tau, ctx: EvalContext) -> Future:
        """Test metrics of one candidate's vector at its selected lambda (cached)."""
        return self._cached_test(
            entry.key, sel.lam, lambda: Edit(tau(), -sel.lam, self.linear_edits), ctx, self.vector_tag
        )

    def _sweep_merges(self, ctx: EvalContext, vectors: dict[str, tuple[str, Any]]) -> None:
        requests = [(vid, lambda merged=merged: merged) for vid, merged in vectors.values()]
        curves = self._curves(ctx, requests, f"lambda: {', '.join(vectors)}")
        for (method, (vid, merged)), (fv, cv) in zip(vectors.items(), curves, strict=True):
            self.rec.curve(ctx.row, method, self.lambdas, fv, cv)
            for crit in self.criteria:
                sel = self._select(ctx, fv, cv, crit)
                edit = partial(Edit, merged, -sel.lam, self.linear_edits) if sel.feasible else None
                test = self._cached_test(vid, sel.lam, edit, ctx, self.vector_tag) if sel.feasible else None
                self._result(ctx, method, sel, test, crit)

    def _ablation(self, ctx: EvalContext, ok: list[PoolEntry]) -> None:
        """A merge (NegMerge by default) over random subsets of the pool: consensus rate and forgetting
        against the pool size N."""
        import random

        method = self.cfg.ablation.method
        params = self._params(method, "merge_params")
        sizes = self.cfg.ablation.sizes or list(range(2, len(ok) + 1))
        rng = random.Random(self.cfg.ablation.seed)
        draws = [
            (n, draw, sorted(rng.sample(ok, n), key=lambda e: e.key))
            for n in sorted(s for s in sizes if 2 <= s <= len(ok))
            for draw in range(1 if n == len(ok) else self.cfg.ablation.draws)
        ]
        rates: dict[int, float] = {}

        def merge(i: int) -> Mapping[str, torch.Tensor]:
            merged = get_merge(method)([e.path for e in draws[i][2]], **params)
            rates[i] = consensus_rate(merged)
            return merged

        requests = [
            (vector_id(method, params, [e.key for e in members]), partial(merge, i))
            for i, (_, _, members) in enumerate(draws)
        ]
        curves = self._curves(ctx, requests, f"ablation: {len(draws)} subsets")
        for i, ((n, draw, _), (fv, cv)) in enumerate(zip(draws, curves, strict=True)):
            if i not in rates:  # its curve was cached: the merge is made for its consensus rate only
                merge(i)
            sel = self._select(ctx, fv, cv, self.criteria[0])  # the main table's criterion
            self.rec.ablation.append(
                {
                    **ctx.row,
                    "n": n,
                    "draw": draw,
                    "consensus_rate": rates[i],
                    "lam": sel.lam,
                    "forget_val": sel.forget_val,
                    "control_val": sel.control_val,
                }
            )

    def _studies(self, ctx: EvalContext, ok: list[PoolEntry]) -> None:
        """The threshold study (NegMerge at each t, full pool) and the sub-pool study (every merge over
        each named sub-pool), selected like the main rows, with test metrics at the chosen lambda. Every
        vector is a merge of pool entries already made: no fine-tune runs here."""
        studies = self.cfg.ablation
        points: list[tuple[str, str, dict[str, Any], list[PoolEntry], dict[str, Any]]] = []
        base = self._params("negmerge", "merge_params")
        for t in studies.thresholds:
            points.append(("threshold", "negmerge", {**base, "threshold": t}, ok, {"pool": "full", "threshold": t}))
        merges = [m for m in self.cfg.methods if get_method(m).kind == "merge"]
        for name, pool in studies.pools.items():
            members = pool_members(name, pool, ok, lambda e: e.spec.get("params"), lambda: self._own_forget(ctx, ok))
            self.rec.study_pool(ctx.row, name, [e.key for e in members])
            if len(members) < 2:
                self._later(
                    partial(
                        self.rec.note,
                        f"{ctx.task.name} seed {ctx.seed}: sub-pool {name} has {len(members)} candidates; skipped",
                    )
                )
                continue
            for method in merges:
                points.append(("pool", method, self._params(method, "merge_params"), members, {"pool": name}))
        rates: dict[int, float] = {}

        def merge(i: int) -> Mapping[str, torch.Tensor]:
            _, method, params, members, _ = points[i]
            merged = get_merge(method)([e.path for e in members], **params)
            rates[i] = consensus_rate(merged)
            return merged

        vids = [vector_id(m, params, [e.key for e in members]) for _, m, params, members, _ in points]
        curves = self._curves(
            ctx, [(vid, partial(merge, i)) for i, vid in enumerate(vids)], f"studies: {len(points)} merges"
        )
        for i, ((study, method, _, members, tags), (fv, cv)) in enumerate(zip(points, curves, strict=True)):
            if i not in rates:  # its curve was cached: the merge is made for its consensus rate only
                merge(i)
            sel = self._select(ctx, fv, cv, self.criteria[0])  # the main table's criterion
            test = None
            if sel.feasible:
                test = self._cached_test(
                    vids[i],
                    sel.lam,
                    lambda i=i, lam=sel.lam: Edit(merge(i), -lam, self.linear_edits),
                    ctx,
                    self.vector_tag,
                )
            size = len(members)

            def record(study=study, method=method, n=size, i=i, sel=sel, test=test, tags=tags):
                metrics = test.result() if test is not None else {}
                row = study_row(ctx.row, study, method, n, rates[i], sel, metrics, "forget_acc", "control_acc", **tags)
                (self.rec.thresholds if study == "threshold" else self.rec.pools).append(row)

            self._later(record)

    def _own_forget(self, ctx: EvalContext, ok: list[PoolEntry]) -> list[float | None]:
        """Each candidate's own selected forget Val (its curve is the single-best stage's, cached)."""
        curves = self._curves(ctx, [(e.key, partial(load_file, e.path)) for e in ok], f"lambda: {len(ok)} candidates")
        return [self._select(ctx, fv, cv, self.criteria[0]).forget_val for fv, cv in curves]

    def _training_method(self, ctx: EvalContext, method: str) -> None:
        """A training-based method: every setting's model scored on Val once; each criterion picks one."""
        entries = [e for e in self._method_models(method, ctx.seed, ctx.task, ctx.head) if e.status == "ok"]
        scores = [
            self.evals.get_or_compute(
                {"trained val": entry.key, "task": ctx.task.name},
                lambda entry=entry: self._accuracy(Edit(load_file(entry.path), 1.0), "val", ctx),
            )
            for entry in entries
        ]
        for crit in self.criteria:
            # a trained model, not a point of a grid: never at its edge
            selections = [
                replace(self._select(ctx, [fv], [cv], crit, lambdas=[1.0]), at_grid_edge=False) for fv, cv in scores
            ]
            best = best_single(selections, crit.rule) if selections else None
            unlearn = [entries[best]] if best is not None else []
            cost = self._cost(ctx, unlearn=unlearn, select=entries, val_points=len(entries))
            self.rec.charge(ctx.row, method, cost, crit)
            if best is None:
                none = Selection(None, None, None, False, f"no {method} setting keeps the control floor")
                self._result(ctx, method, none, None, crit)
                continue
            chosen = entries[best]
            test = self._cached_test(chosen.key, 1.0, partial(_trained_edit, chosen.path), ctx)
            self._result(ctx, method, selections[best], test, crit, chosen=chosen.key)


def _trained_edit(path: str) -> Edit:
    """A trained model's weights as theta_0 + its vector."""
    return Edit(load_file(path), 1.0)


class _OnDemand:
    """Task vectors made on first use and dropped after their last use (thread-safe: lanes share it),
    so a queue of curves holds about one vector per lane, not one per curve."""

    def __init__(self, makers: dict[int, Callable[[], Mapping[str, torch.Tensor]]], uses: int) -> None:
        self._makers = makers
        self._left = dict.fromkeys(makers, uses)
        self._made: dict[int, Mapping[str, torch.Tensor]] = {}
        self._locks = {i: threading.Lock() for i in makers}

    def get(self, i: int) -> Mapping[str, torch.Tensor]:
        with self._locks[i]:
            if i not in self._made:
                self._made[i] = self._makers[i]()
            return self._made[i]

    def release(self, i: int) -> None:
        with self._locks[i]:
            self._left[i] -= 1
            if self._left[i] == 0:
                self._made.pop(i, None)


def _producer(cfg_json: str, out: str, cache: str) -> ClipRun:
    """A spawned worker's producer (``bench.producers``): the suite, set up on its first unit."""
    return ClipRun(ClipSuite.model_validate_json(cfg_json), Path(out), Path(cache), producer=True)
