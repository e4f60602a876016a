"""Protocol A (DESIGN.md §1): CLIP task negation with a shared candidate pool.

For each seed and forget dataset: zero-shot reference; fine-tune the pool (cached); build every
method's task vector from the same pool; sweep lambda on Val; select by the control-floor rule; then
evaluate the test splits once at the chosen lambda, with membership inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from baselines import get_merge
from bench.backbones import Backbone, load_backbone, visual_state
from bench.config import ClipSuite
from bench.data import TaskData, load_task, prepare_eval
from bench.data.preprocessed import PreprocessedCache
from bench.evalcache import EvalCache, vector_id
from bench.evaluate import Evaluator, per_sample_loss, top1, true_label_prob
from bench.finetune import FinetuneParams, finetune
from bench.heads import cached_head
from bench.metrics import loss_attack_auc, mia_efficacy
from bench.pool import CandidatePool, PoolEntry
from bench.pretrain import pretrained_checkpoint
from bench.results import RunRecorder
from bench.selection import Selection, best_single, lambda_grid, select_lambda
from bench.units import PRODUCE, Unit
from negmerge import consensus_rate, task_vector


@dataclass(frozen=True)
class Edit:
    """theta_0 + coef * tau, applied by the evaluator in place on its device (no state dict is built)."""

    tau: Mapping[str, torch.Tensor]
    coef: float


Weights = Mapping[str, torch.Tensor] | Edit


class ClipRun:
    """The whole suite, or one work unit of it (``bench.units``: a fine-tune or a sweep)."""

    def __init__(self, cfg: ClipSuite, out: Path, cache: Path, unit: Unit | None = None) -> None:
        self.cfg, self.out, self.cache, self.unit = cfg, Path(out), Path(cache), unit
        self.rec = RunRecorder(self.out, cfg)
        self.pool = CandidatePool(self.cache / "pool")
        self.lambdas = lambda_grid(cfg.selection.lambda_start, cfg.selection.lambda_stop, cfg.selection.lambda_step)

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

    # -- evaluation helpers ----------------------------------------------------------------------
    def _accuracy(self, state: Weights, split_name: str, task: TaskData, head, control, head_c):
        if isinstance(state, Edit):
            self.ev.load_edit(state.tau, state.coef)
        else:
            self.ev.load(state)
        f_split, c_split = getattr(task, split_name), getattr(control, split_name)
        return (
            top1(self.ev.logits(f_split, head), f_split.labels),
            top1(self.ev.logits(c_split, head_c), c_split.labels),
        )

    def _curve(self, vid: str, tau, task, head, control, head_c, desc: str) -> tuple[list[float], list[float]]:
        def compute():
            forget, ctrl = [], []
            vector = tau()
            for lam in tqdm(self.lambdas, desc=desc, leave=False, disable=not self.cfg.progress):
                f, c = self._accuracy(Edit(vector, -lam), "val", task, head, control, head_c)
                forget.append(f)
                ctrl.append(c)
            return [forget, ctrl]

        forget, ctrl = self.evals.get_or_compute({"curve": vid, "task": task.name, "lambdas": self.lambdas}, compute)
        return forget, ctrl

    def _cached_test(self, vid: str, lam: float, state_fn, task, head, control, head_c, seed: int) -> dict[str, float]:
        return self.evals.get_or_compute(
            {"test": vid, "lam": lam, "task": task.name, "seed": seed},
            lambda: self._test_metrics(state_fn(), task, head, control, head_c, seed),
        )

    def _test_metrics(self, state, task: TaskData, head, control, head_c, seed: int) -> dict[str, float]:
        forget_test, control_test = self._accuracy(state, "test", task, head, control, head_c)
        metrics = {"forget_acc": forget_test, "control_acc": control_test}
        if self.cfg.mia.enabled:
            # members: the forget set's fine-tuning split; non-members: its test split (DESIGN.md §3).
            member_logits = self.ev.logits(task.train_eval, head)
            nonmember_logits = self.ev.logits(task.test, head)
            m_prob = true_label_prob(member_logits, task.train_eval.labels)
            n_prob = true_label_prob(nonmember_logits, task.test.labels)
            order = torch.randperm(len(m_prob), generator=torch.Generator().manual_seed(seed))
            attack_half, target_half = order[: len(order) // 2], order[len(order) // 2 :]
            metrics["mia_efficacy"] = mia_efficacy(
                m_prob[attack_half], n_prob, m_prob[target_half], max_per_class=self.cfg.mia.max_per_class, seed=seed
            )
            metrics["mia_auc"] = loss_attack_auc(
                per_sample_loss(member_logits, task.train.labels), per_sample_loss(nonmember_logits, task.test.labels)
            )
        return metrics

    # -- the pool --------------------------------------------------------------------------------
    def _candidates(
        self, points: list[FinetuneParams], task: TaskData, head, direction: int, tag: str, only: int | None = None
    ) -> list[PoolEntry]:
        """The pool entries of ``points`` (fine-tuned now where missing); ``only``: just that one."""
        entries = []
        for i, params in enumerate(points):
            if only is not None and i != only:
                continue
            spec = {
                "backbone": self.backbone_id,
                "dataset": task.name,
                "split": self.cfg.data.load_kwargs(),
                "n_train": len(task.train),
                "params": asdict(params),
                "direction": direction,
                "precision": self.cfg.precision,
            }

            def make(params=params, i=i):
                desc = f"{tag} {task.name} {i + 1}/{len(points)}"
                ft = finetune(
                    self.backbone,
                    head,
                    task.train,
                    params,
                    direction=direction,
                    desc=desc,
                    progress=self.cfg.progress,
                    grayscale=task.grayscale,
                    workers=self.cfg.data.workers,
                    runtime=self.rt,
                )
                return task_vector(ft, self.theta0)

            entry = self.pool.get_or_create(spec, make)
            self.rec.pool_member(entry, tag, params.label())
            entries.append(entry)
        return entries

    # -- main ------------------------------------------------------------------------------------
    def _load_tasks(self) -> tuple[TaskData | None, dict[str, TaskData]]:
        """Index every dataset first: a bad root or a split that cannot be made fails before any work.
        A unit loads only its own dataset (and the control, if it evaluates)."""
        kwargs = self.cfg.data.load_kwargs()
        names = [self.unit.dataset] if self.unit else self.cfg.forget
        with self.rec.timed("index datasets"):
            control = None if self._producing else load_task(self.cfg.control, **kwargs)
            return control, {name: load_task(name, **kwargs) for name in names}

    @property
    def _producing(self) -> bool:
        """This run is one unit that makes one pool entry (and evaluates nothing)."""
        return self.unit is not None and self.unit.kind in PRODUCE

    def _prepare_eval(self, task: TaskData, members: bool) -> TaskData:
        with self.rec.timed(f"preprocess {task.name}"):
            return prepare_eval(task, self.backbone.preprocess, self.preprocessed, members=members)

    def _produce(self, task: TaskData, head) -> None:
        """A fine-tune or gradient-ascent unit: one candidate into the pool."""
        unit = self.unit
        if unit.kind == "finetune":
            points = self.cfg.finetune.points(unit.seed, self.cfg.finetune_per_dataset.get(task.name))
            self._candidates(points, task, head, +1, "fine-tune", only=unit.index)
        else:
            self._candidates(self.cfg.gradient_ascent.points(unit.seed), task, head, -1, "grad-ascent", only=unit.index)

    def run(self) -> RunRecorder:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        self.rt = cfg.runtime()  # an unavailable device fails here, before any work
        self.rec.runtime = self.rt.describe()
        control, tasks = self._load_tasks()
        self.backbone = self._backbone()
        self.backbone_id = self.backbone.identity()
        self.theta0 = visual_state(self.backbone)
        self.ev = Evaluator(self.backbone, cfg.eval_batch_size, self.rt)
        self.ev.set_base(self.theta0)
        self.evals = EvalCache(
            self.cache / "evals",
            {
                "backbone": self.backbone_id,
                "data": cfg.data.load_kwargs(),
                "control": cfg.control,
                "mia": cfg.mia.model_dump(),
                "precision": cfg.precision,
            },
            code_modules=("bench.evaluate", "bench.heads", "bench.protocol_clip"),
        )
        bname = f"{cfg.backbone.name}/{cfg.backbone.pretrained}"
        self.preprocessed = PreprocessedCache(self.cache / "preprocessed", cfg.data.workers, cfg.progress)
        if not self._producing:
            control = self._prepare_eval(control, members=False)
            head_c = cached_head(
                self.backbone, self.backbone_id, control.classnames, control.templates, self.cache, self.rt
            )
        floor = cfg.selection.floor
        prepared: dict[str, TaskData] = {}
        for seed in cfg.seeds:
            for name in cfg.forget:
                if self.unit is not None and (self.unit.seed, self.unit.dataset) != (seed, name):
                    continue
                task = tasks[name]
                head = cached_head(
                    self.backbone, self.backbone_id, task.classnames, task.templates, self.cache, self.rt
                )
                if self._producing:
                    self._produce(task, head)
                    continue
                if name not in prepared:  # once per dataset: its splits stay resident on the device
                    prepared[name] = self._prepare_eval(task, members=cfg.mia.enabled)
                task = prepared[name]
                row = dict(backbone=bname, dataset=name, seed=seed)
                with self.rec.timed(f"zero-shot {name}"):
                    zs_forget_val, zs_control_val = self.evals.get_or_compute(
                        {"zero-shot val": task.name},
                        lambda: self._accuracy(self.theta0, "val", task, head, control, head_c),
                    )
                    zs_test = self._cached_test(
                        "zero-shot", 0.0, lambda: self.theta0, task, head, control, head_c, seed
                    )
                if "zeroshot" in cfg.methods:
                    self.rec.result(
                        row, "zeroshot", Selection(0.0, zs_forget_val, zs_control_val, False), zs_test, floor
                    )
                if not set(cfg.methods) - {"zeroshot", "gradient_ascent"}:
                    entries = []
                else:
                    with self.rec.timed(f"pool {name} seed {seed}"):
                        entries = self._candidates(
                            cfg.finetune.points(seed, cfg.finetune_per_dataset.get(name)), task, head, +1, "fine-tune"
                        )
                ok = [e for e in entries if e.status == "ok"]
                if entries and not ok:
                    self.rec.note(f"{name} seed {seed}: every candidate failed; no task-vector method can run")
                    continue
                vectors: dict[str, Any] = {}
                for method in cfg.methods:
                    if method in ("zeroshot", "single_best", "gradient_ascent"):
                        continue
                    with self.rec.timed(f"merge {method} {name}"):
                        merged = get_merge(method)([e.path for e in ok], **cfg.merge_params.get(method, {}))
                    vid = vector_id(method, cfg.merge_params.get(method, {}), [e.key for e in ok])
                    vectors[method] = (vid, merged)
                    self.rec.extra(row, method, "consensus_rate", consensus_rate(merged))
                with self.rec.timed(f"lambda sweep {name} seed {seed}"):
                    if "single_best" in cfg.methods:
                        singles = []
                        for j, entry in enumerate(ok):

                            def tau(entry=entry):
                                return load_file(entry.path)

                            fv, cv = self._curve(
                                entry.key, tau, task, head, control, head_c, f"lambda candidate {j + 1}"
                            )
                            self.rec.curve(row, f"candidate:{j}", self.lambdas, fv, cv, label=entry.spec["params"])
                            singles.append((select_lambda(self.lambdas, fv, cv, zs_control_val, floor), tau))
                        best = best_single([s for s, _ in singles])
                        if best is None:
                            self.rec.result(row, "single_best", singles[0][0], {}, floor)
                        else:
                            sel, tau = singles[best]
                            test = self._cached_test(
                                ok[best].key,
                                sel.lam,
                                lambda: Edit(tau(), -sel.lam),
                                task,
                                head,
                                control,
                                head_c,
                                seed,
                            )
                            self.rec.result(row, "single_best", sel, test, floor, chosen=ok[best].key)
                    for method, (vid, merged) in vectors.items():
                        fv, cv = self._curve(
                            vid, lambda merged=merged: merged, task, head, control, head_c, f"lambda {method}"
                        )
                        self.rec.curve(row, method, self.lambdas, fv, cv)
                        sel = select_lambda(self.lambdas, fv, cv, zs_control_val, floor)
                        test = (
                            self._cached_test(
                                vid,
                                sel.lam,
                                lambda: Edit(merged, -sel.lam),
                                task,
                                head,
                                control,
                                head_c,
                                seed,
                            )
                            if sel.feasible
                            else {}
                        )
                        self.rec.result(row, method, sel, test, floor)
                if cfg.ablation is not None and len(ok) > 2:
                    with self.rec.timed(f"pool-size ablation {name} seed {seed}"):
                        self._ablation(row, ok, task, head, control, head_c, zs_control_val)
                if "gradient_ascent" in cfg.methods:
                    with self.rec.timed(f"gradient ascent {name} seed {seed}"):
                        self._gradient_ascent(row, task, head, control, head_c, zs_control_val, seed)
        self.rec.note(f"evaluation cache: {self.evals.hits} hits, {self.evals.misses} computed")
        if self.preprocessed.built:
            self.rec.note(f"preprocessed {self.preprocessed.built} file-backed splits into the cache")
        self.rec.finish()
        return self.rec

    def _ablation(self, row, ok: list[PoolEntry], task, head, control, head_c, zs_control_val: float) -> None:
        """NegMerge over random subsets of the pool: consensus rate and forgetting against N."""
        import random

        params = self.cfg.merge_params.get("negmerge", {})
        sizes = self.cfg.ablation.sizes or list(range(2, len(ok) + 1))
        rng = random.Random(self.cfg.ablation.seed)
        for n in sorted(s for s in sizes if 2 <= s <= len(ok)):
            for draw in range(1 if n == len(ok) else self.cfg.ablation.draws):
                members = sorted(rng.sample(ok, n), key=lambda e: e.key)
                merged = get_merge("negmerge")([e.path for e in members], **params)
                vid = vector_id("negmerge", params, [e.key for e in members])
                fv, cv = self._curve(vid, lambda merged=merged: merged, task, head, control, head_c, f"ablation N={n}")
                sel = select_lambda(self.lambdas, fv, cv, zs_control_val, self.cfg.selection.floor)
                self.rec.ablation.append(
                    {
                        **row,
                        "n": n,
                        "draw": draw,
                        "consensus_rate": consensus_rate(merged),
                        "lam": sel.lam,
                        "forget_val": sel.forget_val,
                        "control_val": sel.control_val,
                    }
                )

    def _gradient_ascent(self, row, task, head, control, head_c, zs_control_val: float, seed: int) -> None:
        entries = [
            e
            for e in self._candidates(self.cfg.gradient_ascent.points(seed), task, head, -1, "grad-ascent")
            if e.status == "ok"
        ]
        selections = []
        for entry in entries:
            fv, cv = self.evals.get_or_compute(
                {"ga val": entry.key, "task": task.name},
                lambda entry=entry: self._accuracy(
                    Edit(load_file(entry.path), 1.0), "val", task, head, control, head_c
                ),
            )
            sel = select_lambda([1.0], [fv], [cv], zs_control_val, self.cfg.selection.floor)
            selections.append(replace(sel, at_grid_edge=False))  # a fine-tuned model, not a point of a grid
        best = best_single(selections) if selections else None
        if best is None:
            sel = Selection(None, None, None, False, "no gradient-ascent setting keeps the control floor")
            self.rec.result(row, "gradient_ascent", sel, {}, self.cfg.selection.floor)
            return
        sel = selections[best]
        test = self._cached_test(
            entries[best].key,
            1.0,
            lambda: Edit(load_file(entries[best].path), 1.0),
            task,
            head,
            control,
            head_c,
            seed,
        )
        self.rec.result(row, "gradient_ascent", sel, test, self.cfg.selection.floor, chosen=entries[best].key)
