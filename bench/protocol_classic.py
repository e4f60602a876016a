"""Protocol B (docs/protocols.md#protocol-b): forget a random p% of the training data of a standard classifier,
measured against Retrain (trained from scratch without it).

Per seed: Df (seeded, saved with the run), Original (all train; cached), Retrain (Dr only; cached),
the classic baselines, and the task-vector family on a shared pool fine-tuned from the Original on Df.
Task vectors cover parameters only: BatchNorm running statistics stay the Original's (``bn: keep``) or
are re-estimated on Dr (``bn: recalibrate``); the choice is on every result row's manifest entry.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from baselines import get_merge, get_method, sisa
from bench.classic_train import logits_of, saliency_mask, samples_seen, train
from bench.classifiers import build_classifier
from bench.codehash import code_digest
from bench.config import ClassicSuite
from bench.cost import Cost, charge, forward_flops
from bench.data.classic import forget_indices, load_classic
from bench.errors import BenchError
from bench.evalcache import EvalCache, vector_id
from bench.io import write_json_atomic
from bench.metrics import avg_gap, membership_metrics
from bench.pool import CandidatePool
from bench.results import RunRecorder
from bench.selection import Criterion, Selection, criteria, lambda_grid, lowest, pick
from bench.studies import pool_members, study_row
from bench.units import PRODUCE, Unit, training_methods, uses_pool
from negmerge import apply, consensus_rate

Split = tuple[torch.Tensor, torch.Tensor]  # (images, labels)


@dataclass(frozen=True)
class ClassicSets:
    """Protocol B's data for training-based methods (``baselines.training.UnlearningSets``)."""

    forget: Split
    retain: Split
    num_classes: int

    def relabelled(self, split: Split, generator: torch.Generator) -> Split:
        x, y = split
        wrong = (y + torch.randint(1, self.num_classes, y.shape, generator=generator)) % self.num_classes
        return x, wrong

    def subsample(self, split: Split, fraction: float, generator: torch.Generator) -> Split:
        x, y = split
        keep = torch.randperm(len(y), generator=generator)[: max(1, round(fraction * len(y)))]
        return x[keep], y[keep]

    def concat(self, *splits: Split) -> Split:
        return torch.cat([x for x, _ in splits]), torch.cat([y for _, y in splits])


