"""Protocol B (DESIGN.md §2): forget a random p% of the training data of a standard classifier,
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from baselines import get_merge
from bench.classic_train import logits_of, saliency_mask, train
from bench.classifiers import build_classifier
from bench.codehash import code_digest
from bench.config import ClassicSuite
from bench.data.classic import forget_indices, load_classic
from bench.evalcache import EvalCache, vector_id
from bench.evaluate import per_sample_loss, true_label_prob
from bench.io import write_json_atomic
from bench.metrics import loss_attack_auc, mia_efficacy
from bench.pool import CandidatePool
from bench.results import RunRecorder
from bench.selection import Selection, lambda_grid
from bench.units import PRODUCE, Unit
from negmerge import apply, consensus_rate

METRICS = ("retain_acc", "forget_acc", "test_acc", "mia_efficacy")  # the four Avg. Gap is taken over


def avg_gap(metrics: Mapping[str, float], retrain: Mapping[str, float]) -> float:
    """Mean over {Dr, Df, Dtest, MIA-efficacy} of |method - Retrain| (DESIGN.md §2)."""
    return float(np.mean([abs(metrics[m] - retrain[m]) for m in METRICS]))


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
        self.rec = RunRecorder(self.out, cfg, selection_rule=cfg.selection.rule)
        version = code_digest("bench.classic_train", "bench.classifiers")
        version += "" if cfg.precision == "fp32" else f"-{cfg.precision}"
        self.models = CandidatePool(self.cache / "classic-models", version)
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

    # -- models ----------------------------------------------------------------------------------
    def _new_model(self) -> nn.Module:
        torch.manual_seed(0)
        model = build_classifier(
            self.cfg.model.name, self.data.num_classes, self.data.in_channels, self.cfg.model.widths
        )
        return model.to(self.rt.device)

    def _model_from(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        model = self._new_model()
        model.load_state_dict(state)
        return model.eval()

    def _trained(self, role: str, index: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
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
            model = self._new_model()
            torch.manual_seed(seed)
            for m in model.modules():  # seed-dependent init
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
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
        if entry.status != "ok":
            raise RuntimeError(f"{role} diverged: {entry.error}")
        return load_file(entry.path)

    # -- metrics ---------------------------------------------------------------------------------
    def _evaluate(self, mid: str, model_fn, seed: int, full: bool = True) -> dict[str, float]:
        """Metrics of the model ``mid`` (built by ``model_fn`` only on a cache miss)."""
        what = {"model": mid, "full": full, "seed": seed, "df": self.df_hash, "bn": self.cfg.bn}
        return self.evals.get_or_compute(what, lambda: self._metrics(model_fn(), seed, full))

    def _metrics(self, model: nn.Module, seed: int, full: bool = True) -> dict[str, float]:
        """Acc on Dr, Df, Dtest (and Val), MIA-efficacy and loss AUC. ``full=False``: the cheap
        selection-time version (Dr subsample, Val instead of test)."""
        d = self.data
        dr = self.dr if full else self.dr_small
        out = {"retain_acc": _acc(logits_of(model, d, d.train_x[dr], runtime=self.rt), d.train_y[dr])}
        f_logits = logits_of(model, d, d.train_x[self.df], runtime=self.rt)
        out["forget_acc"] = _acc(f_logits, d.train_y[self.df])
        t_x, t_y = (d.test_x, d.test_y) if full else (d.val_x, d.val_y)
        t_logits = logits_of(model, d, t_x, runtime=self.rt)
        out["test_acc"] = _acc(t_logits, t_y)
        out["val_acc"] = _acc(logits_of(model, d, d.val_x, runtime=self.rt), d.val_y) if full else out["test_acc"]
        if not full and self.cfg.selection.rule == "floor":
            return out  # the floor rule needs no MIA: skip the attack on every lambda
        # MIA: members = retain samples, non-members = test samples, counts fixed by config; target = Df.
        # Selection (full=False) takes its non-members from Val, never from the test split.
        m_idx = self.mia_members
        n_idx = self.mia_nonmembers if full else self.mia_val_nonmembers
        m_logits = logits_of(model, d, d.train_x[m_idx], runtime=self.rt)
        n_logits = t_logits[n_idx]
        n_labels = t_y[n_idx]
        out["mia_efficacy"] = mia_efficacy(
            true_label_prob(m_logits, d.train_y[m_idx]),
            true_label_prob(n_logits, n_labels),
            true_label_prob(f_logits, d.train_y[self.df]),
            max_per_class=None,
            seed=seed,
        )
        # threshold-free: forget samples (members of Original's training) vs test non-members
        out["mia_auc"] = loss_attack_auc(
            per_sample_loss(f_logits, d.train_y[self.df]), per_sample_loss(n_logits, n_labels)
        )
        return out

    def _select(self, scored: list[tuple[Any, dict[str, float]]]) -> tuple[int | None, str]:
        """Index of the best (model or lambda) by the configured rule, on validation numbers."""
        if self.cfg.selection.rule == "avg_gap":
            gaps = [avg_gap(m, self.retrain_val) for _, m in scored]
            return int(np.argmin(gaps)), ""
        minimum = self.cfg.selection.floor * self.original_val["test_acc"]
        feasible = [(m["forget_acc"], i) for i, (_, m) in enumerate(scored) if m["test_acc"] + 1e-9 >= minimum]
        if not feasible:
            return (
                None,
                f"no setting keeps Val acc >= {self.cfg.selection.floor} x Original's {self.original_val['test_acc']:.2f}",
            )
        return min(feasible)[1], ""

    def _record(
        self,
        row: dict,
        method: str,
        chosen: tuple[str, Any] | None,
        lam: float | None,
        reason: str,
        seed: int,
        at_edge: bool = False,
    ) -> None:
        """``chosen``: (model id, model factory) of the selected model, or None when none qualified."""
        if chosen is None:
            self.rec.result(row, method, Selection(None, None, None, False, reason), {}, self.cfg.selection.floor)
            return
        mid, model_fn = chosen
        metrics = dict(self._evaluate(mid, model_fn, seed))
        metrics["avg_gap"] = avg_gap(metrics, self.retrain_metrics)
        val = self._evaluate(mid, model_fn, seed, full=False)
        sel = Selection(lam, val["forget_acc"], val["test_acc"], at_edge)
        self.rec.result(row, method, sel, metrics, self.cfg.selection.floor)

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
        candidates = []
        for params in self.cfg.baselines[method].points(seed):
            entry = self._baseline_entry(method, params, seed)
            if entry.status != "ok":
                continue

            def model_fn(entry=entry):
                return self._model_from(load_file(entry.path))

            candidates.append(((entry.key, model_fn), self._evaluate(entry.key, model_fn, seed, full=False)))
        best, reason = self._select(candidates) if candidates else (None, f"every {method} setting diverged")
        self._record(row, method, candidates[best][0] if best is not None else None, None, reason, seed)

    def _baseline_entry(self, method: str, params, seed: int):
        """One setting of a training-based baseline, trained from the Original (cached)."""
        d, cfg = self.data, self.cfg
        extra = cfg.baseline_params.get(method, {})
        spec = {
            "role": method,
            "original": self.original_key,
            "df": self.df_hash,
            "params": params.__dict__,
            "extra": extra,
        }

        def make(params=params):
            model = self._model_from(self.original)
            fit = functools.partial(train, model, d, params=params, progress=cfg.progress, runtime=self.rt)
            if method == "ft":
                fit(d.train_x[self.dr], d.train_y[self.dr], desc="FT")
            elif method == "ga":
                fit(d.train_x[self.df], d.train_y[self.df], direction=-1, desc="GA")
            elif method == "l1_sparse":
                fit(d.train_x[self.dr], d.train_y[self.dr], l1_alpha=extra.get("alpha", 5e-4), desc="l1-sparse")
            else:  # rl and salun: Df with random wrong labels, mixed with Dr (as SalUn does)
                x, y = self._random_label_set(seed, extra.get("retain_fraction", 1.0))
                mask = None
                if method == "salun":
                    mask = saliency_mask(
                        model, d, d.train_x[self.df], d.train_y[self.df], extra.get("sparsity", 0.5), runtime=self.rt
                    )
                fit(x, y, grad_mask=mask, desc=method)
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        entry = self.models.get_or_create(spec, make)
        self.rec.pool_member(entry, method, params.label())
        return entry

    def _random_label_set(self, seed: int, retain_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Df relabelled with a random wrong class, plus a seeded ``retain_fraction`` of Dr with true labels.

        SalUn's RL trains on Df and all of Dr (fraction 1.0, the default): the wrong labels are then a
        tenth of the data at 10% forgetting, so the model unlearns Df without losing Dr. Mixing in only
        |Df| retain samples makes half the labels noise and collapses accuracy everywhere.
        """
        d = self.data
        gen = torch.Generator().manual_seed(seed)
        true = d.train_y[self.df]
        wrong = (true + torch.randint(1, d.num_classes, true.shape, generator=gen)) % d.num_classes
        n_retain = max(1, round(retain_fraction * len(self.dr)))
        keep_dr = self.dr[torch.randperm(len(self.dr), generator=gen)[:n_retain]]
        return torch.cat([d.train_x[self.df], d.train_x[keep_dr]]), torch.cat([wrong, d.train_y[keep_dr]])

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
        entries = [self._pool_entry(i, params) for i, params in enumerate(cfg.pool.points(seed))]
        ok = [e for e in entries if e.status == "ok"]
        vectors: dict[str, Any] = {}
        for method in cfg.methods:
            if method in ("average", "ties", "magmax", "negmerge"):
                params = cfg.merge_params.get(method, {})
                merged = get_merge(method)([e.path for e in ok], **params)
                vectors[method] = (vector_id(method, params, [e.key for e in ok]), merged)
                self.rec.extra(row, method, "consensus_rate", consensus_rate(merged))
        singles = [(e.key, load_file(e.path)) for e in ok] if "single_best" in cfg.methods else []
        best_single: tuple[dict[str, float], Any] | None = None
        for j, (vid, tau) in enumerate(singles):
            lam, chosen, val = self._sweep(row, f"candidate:{j}", vid, tau, seed)
            if chosen is not None and (best_single is None or self._better(val, best_single[0])):
                best_single = (val, (lam, chosen))
        if singles:
            if best_single is None:
                self._record(row, "single_best", None, None, "no candidate has a feasible lambda", seed)
            else:
                lam, chosen = best_single[1]
                self._record(row, "single_best", chosen, lam, "", seed, at_edge=lam == max(self.lambdas))
        for method, (vid, tau) in vectors.items():
            lam, chosen, _ = self._sweep(row, method, vid, tau, seed)
            edge = lam == max(self.lambdas) if lam is not None else False
            self._record(row, method, chosen, lam, "no feasible lambda", seed, at_edge=edge)

    def _better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        if self.cfg.selection.rule == "avg_gap":
            return avg_gap(a, self.retrain_val) < avg_gap(b, self.retrain_val)
        return a["forget_acc"] < b["forget_acc"]

    def _sweep(self, row: dict, method: str, vid: str, tau, seed: int):
        scored = []
        for lam in self.lambdas:

            def model_fn(lam=lam):
                return self._edited(tau, lam)

            mid = f"{vid}@{lam}"
            scored.append(((mid, model_fn), self._evaluate(mid, model_fn, seed, full=False)))
        self.rec.curve(
            row, method, self.lambdas, [m["forget_acc"] for _, m in scored], [m["test_acc"] for _, m in scored]
        )
        best, _ = self._select(scored)
        if best is None:
            return None, None, None
        return self.lambdas[best], scored[best][0], scored[best][1]

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
            for method in ("original", "retrain"):
                if method in cfg.methods:
                    self._record(row, method, original if method == "original" else retrain, None, "", seed)
            for method in ("ft", "ga", "rl", "l1_sparse", "salun"):
                if method in cfg.methods:
                    with self.rec.timed(method):
                        self._baseline(row, method, seed)
            if set(cfg.methods) & {"single_best", "average", "ties", "magmax", "negmerge"}:
                with self.rec.timed("task vectors"):
                    self._task_vectors(row, seed)
        self.rec.note(
            f"BatchNorm statistics: {cfg.bn}; selection rule: {cfg.selection.rule}; floor {cfg.selection.floor}"
        )
        self.rec.finish()
        return self.rec