def _state_id(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (what cache keys of models built from it depend on)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


class ClassicRun:
    """The whole suite, or one work unit of it (``bench.units``: a trained model, or a seed's family)."""

    def __init__(self, cfg: ClassicSuite, out: Path, cache: Path, unit: Unit | None = None) -> None:
        self.cfg, self.out, self.cache, self.unit = cfg, Path(out), Path(cache), unit
        self.criteria = criteria(cfg.selection.rule_list, cfg.selection.floor_list)  # the first: the main table's
        self.rec = RunRecorder(self.out, cfg, selection_rule=self.criteria[0].rule)
        version = code_digest("bench.classic_train", "bench.classifiers")
        version += "" if cfg.precision == "fp32" else f"-{cfg.precision}"
        self.models = CandidatePool(self.cache / "classic-models", version)
        self.trained_entries: dict[str, Any] = {}  # role (original, retrain) -> its cache entry, for its cost
        self.pool = CandidatePool(self.cache / "classic-pool", version)
        self.evals = EvalCache(
            self.cache / "evals",
            {
                "suite": "classic",
                "model": cfg.model.model_dump(),
                "dataset": cfg.dataset,
                "data": cfg.data.model_dump(),
                "mia": cfg.mia.model_dump(),
                "precision": cfg.precision,
            },
            code_modules=("bench.classic_train", "bench.classifiers", "bench.protocol_classic"),
        )
        self.lambdas = lambda_grid(cfg.selection.lambda_start, cfg.selection.lambda_stop, cfg.selection.lambda_step)

    def _key_by_runtime(self) -> None:
        """What computes an entry is part of its key: device kind, compile, deterministic mode (nothing
        for a plain CPU run, whose keys stay what they were)."""
        for store in (self.models, self.pool):
            store.version += self.rt.key_suffix()
        self.evals.context.update(self.rt.key())

    # -- models ----------------------------------------------------------------------------------
    def _new_model(self) -> nn.Module:
        torch.manual_seed(0)
        d = self.data
        model = build_classifier(
            self.cfg.model.name, d.num_classes, d.in_channels, self.cfg.model.widths, image_size=d.train_x.shape[-1]
        )
        return model.to(self.rt.device)

    def _model_from(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        model = self._new_model()
        model.load_state_dict(state)
        return model.eval()

    def _initialised(self, seed: int) -> nn.Module:
        model = self._new_model()
        torch.manual_seed(seed)
        for m in model.modules():  # seed-dependent init
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return model

    def _trained(self, role: str, index: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return load_file(self._trained_entry(role, index, seed).path)

    def _trained_entry(self, role: str, index: torch.Tensor, seed: int):
        params = self.cfg.train.points(seed)[0]
        spec = {
            "role": role,
            "model": self.cfg.model.model_dump(),
            "data": self.cfg.data.model_dump(),
            "dataset": self.cfg.dataset,
            "train_index": hashlib.sha256(index.numpy().tobytes()).hexdigest()[:16],
            "params": params.__dict__,
        }

        def make():
            model = self._initialised(seed)
            train(
                model,
                self.data,
                self.data.train_x[index],
                self.data.train_y[index],
                params,
                desc=f"{role} seed {seed}",
                progress=self.cfg.progress,
                runtime=self.rt,
            )
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        entry = self.models.get_or_create(spec, make)
        self.rec.pool_member(entry, role, params.label())
        self.trained_entries[role] = entry
        if entry.status != "ok":
            raise RuntimeError(f"{role} diverged: {entry.error}")
        return entry

    # -- metrics ---------------------------------------------------------------------------------
    def _evaluate(self, mid: str, model_fn, seed: int, full: bool = True) -> dict[str, float]:
        """Metrics of the model ``mid`` (built by ``model_fn`` only on a cache miss)."""
        what = {"model": mid, "full": full, "seed": seed, "df": self.df_hash, "bn": self.cfg.bn}
        if not full and self._val_mia:  # the Val scores with MIA are another entry than those without
            what["val_mia"] = True
        return self.evals.get_or_compute(what, lambda: self._metrics(model_fn(), seed, full))

    @property
    def _val_mia(self) -> bool:
        """Selection needs MIA on Val only for the avg-gap rule (one of its four terms)."""
        return "avg_gap" in self.cfg.selection.rule_list

    def _metrics(self, model: nn.Module, seed: int, full: bool = True) -> dict[str, float]:
        """Acc on Dr, Df, Dtest (and Val), MIA-efficacy and loss AUC. ``full=False``: the cheap
        selection-time version (Dr subsample, Val instead of test)."""
        d = self.data
        self.rec.count_pass("test" if full else "val")
        dr = self.dr if full else self.dr_small
        out = {"retain_acc": _acc(self._outputs(model, d.train_x[dr])[0], d.train_y[dr])}
        f_scores, f_logits = self._outputs(model, d.train_x[self.df])
        out["forget_acc"] = _acc(f_scores, d.train_y[self.df])
        t_x, t_y = (d.test_x, d.test_y) if full else (d.val_x, d.val_y)
        t_scores, t_logits = self._outputs(model, t_x)
        out["test_acc"] = _acc(t_scores, t_y)
        out["val_acc"] = _acc(self._outputs(model, d.val_x)[0], d.val_y) if full else out["test_acc"]
        if not full and not self._val_mia:
            return out  # the floor rules need no MIA: skip the attack on every lambda
        # MIA: the attacker learns retain members from test non-members (counts fixed by config) and
        # scores Df. Selection (full=False) takes its non-members from Val, never from the test split.
        m_idx = self.mia_members
        n_idx = self.mia_nonmembers if full else self.mia_val_nonmembers
        df_scored = (f_logits, d.train_y[self.df])
        out |= membership_metrics(
            shadow=(self._outputs(model, d.train_x[m_idx])[1], d.train_y[m_idx]),
            nonmembers=(t_logits[n_idx], t_y[n_idx]),
            targets=df_scored,
            exposed=df_scored,  # Df was in the Original's training set
            max_per_class=None,
            seed=seed,
        )
        return out

    def _outputs(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores whose argmax is the label, logits the membership attack reads): a model's logits
        twice; for a SISA ensemble its aggregate and its mean softmax (``baselines.sisa``)."""
        if isinstance(model, sisa.Ensemble):
            members = [logits_of(m, self.data, images, runtime=self.rt) for m in model.members]
            return sisa.aggregate(members, model.how), sisa.attack_logits(members)
        logits = logits_of(model, self.data, images, runtime=self.rt)
        return logits, logits

    def _select(
        self, scored: list[tuple[Any, dict[str, float]]], crit: Criterion, along_lambda: bool = False
    ) -> tuple[int | None, str]:
        """Index of the best (model or lambda) by ``crit``, on validation numbers. ``along_lambda``:
        ``scored`` is a lambda sweep in increasing lambda (the control-only rule takes its last
        feasible point; among settings, the feasible one with the lowest Val accuracy)."""
        metrics = [m for _, m in scored]
        if crit.rule == "avg_gap":
            return lowest([avg_gap(m, self.retrain_val) for m in metrics]), ""
        floor, reference = crit.floor, self.original_val["test_acc"]
        forget = [m["forget_acc"] for m in metrics] if crit.rule == "floor" else []  # control_only reads none
        best = pick(crit.rule, forget, [m["test_acc"] for m in metrics], reference, floor, along_lambda)
        reason = "" if best is not None else f"no setting keeps Val acc >= {floor} x Original's {reference:.2f}"
        return best, reason

    def _record(
        self,
        row: dict,
        method: str,
        chosen: tuple[str, Any] | None,
        lam: float | None,
        reason: str,
        seed: int,
        crit: Criterion,
        at_edge: bool = False,
    ) -> None:
        """``chosen``: (model id, model factory) of the selected model, or None when none qualified.
        Criteria that chose the same model share its (cached) test evaluation."""
        if chosen is None:
            self.rec.result(row, method, Selection(None, None, None, False, reason), {}, crit.floor, rule=crit.rule)
            return
        mid, model_fn = chosen
        metrics = dict(self._evaluate(mid, model_fn, seed))
        metrics["avg_gap"] = avg_gap(metrics, self.retrain_metrics)
        val = self._evaluate(mid, model_fn, seed, full=False)
        sel = Selection(lam, val["forget_acc"], val["test_acc"], at_edge)
        self.rec.result(row, method, sel, metrics, crit.floor, chosen=mid, rule=crit.rule)

    # -- BN --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _recalibrate(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the passes below
        model.train()
        for start in range(0, min(len(self.dr), 5000), 256):
            model(self.data.to_input(self.rt.to(self.data.train_x[self.dr[start : start + 256]])))
        return model.eval()

    def _edited(self, tau: Mapping[str, torch.Tensor], lam: float) -> nn.Module:
        model = self._model_from(apply(self.original, tau, -lam))  # buffers: the Original's
        return self._recalibrate(model) if self.cfg.bn == "recalibrate" else model

    # -- methods ---------------------------------------------------------------------------------
    def _baseline(self, row: dict, method: str, seed: int) -> None:
        candidates, entries, ok = [], [], []
        for params in self.cfg.baselines[method].points(seed):
            entry = self._baseline_entry(method, params, seed)
            entries.append(entry)
            if entry.status != "ok":
                continue
            ok.append(entry)

            def model_fn(entry=entry):
                return self._model_from(load_file(entry.path))

            candidates.append(((entry.key, model_fn), self._evaluate(entry.key, model_fn, seed, full=False)))
        for crit in self.criteria:
            best, reason = self._select(candidates, crit) if candidates else (None, f"every {method} setting diverged")
            unlearn = [ok[best]] if best is not None else []
            self.rec.charge(row, method, self._cost(unlearn, entries, val_points=len(candidates)), crit)
            self._record(row, method, candidates[best][0] if best is not None else None, None, reason, seed, crit)

    def _baseline_entry(self, method: str, params, seed: int):
        """One setting of a training-based method (``baselines``), trained from the Original (cached)."""
        d, cfg = self.data, self.cfg
        extra = get_method(method).resolved(cfg.baseline_params.get(method, {}))
        spec = {
            "role": method,
            "original": self.original_key,
            "df": self.df_hash,
            "params": params.__dict__,
            "extra": extra,
        }

        def make(params=params):
            model = self._model_from(self.original)
            sets = ClassicSets(
                (d.train_x[self.df], d.train_y[self.df]), (d.train_x[self.dr], d.train_y[self.dr]), d.num_classes
            )
            recipe = get_method(method).training(**extra).recipe(sets, seed)
            mask = None
            if recipe.saliency_sparsity is not None:
                forget_x, forget_y = sets.forget
                mask = saliency_mask(model, d, forget_x, forget_y, recipe.saliency_sparsity, runtime=self.rt)
            x, y = recipe.data
            train(
                model,
                d,
                x,
                y,
                params,
                direction=recipe.direction,
                l1_alpha=recipe.l1_alpha,
                grad_mask=mask,
                desc=method,
                progress=cfg.progress,
                runtime=self.rt,
            )
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        entry = self.models.get_or_create(spec, make)
        self.rec.pool_member(entry, method, params.label())
        return entry

    def _sisa_fit(self, seed: int, setting: sisa.SisaSetting):
        """SISA's training step: the previous checkpoint (None: a fresh seeded init, as Retrain's) trained
        on ``index`` for the step's epochs with the suite's ``train`` settings. Cached, keyed by the
        parent checkpoint and the exact indices (recorded in the entry's spec), so a chain that sees the
        same data meets the same entries."""
        base = self.cfg.train.points(seed)[0]
        params = dataclass_replace(base, epochs=sisa.slice_epochs(base.epochs, setting.slices))
        d = self.data

        def fit(parent, index: torch.Tensor):
            spec = {
                "role": "sisa",
                "model": self.cfg.model.model_dump(),
                "data": self.cfg.data.model_dump(),
                "dataset": self.cfg.dataset,
                "init_seed": seed,
                "parent": None if parent is None else parent.key,
                "train_indices": index.tolist(),
                "params": params.__dict__,
            }

            def make():
                model = self._initialised(seed) if parent is None else self._model_from(load_file(parent.path))
                train(
                    model,
                    d,
                    d.train_x[index],
                    d.train_y[index],
                    params,
                    desc="sisa",
                    progress=self.cfg.progress,
                    runtime=self.rt,
                )
                return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

            entry = self.models.get_or_create(spec, make)
            self.rec.pool_member(entry, "sisa", params.label())
            if entry.status != "ok":
                raise RuntimeError(f"{setting.name} diverged: {entry.error}")
            return entry

        return fit, params

    def _sisa(self, row: dict, setting: sisa.SisaSetting, seed: int) -> None:
        """Train the S chains on all of the training data, unlearn Df (only the affected shards' steps
        from their first affected slice train again), evaluate the unlearned ensemble and count the cost."""
        fit, params = self._sisa_fit(seed, setting)
        assignment = sisa.assign(len(self.data.train_y), setting.shards, setting.slices, setting.seed)
        trained = [sisa.train_chain(slices, fit) for slices in assignment]
        unlearned = [sisa.train_chain(slices, fit, self.df) for slices in assignment]
        members = [chain[-1] for chain in unlearned if chain[-1] is not None]
        mid = f"sisa:{setting.aggregate}:" + hashlib.sha256(" ".join(e.key for e in members).encode()).hexdigest()[:16]

        def model_fn():
            return sisa.Ensemble(tuple(self._model_from(load_file(e.path)) for e in members), setting.aggregate)

        for crit in self.criteria:  # nothing is selected: the same row at every criterion
            self._record(row, setting.name, (mid, model_fn), None, "", seed, crit)
        cost = sisa.unlearning_cost(assignment, self.df, lambda n: samples_seen(n, params))
        retrain = self.cfg.train.points(seed)[0]
        retrain_samples = samples_seen(len(self.dr), retrain)
        # wall seconds: what each retrained checkpoint cost when it was made (its cache record)
        done = {e.key for chain in trained for e in chain if e is not None}
        retrained = {e.key: e.seconds for chain in unlearned for e in chain if e is not None and e.key not in done}
        sisa_seconds = sum(retrained.values())
        retrain_seconds = self._trained_entry("retrain", self.dr, seed).seconds
        counts = {
            "retrained_shards": cost.shards,
            "retrained_slices": cost.slices,
            "retrained_samples": cost.samples,
            "speedup_samples": retrain_samples / cost.samples if cost.samples else float("inf"),
        }
        for metric, value in counts.items():
            self.rec.extra(row, setting.name, metric, float(value))
        # its cost row (bench.cost): unlearning is the retraining; SISA's first training, like the
        # Original's, is paid before any request (the manifest's unlearning_cost has it)
        self.rec.charge(row, setting.name, Cost(cost.samples, 0, 0, sisa_seconds, self._flops_per_image))
        self.rec.unlearning.append(
            {
                **row,
                "method": setting.name,
                "shards": setting.shards,
                "slices": setting.slices,
                "aggregate": setting.aggregate,
                "assignment_seed": setting.seed,
                "epochs_per_slice": params.epochs,
                "forget_size": len(self.df),
                "affected": [{"shard": k, "first_slice": r} for k, r in cost.per_shard],
                "members": [e.key for e in members],  # the unlearned constituents' checkpoints (classic-models)
                **counts,
                "train_samples": sum(
                    samples_seen(len(sisa.seen(s, r)), params) for s in assignment for r in range(len(s))
                ),
                "retrain_samples": retrain_samples,
                "unlearn_seconds": round(sisa_seconds, 3),
                "retrain_seconds": round(retrain_seconds, 3),
                "speedup_seconds": retrain_seconds / sisa_seconds if sisa_seconds else None,
            }
        )

    def _pool_entry(self, i: int, params):
        """Candidate ``i`` of the pool: the Original fine-tuned on Df, as a task vector (cached)."""
        d, cfg = self.data, self.cfg
        param_names = {n for n, _ in self._new_model().named_parameters()}
        spec = {"original": self.original_key, "df": self.df_hash, "params": params.__dict__, "direction": 1}

        def make():
            model = train(
                self._model_from(self.original),
                d,
                d.train_x[self.df],
                d.train_y[self.df],
                params,
                desc=f"candidate {i + 1}",
                progress=cfg.progress,
                runtime=self.rt,
            )
            return {
                k: (v.detach().cpu() - self.original[k]).clone()
                for k, v in model.state_dict().items()
                if k in param_names
            }

        entry = self.pool.get_or_create(spec, make)
        self.rec.pool_member(entry, "fine-tune", params.label())
        return entry

    def _task_vectors(self, row: dict, seed: int) -> None:
        cfg = self.cfg
        if cfg.pool.from_:  # a sweep on disk (bench.checkpoints.sweep): parameters only, as the pool's vectors
            from bench.checkpoints.sweep import pool_from_disk

            names = {n for n, _ in self._new_model().named_parameters()}
            spec = {"original": self.original_key, "df": self.df_hash}
            theta0 = {k: v for k, v in self.original.items() if k in names}
            entries = pool_from_disk(
                self.pool, self.rec, cfg.pool.from_, cfg.pool.theta0, cfg.dataset, seed, theta0, spec
            )
        else:
            entries = [self._pool_entry(i, params) for i, params in enumerate(cfg.pool.points(seed))]
        ok = [e for e in entries if e.status == "ok"]
        failed = [e for e in entries if e.status != "ok"]  # spent all the same
        vectors: dict[str, Any] = {}
        for method in cfg.methods:
            if get_method(method).kind == "merge":
                params = get_method(method).resolved(cfg.merge_params.get(method, {}))
                merged = get_merge(method)([e.path for e in ok], **params)
                vectors[method] = (vector_id(method, params, [e.key for e in ok]), merged)
                self.rec.extra(row, method, "consensus_rate", consensus_rate(merged))
                self.rec.charge(row, method, self._cost(ok, failed, val_points=len(self.lambdas)))
        single = {get_method(m).candidate: m for m in cfg.methods if get_method(m).kind == "single"}
        if "best" in single:
            self._single_best(row, single["best"], [(e.key, load_file(e.path)) for e in ok], seed, entries)
        if "default" in single:
            self._single_run(row, single["default"], entries[0 if cfg.pool.from_ else cfg.pool.default_index], seed)
        for method, (vid, tau) in vectors.items():
            picks = self._sweep(row, method, vid, tau, seed)
            for crit, (lam, chosen, _) in zip(self.criteria, picks, strict=True):
                edge = lam == max(self.lambdas) if lam is not None else False
                self._record(row, method, chosen, lam, "no feasible lambda", seed, crit, at_edge=edge)
        if cfg.ablation is not None and (cfg.ablation.thresholds or cfg.ablation.pools):
            with self.rec.timed("studies"):
                self._studies(row, ok, seed)

    def _studies(self, row: dict, ok: list, seed: int) -> None:
        """The threshold study (NegMerge at each t, full pool) and the sub-pool study (every merge over
        each named sub-pool), selected like the main rows, test metrics at the chosen lambda. Every
        vector is a merge of pool entries already made: no model is trained here."""
        cfg = self.cfg
        points = []
        base = get_method("negmerge").resolved(cfg.merge_params.get("negmerge", {}))
        for t in cfg.ablation.thresholds:
            points.append(("threshold", "negmerge", {**base, "threshold": t}, ok, {"pool": "full", "threshold": t}))
        merges = [m for m in cfg.methods if get_method(m).kind == "merge"]
        for name, pool in cfg.ablation.pools.items():
            members = pool_members(name, pool, ok, lambda e: e.spec.get("params"), lambda: self._own_forget(ok, seed))
            self.rec.study_pool(row, name, [e.key for e in members])
            if len(members) < 2:
                self.rec.note(f"seed {seed}: sub-pool {name} has {len(members)} candidates; skipped")
                continue
            for method in merges:
                params = get_method(method).resolved(cfg.merge_params.get(method, {}))
                points.append(("pool", method, params, members, {"pool": name}))
        for study, method, params, members, tags in points:
            merged = get_merge(method)([e.path for e in members], **params)
            vid = vector_id(method, params, [e.key for e in members])
            lam, chosen, val = self._sweep(row, method, vid, merged, seed, record=False)[0]  # the first criterion
            metrics: dict[str, float] = {}
            sel = Selection(None, None, None, False, "no feasible lambda")
            if chosen is not None:
                metrics = dict(self._evaluate(*chosen, seed))
                metrics["avg_gap"] = avg_gap(metrics, self.retrain_metrics)
                sel = Selection(lam, val["forget_acc"], val["test_acc"], lam == max(self.lambdas))
            rate = consensus_rate(merged)
            entry = study_row(row, study, method, len(members), rate, sel, metrics, "forget_acc", "test_acc", **tags)
            (self.rec.thresholds if study == "threshold" else self.rec.pools).append(entry)

    def _own_forget(self, ok: list, seed: int) -> list[float | None]:
        """Each candidate's own selected forget Val (the single-best stage's evaluations, cached)."""
        forget = []
        for entry in ok:
            _, chosen, val = self._sweep({}, "", entry.key, load_file(entry.path), seed, record=False)[0]
            forget.append(None if chosen is None else val["forget_acc"])
        return forget

    def _single_best(self, row: dict, method: str, singles: list[tuple[str, Any]], seed: int, entries: list) -> None:
        """Each candidate swept on its own; the best selected point across candidates, by the same rule
        (``entries``: the whole pool, the price of finding it)."""
        swept = [self._sweep(row, f"candidate:{j}", vid, tau, seed) for j, (vid, tau) in enumerate(singles)]
        points = len(singles) * len(self.lambdas)  # every candidate's curve is read to find the best
        for c, crit in enumerate(self.criteria):
            feasible = [picks[c] for picks in swept if picks[c][1] is not None]
            best, _ = self._select([(None, val) for _, _, val in feasible], crit) if feasible else (None, "")
            if best is None:
                self.rec.charge(row, method, self._cost([], entries, val_points=points), crit)
                self._record(row, method, None, None, "no candidate has a feasible lambda", seed, crit)
                continue
            lam, chosen, _ = feasible[best]
            unlearn = [e for e in entries if chosen[0].startswith(f"{e.key}@")]  # its model id: "<pool key>@lambda"
            self.rec.charge(row, method, self._cost(unlearn, entries, val_points=points), crit)
            self._record(row, method, chosen, lam, "", seed, crit, at_edge=lam == max(self.lambdas))

    def _single_run(self, row: dict, method: str, default, seed: int) -> None:
        """The one fine-tune at the pool grid's default setting (a sweep on disk: its first candidate),
        negated at its selected lambda: what a user without a hyperparameter sweep gets."""
        self.rec.charge(row, method, self._cost([default], val_points=len(self.lambdas)))
        if default.status != "ok":
            for crit in self.criteria:
                reason = f"the default setting's fine-tune failed: {default.error}"
                self._record(row, method, None, None, reason, seed, crit)
            return
        picks = self._sweep(row, method, default.key, load_file(default.path), seed)
        for crit, (lam, chosen, _) in zip(self.criteria, picks, strict=True):
            edge = lam == max(self.lambdas) if lam is not None else False
            self._record(row, method, chosen, lam, "no feasible lambda", seed, crit, at_edge=edge)

    def _sweep(
        self, row: dict, method: str, vid: str, tau, seed: int, record: bool = True
    ) -> list[tuple[Any, Any, Any]]:
        """Every lambda scored on Val once, its curve recorded (``record``); per criterion, (lambda,
        (model id, factory), Val metrics) of its pick, or Nones where nothing is feasible."""
        scored = []
        for lam in self.lambdas:

            def model_fn(lam=lam):
                return self._edited(tau, lam)

            mid = f"{vid}@{lam}"
            scored.append(((mid, model_fn), self._evaluate(mid, model_fn, seed, full=False)))
        if record:
            self.rec.curve(
                row, method, self.lambdas, [m["forget_acc"] for _, m in scored], [m["test_acc"] for _, m in scored]
            )
        picks = []
        for crit in self.criteria:
            best, _ = self._select(scored, crit, along_lambda=True)
            picks.append((None, None, None) if best is None else (self.lambdas[best], scored[best][0], scored[best][1]))
        return picks

    # -- cost ------------------------------------------------------------------------------------
    def _cost(self, unlearn=(), select=(), val_points: int = 0) -> Cost:
        """A method's cost (bench.cost): its training from the cache records, and ``val_points``
        selection-time evaluations (``_metrics(full=False)``: Dr subsample, Df, Val, and the attack's
        members under avg_gap), plus the reference model's evaluation that selection compares with."""
        d = self.data
        val_pass = len(self.dr_small) + len(self.df) + len(d.val_y)
        if self.cfg.selection.rule == "avg_gap":
            val_pass += len(self.mia_members)
        points = val_points + 1 if val_points else 0
        return charge(unlearn, select, points * val_pass, self._flops_per_image)

    @functools.cached_property
    def _flops_per_image(self) -> float:
        return forward_flops(self._new_model(), self.data.to_input(self.data.train_x[:1]))

    # -- main ------------------------------------------------------------------------------------
    def _setup_seed(self, seed: int) -> None:
        """Df and Dr of this seed, and the seeded subsets that metrics and selection read."""
        cfg, d = self.cfg, self.data
        everything = torch.arange(len(d.train_y))
        self.df = forget_indices(d, cfg.forget.mode, cfg.forget.fraction, cfg.forget.classes, seed)
        self.dr = everything[~torch.isin(everything, self.df)]
        self.df_hash = hashlib.sha256(self.df.numpy().tobytes()).hexdigest()[:16]
        write_json_atomic(
            self.out / "forget_sets" / f"seed{seed}.json",
            {"seed": seed, "mode": cfg.forget.mode, "indices": self.df.tolist()},
        )
        gen = torch.Generator().manual_seed(seed)
        self.dr_small = self.dr[torch.randperm(len(self.dr), generator=gen)[: cfg.selection.retain_size]]
        self.mia_members = self.dr[torch.randperm(len(self.dr), generator=gen)[: cfg.mia.n_members]]
        self.mia_nonmembers = torch.randperm(len(d.test_y), generator=gen)[: cfg.mia.n_nonmembers]
        # selection's non-members come from the validation split: selection never reads a test image
        self.mia_val_nonmembers = torch.randperm(len(d.val_y), generator=gen)[: cfg.mia.n_nonmembers]

    def run(self) -> RunRecorder:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        self.rt = cfg.runtime()  # an unavailable device fails here, before any work
        self.rec.runtime = self.rt.describe()
        self._key_by_runtime()
        d = self.data = load_classic(
            cfg.dataset,
            test_limit=cfg.data.test_limit,
            train_limit=cfg.data.train_limit,
            val_size=cfg.data.val_size,
            split_seed=cfg.data.split_seed,
            root=cfg.data.root,
            download=cfg.data.download,
        )
        everything = torch.arange(len(d.train_y))
        for setting in cfg.sisa.settings() if "sisa" in cfg.methods else ():  # before any training
            if setting.shards * setting.slices > len(d.train_y):
                raise BenchError(
                    f"sisa: {setting.shards} shards x {setting.slices} slices need at least "
                    f"{setting.shards * setting.slices} training samples, {cfg.dataset} has {len(d.train_y)}: "
                    "lower sisa.shards or sisa.slices"
                )
        unit = self.unit
        for seed in cfg.seeds:
            if unit is not None and unit.seed != seed:
                continue
            row = dict(backbone=cfg.model.name, dataset=cfg.dataset, seed=seed)
            self._setup_seed(seed)
            if unit is not None and unit.kind == "retrain":
                self._trained("retrain", self.dr, seed)
                continue
            with self.rec.timed("original"):
                self.original = self._trained("original", everything, seed if cfg.original_per_seed else 0)
                self.original_key = _state_id(self.original)
            if unit is not None and unit.kind in PRODUCE:  # one model, from the Original: no evaluation
                if unit.kind == "baseline":
                    self._baseline_entry(unit.method, cfg.baselines[unit.method].points(seed)[unit.index], seed)
                elif unit.kind == "candidate":
                    self._pool_entry(unit.index, cfg.pool.points(seed)[unit.index])
                continue
            original = (f"original:{self.original_key}", lambda: self._model_from(self.original))
            self.original_val = self._evaluate(*original, seed, full=False)
            with self.rec.timed("retrain"):
                retrain_state = self._trained("retrain", self.dr, seed)
                retrain = (f"retrain:{_state_id(retrain_state)}", lambda: self._model_from(retrain_state))
                self.retrain_metrics = self._evaluate(*retrain, seed)
                self.retrain_val = self._evaluate(*retrain, seed, full=False)
            references = {"before": original, "target": retrain}
            made = {"before": self.trained_entries["original"], "target": self.trained_entries["retrain"]}
            for method in cfg.methods:
                if get_method(method).kind == "reference":
                    self.rec.charge(row, method, self._cost([made[get_method(method).role]]))
                    for crit in self.criteria:
                        self._record(row, method, references[get_method(method).role], None, "", seed, crit)
            for method in training_methods(cfg):
                with self.rec.timed(method):
                    self._baseline(row, method, seed)
            if uses_pool(cfg.methods):
                with self.rec.timed("task vectors"):
                    self._task_vectors(row, seed)
            for setting in cfg.sisa.settings() if "sisa" in cfg.methods else ():  # last: earlier rows stay as they were
                with self.rec.timed(setting.name):
                    self._sisa(row, setting, seed)
        self.rec.cache_entries["evals"] = sorted(self.evals.used)
        sel = cfg.selection
        rules, floors = ", ".join(sel.rule_list), ", ".join(map(str, sel.floor_list))
        plural = "s" * (len(sel.rule_list) > 1), "s" * (len(sel.floor_list) > 1)
        self.rec.note(f"BatchNorm statistics: {cfg.bn}; selection rule{plural[0]}: {rules}; floor{plural[1]} {floors}")
        self.rec.finish()
        return self.rec
