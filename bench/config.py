"""Suite configs: YAML validated on load. Any unknown key, method, dataset or backbone, empty grid or
out-of-range floor is one clear error naming the field (pydantic does the field paths)."""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from bench.errors import BenchError
from bench.finetune import FinetuneParams

SUITES_DIR = Path(__file__).parent / "suites"
PARAM_FIELDS = {f.name for f in fields(FinetuneParams)}


def require_known(kind: str, names, known) -> None:
    """One wording for every "not one of these" error: names the culprit and lists the choices."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")


def _offered(kind: str, what: str, names, protocol: str) -> None:
    """Each of ``names`` must be a registered ``kind`` method that ``protocol`` offers; else one line
    naming it, suggesting close names, or saying what the protocol lacks."""
    from baselines import all_methods, find_method
    from bench.protocols import offered_methods

    offered = offered_methods(protocol)
    choices = [m.name for m in all_methods() if m.name in offered and (kind == "any" or m.kind == kind)]
    for name in names:
        method = find_method(name)
        if method is not None and name in choices:
            continue
        if method is not None and (kind == "any" or method.kind == kind):
            why = f"it needs {', '.join(sorted(method.training.needs))}" if method.kind == "training" else ""
            raise ValueError(
                f"{what} {name!r} is not offered by protocol {protocol}{f' ({why})' if why else ''}; "
                f"offered: {', '.join(choices)}"
            )
        close = difflib.get_close_matches(str(name), choices, n=2)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint} (known: {', '.join(choices)})")


def _method_params(kind: str, what: str, value: dict[str, dict[str, Any]], info: ValidationInfo):
    """``merge_params`` / ``baseline_params``: known methods of ``kind``, each parameter checked."""
    from baselines import get_method

    if "protocol" not in info.data:
        return value  # the protocol itself failed validation, and says so
    _offered(kind, what, value, info.data["protocol"])
    for name, params in value.items():
        get_method(name).check_params(params)
    return value


def _methods(names: list[str] | None, info: ValidationInfo) -> list[str]:
    """Default: every method the protocol offers, training methods only where ``baselines`` sets them.
    A training method listed without settings is refused here, before anything runs."""
    from baselines import get_method
    from bench.protocols import offered_methods

    protocol, baselines = info.data.get("protocol"), info.data.get("baselines", {})
    if protocol is None:
        return names or []

    def settings(m: str) -> str | None:
        """Where ``m``'s settings go, when it has none yet (a sharded method: its own section)."""
        kind = get_method(m).kind
        if kind == "training" and m not in baselines:
            return f"baselines.{m}"
        return m if kind == "sharded" and info.data.get(m) is None else None

    if names is None:
        names = [m for m in offered_methods(protocol) if settings(m) is None]
    if not names:
        raise ValueError("give at least one method")
    _offered("any", "method", names, protocol)
    missing = [m for m in names if settings(m) is not None]
    if missing:
        raise ValueError(f"method {missing[0]!r} needs settings under {settings(missing[0])}")
    return names


def _moved_gradient_ascent(raw: Any) -> Any:
    if isinstance(raw, dict) and "gradient_ascent" in raw:
        raise ValueError("gradient_ascent: gradient ascent is the method 'ga' now; move its grid to baselines.ga")
    return raw


def _check_points(make_points, what: str = "fine-tuning setting") -> None:
    try:
        make_points()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid {what}: {exc}") from None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeFields(Strict):
    """Where and how precisely every stage computes (bench.device); precision is part of cache keys."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N  (auto: CUDA when present)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for forward passes; fp32 master weights
    compile: bool = False  # torch.compile the image encoder / classifier
    deterministic: bool = True  # deterministic kernels: a rerun reproduces every number (off: cuDNN autotuning)
    # independent work run at once on this machine (Protocol A's lambda points, test splits and pool
    # fine-tunes; Protocol B trains one model at a time), each with `threads` threads; auto: one per
    # `threads` cores on a CPU, 1 on an accelerator. Results never depend on it.
    jobs: int | Literal["auto"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        from bench.device import DEVICE_PATTERN

        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("jobs")
    @classmethod
    def _jobs_positive(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"jobs must be auto or >= 1, got {value}")
        return value

    def runtime(self):
        from bench.device import resolve_runtime

        return resolve_runtime(self.device, self.precision, self.compile, self.deterministic)


class BackboneCfg(Strict):
    name: str
    pretrained: str | None = None  # open_clip tag, checkpoint file, "pretrain" (made by the suite) or None


class PretrainCfg(Strict):
    """Contrastive pretraining of a tiny open_clip model on offline images with class-name captions."""

    datasets: dict[str, float]  # dataset -> fraction of its training split used (offline sets)
    steps: int = Field(600, gt=0)
    batch_size: int = Field(256, gt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.1
    seed: int = 0

    @field_validator("datasets")
    @classmethod
    def _offline_sets(cls, value: dict[str, float]) -> dict[str, float]:
        from bench.data import DATASETS

        offline = sorted(n for n, spec in DATASETS.items() if spec.kind == "offline")
        require_known("pretraining dataset", value, offline)
        for name, fraction in value.items():
            if not 0 < fraction <= 1:
                raise ValueError(f"{name}: the fraction must be in (0, 1], got {fraction}")
        return value


class DataCfg(Strict):
    """Where the data lives and how splits are made (docs/datasets.md has the per-dataset table)."""

    val_fraction: float = Field(0.1, gt=0, lt=1)
    val_max: int = Field(5000, gt=0)
    split_seed: int = 0
    train_limit: int | None = Field(None, gt=0)
    eval_limit: int | None = Field(None, gt=0)
    root: str | None = None  # the paper's datasets: a clip-benchmark root, or a template with {dataset}
    roots: dict[str, str] = {}  # per-dataset folder (overrides root; offline sets: their source folder)
    layouts: dict[str, Literal["auto", "wds", "folder", "torchvision"]] = {}  # per dataset; default auto
    download: bool = False
    workers: int = Field(0, ge=0)  # DataLoader processes decoding file-backed images (results do not change)
    bad_images: Literal["error", "skip"] = "error"  # a damaged image file: stop naming it, or leave it out

    @field_validator("roots", "layouts")
    @classmethod
    def _known_datasets(cls, value: dict[str, Any]) -> dict[str, Any]:
        from bench.data import DATASETS

        require_known("dataset", value, DATASETS)
        return value

    def load_kwargs(self) -> dict[str, Any]:
        """What ``bench.data.load_task`` takes from this section (also part of cache keys: ``bad_images``
        is not; what ``skip`` leaves out enters the keys of what was computed without it)."""
        return self.model_dump(exclude={"workers", "bad_images"})


def default_index(grid: dict[str, list[Any]], default: dict[str, Any] | None) -> int:
    """Where the single-run setting (``default``: one value per grid axis; each axis's first value
    where it names none) sits among the grid's points, in ``itertools.product`` order."""
    default = default or {}
    index = 0
    for axis, values in grid.items():
        index = index * len(values) + values.index(default.get(axis, values[0]))
    return index


def check_default(section: str, grid: dict[str, list[Any]], default: dict[str, Any] | None) -> None:
    """The single run must be one of the pool's candidates: what a user without a sweep trains."""
    for axis, value in (default or {}).items():
        if axis not in grid:
            raise ValueError(f"{section}.default.{axis}: not a grid axis (axes: {', '.join(grid) or 'none'})")
        if value not in grid[axis]:
            raise ValueError(
                f"{section}.default.{axis}: {value!r} is not on the grid axis {grid[axis]}; "
                "the single run must be one of the pool's candidates"
            )


class GridCfg(Strict):
    """Candidates = ``base`` updated by every point of the cartesian product of ``grid`` axes.
    ``default`` names the single run's setting (method ``single_run``)."""

    base: dict[str, Any] = {}
    grid: dict[str, list[Any]]
    default: dict[str, Any] | None = None

    @field_validator("base", "grid")
    @classmethod
    def _known_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        require_known("hyperparameter", sorted(value), PARAM_FIELDS)
        return value

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid or any(len(v) == 0 for v in grid.values()):
            raise ValueError("the grid is empty: give at least one axis with at least one value")
        return grid

    @model_validator(mode="after")
    def _points_valid(self) -> GridCfg:
        """Every candidate's settings checked now, not when its fine-tuning starts."""
        _check_points(lambda: self.points(0))
        check_default("finetune", self.grid, self.default)
        return self

    @property
    def default_index(self) -> int:
        return default_index(self.grid, self.default)

    def points(self, seed: int, dataset_base: dict[str, Any] | None = None) -> list[FinetuneParams]:
        """Grid points; ``dataset_base`` (per-dataset settings, e.g. the paper's epochs) sits between
        ``base`` and the grid axes."""
        axes = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[a] for a in axes)):
            params = {"seed": seed, **self.base, **(dataset_base or {}), **dict(zip(axes, values))}
            out.append(FinetuneParams(**params))
        return out


class PoolGridCfg(GridCfg):
    """Protocol A's candidate pool: the fine-tuning grid, and how its candidates are trained and
    evaluated. ``mode: linear`` fine-tunes the encoder's first-order Taylor expansion around theta_0
    (bench.linearized); ``linear_eval`` says where its vectors are applied: on that linear model (the
    literature's protocol) or, ``posthoc``, on the encoder itself. One pool holds one mode."""

    mode: Literal["standard", "linear"] = "standard"
    linear_eval: Literal["linear", "posthoc"] = "linear"

    @model_validator(mode="before")
    @classmethod
    def _mode_not_an_axis(cls, raw: Any) -> Any:
        for section in ("base", "grid"):
            if isinstance(raw, dict) and isinstance(raw.get(section), dict) and "mode" in raw[section]:
                raise ValueError(
                    f"{section}.mode: the fine-tuning mode is not a hyperparameter of a candidate: set "
                    "finetune.mode (one pool holds one mode; a second suite with the other mode gives the other pool)"
                )
        return raw

    @model_validator(mode="after")
    def _eval_needs_linear(self) -> PoolGridCfg:
        if self.linear_eval != "linear" and self.mode != "linear":
            raise ValueError(
                f"linear_eval: {self.linear_eval} applies to linear candidates only: set finetune.mode: linear, or drop it"
            )
        return self


class PoolFromCfg(Strict):
    """A candidate pool from a sweep already on disk (docs/checkpoints.md): ``from`` is a folder, glob
    or checkpoint list of the fine-tuned candidates, ``theta0`` the model they started from; both may
    hold ``{dataset}`` and ``{seed}``. No fine-tuning runs for the pool."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field(alias="from", min_length=1)
    theta0: str = Field(min_length=1)


def _in_unit_interval(v: float, what: str = "floor") -> float:
    if not (0 < v <= 1):
        raise ValueError(f"{what} must be in (0, 1], got {v}")
    return v


class SelectionCfg(Strict):
    """The lambda grid and the selection criteria (docs/metrics.md#selection). ``floors`` / ``rules``
    are lists whose single-value forms ``floor`` / ``rule`` stay valid; one form per field, not both.
    Every (rule, floor) is selected from the same Val curves (``bench.selection.criteria``)."""

    lambda_start: float = 0.0
    lambda_stop: float = 1.0
    lambda_step: float = Field(0.05, gt=0)
    floor: float = 0.95
    floors: list[float] | None = None  # several control floors, the first one the main table's
    rule: Literal["control-floor", "control_only"] = "control-floor"
    rules: list[Literal["control-floor", "control_only"]] | None = None

    @field_validator("floor")
    @classmethod
    def _floor_range(cls, v: float) -> float:
        return _in_unit_interval(v)

    @field_validator("floors")
    @classmethod
    def _floors_range(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("floors: give at least one floor (or use floor: 0.95)")
        for x in v:
            _in_unit_interval(x, "every floor")
        if len(set(v)) != len(v):
            raise ValueError(f"floors: a floor is listed twice in {v}")
        return v

    @field_validator("rules")
    @classmethod
    def _rules_listed_once(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("rules: give at least one rule (or use rule: ...)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"rules: a rule is listed twice in {v}")
        return v

    @model_validator(mode="after")
    def _one_form_each(self) -> SelectionCfg:
        for one, many in (("floor", "floors"), ("rule", "rules")):
            if one in self.model_fields_set and many in self.model_fields_set and getattr(self, many) is not None:
                raise ValueError(f"give {one} or {many}, not both (e.g. {many}: [...] alone)")
            if getattr(self, many) is not None:  # the single form reads as the first of the list
                object.__setattr__(self, one, getattr(self, many)[0])  # not marked as given: dumps stay one form
        return self

    @model_serializer(mode="wrap")
    def _dump_as_given(self, handler):
        """The form the user gave, and only it: a dumped config validates again (a worker process
        reloads it) and an existing suite's dump is what it was."""
        out = handler(self)
        for one, many in (("floor", "floors"), ("rule", "rules")):
            out.pop(one if getattr(self, many) is not None else many, None)
        return out

    @property
    def floor_list(self) -> list[float]:
        return list(self.floors) if self.floors is not None else [self.floor]

    @property
    def rule_list(self) -> list[str]:
        return list(self.rules) if self.rules is not None else [self.rule]

    @model_validator(mode="after")
    def _grid_not_empty(self) -> SelectionCfg:
        if not (math.isfinite(self.lambda_start) and math.isfinite(self.lambda_stop)):
            raise ValueError("lambda_start and lambda_stop must be finite numbers")
        if self.lambda_start > self.lambda_stop:
            raise ValueError(
                f"lambda_start {self.lambda_start} is above lambda_stop {self.lambda_stop}: the grid is empty"
            )
        return self


class MiaCfg(Strict):
    enabled: bool = True
    max_per_class: int = Field(2000, gt=1)


class SignificanceCfg(Strict):
    """``report.significance``: which methods every other is tested against, and how
    (bench.significance, docs/metrics.md#significance). The report reads it from the manifest."""

    reference: list[str] | None = None  # default: NegMerge, where the run has it
    alpha: float = Field(0.05, gt=0, lt=1)
    test: Literal["permutation", "bootstrap"] = "permutation"  # the one whose verdict counts
    resamples: int = Field(9999, ge=99)
    seed: int = 0  # of the resampling: the report is the same bytes every time


class ReportCfg(Strict):
    significance: SignificanceCfg = SignificanceCfg()


def _check_reference(report: ReportCfg, methods: list[str] | None) -> None:
    from baselines import find_method

    for name in report.significance.reference or ():
        method = find_method(name)
        if methods is not None and name not in methods:
            raise ValueError(f"report.significance.reference: {name!r} is not one of this run's methods")
        if method is not None and method.kind == "reference":
            raise ValueError(f"report.significance.reference: {name!r} is a reference row, not a method")


POOL_TESTS = ("not", "glob")  # a filter value {not: v} or {glob: pattern}; else equal / one of a list


class PoolFilterCfg(Strict):
    """One named sub-pool of ``ablation.pools`` (docs/protocols.md#studies): the candidates whose
    hyperparameters match ``where`` (hyperparameter -> value, list of values, {not: v} or {glob: p},
    p a pattern or a list of them),
    or an adversarial pick: the ``worst_forget_val`` candidates whose own selected forget Val is highest."""

    where: dict[str, Any] = {}
    worst_forget_val: int | None = Field(None, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, raw: Any) -> Any:
        """``{randaug: null}`` is a filter; ``{adversarial: {worst_forget_val: k}}`` the adversarial pool."""
        if isinstance(raw, dict) and set(raw) == {"adversarial"}:
            return raw["adversarial"] if isinstance(raw["adversarial"], dict) else raw
        if isinstance(raw, dict) and not ({"where", "worst_forget_val"} & set(raw)):
            return {"where": raw}
        return raw

    @model_validator(mode="after")
    def _one_kind(self) -> PoolFilterCfg:
        if bool(self.where) == (self.worst_forget_val is not None):
            raise ValueError("give hyperparameter filters, or adversarial: {worst_forget_val: k}, not both or neither")
        for key, value in self.where.items():
            if isinstance(value, dict) and (len(value) != 1 or next(iter(value)) not in POOL_TESTS):
                raise ValueError(f"{key}: a test is {{not: value}} or {{glob: pattern}}, got {value}")
        return self

    def matches(self, params: dict[str, Any]) -> bool:
        """Whether a candidate with hyperparameters ``params`` belongs to this (filter) sub-pool."""
        import fnmatch

        for key, want in self.where.items():
            have = params.get(key)
            if isinstance(want, dict) and "not" in want:
                banned = want["not"] if isinstance(want["not"], list) else [want["not"]]
                if have in banned:
                    return False
            elif isinstance(want, dict):
                patterns = want["glob"] if isinstance(want["glob"], list) else [want["glob"]]
                if have is None or not any(fnmatch.fnmatchcase(str(have), str(p)) for p in patterns):
                    return False
            elif have not in (want if isinstance(want, list) else [want]):
                return False
        return True


class StudiesCfg(Strict):
    """The studies over one pool both protocols run (docs/protocols.md#studies): NegMerge at each
    consensus threshold, and every merge over named sub-pools. Only merges and evaluations are new."""

    thresholds: list[float] = []  # NegMerge's threshold t at each value, on the full pool
    pools: dict[str, PoolFilterCfg] = {}

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, values: list[float]) -> list[float]:
        bad = [t for t in values if not 0 < t <= 1]
        if bad:
            raise ValueError(f"thresholds: a consensus threshold is in (0, 1], got {bad[0]}")
        if len(set(values)) != len(values):
            raise ValueError("thresholds: a value is listed twice")
        return values


def check_pools(pools: dict[str, PoolFilterCfg], params: list[dict[str, Any]], known: set[str], where: str) -> None:
    """Every filter names known hyperparameters and keeps at least 2 of the pool's ``params``; an
    adversarial pick is no larger than the pool. Checked on load, before any work."""
    for name, pool in pools.items():
        unknown = sorted(set(pool.where) - known)
        if unknown:
            raise ValueError(
                f"ablation.pools.{name}: unknown hyperparameter {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        if pool.worst_forget_val is not None and params and pool.worst_forget_val > len(params):
            raise ValueError(
                f"ablation.pools.{name}: worst_forget_val {pool.worst_forget_val} is more than the pool's "
                f"{len(params)} candidates"
            )
        if pool.where and params:
            kept = sum(pool.matches(p) for p in params)
            if kept < 2:
                raise ValueError(
                    f"ablation.pools.{name}: the filter keeps {kept} of {len(params)}{where}; a merge needs 2"
                )


class AblationCfg(StudiesCfg):
    """Protocol A's studies: the pool-size ablation (NegMerge over random subsets of the cached pool,
    N = each size, several draws; ``sizes: null`` skips it), and the threshold and sub-pool studies."""

    sizes: list[int] | None = []  # empty: 2 .. K; null: no pool-size ablation
    draws: int = Field(3, gt=0)
    seed: int = 0
    method: str = "negmerge"  # the merge whose pool-size dependence is measured

    @field_validator("method")
    @classmethod
    def _a_merge(cls, name: str) -> str:
        _offered("merge", "merge", [name], "clip")
        return name

    @field_validator("sizes")
    @classmethod
    def _at_least_two(cls, sizes: list[int] | None) -> list[int] | None:
        small = [n for n in sizes or () if n < 2]
        if small:
            raise ValueError(f"a merge needs at least 2 candidates, got size {small[0]}")
        return sizes


class TrackingFields(Strict):
    """Experiment trackers a finished run is logged to (bench.tracking); never part of a cache key."""

    tracking: list[Literal["wandb", "mlflow", "tensorboard"]] = []
    tracking_dir: str | None = None  # local stores; default: tracking/ beside the run folder
    tracking_uri: str | None = None  # MLflow tracking URI; default: SQLite in tracking_dir
    tracking_project: str = "negmerge-bench"  # W&B project and MLflow experiment


class MethodChecks(RuntimeFields, TrackingFields):
    """The method fields every protocol's suite has (``baselines``, ``baseline_params``,
    ``merge_params``, ``methods``), checked against the registry for the suite's protocol. Subclasses
    declare the fields, ``protocol`` first and ``methods`` last: a check reads the fields before it."""

    @field_validator("baselines", check_fields=False)
    @classmethod
    def _baselines_offered(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "protocol" in info.data:
            _offered("training", "baseline", value, info.data["protocol"])
        return value

    @field_validator("baseline_params", check_fields=False)
    @classmethod
    def _baseline_params_checked(cls, value: dict[str, dict[str, float]], info: ValidationInfo):
        return _method_params("training", "baseline", value, info)

    @field_validator("merge_params", check_fields=False)
    @classmethod
    def _merge_params_checked(cls, value: dict[str, dict[str, Any]], info: ValidationInfo):
        return _method_params("merge", "merge", value, info)

    @field_validator("methods", check_fields=False)
    @classmethod
    def _methods_offered(cls, value: list[str] | None, info: ValidationInfo) -> list[str]:
        return _methods(value, info)


class ClipSuite(MethodChecks):
    """Protocol A: CLIP task negation (docs/protocols.md#protocol-a)."""

    protocol: Literal["clip"]
    name: str
    description: str = ""
    seeds: list[int] = [0]
    threads: int = Field(1, gt=0)
    backbone: BackboneCfg
    pretrain: PretrainCfg | None = None
    forget: list[str]
    control: str
    data: DataCfg = DataCfg()
    finetune: PoolGridCfg | None = None  # the candidate pool's fine-tuning grid (and mode), or:
    pool: PoolFromCfg | None = None  # the pool from a sweep on disk
    finetune_per_dataset: dict[str, dict[str, Any]] = {}
    baselines: dict[str, GridCfg] = {}  # training-based methods (ga) -> fine-tuning settings, selected on Val
    baseline_params: dict[str, dict[str, float]] = {}  # per method; unset parameters take its defaults
    merge_params: dict[str, dict[str, Any]] = {}  # per merge; unset parameters take the merge's defaults
    methods: list[str] | None = Field(None, validate_default=True)  # default: all offered, with settings
    selection: SelectionCfg = SelectionCfg()
    mia: MiaCfg = MiaCfg()
    eval_batch_size: int = Field(512, gt=0)
    # GB of evaluation splits an evaluator keeps on its device (uint8 uploads and normalised inputs);
    # default: a quarter of an accelerator's memory, 1 GiB of inputs on a CPU. Results never depend on it.
    eval_resident_gb: float | None = Field(None, gt=0, allow_inf_nan=False)
    ablation: AblationCfg | None = None
    report: ReportCfg = ReportCfg()
    progress: bool = True

    @field_validator("forget")
    @classmethod
    def _forget_known(cls, names: list[str]) -> list[str]:
        from bench.data import DATASETS

        if not names:
            raise ValueError("give at least one forget dataset")
        require_known("dataset", names, DATASETS)
        return names

    @field_validator("control")
    @classmethod
    def _control_known(cls, name: str) -> str:
        from bench.data import DATASETS

        require_known("dataset", [name], DATASETS)
        return name

    _moved = model_validator(mode="before")(_moved_gradient_ascent)

    @field_validator("finetune_per_dataset")
    @classmethod
    def _per_dataset_params(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from bench.data import DATASETS

        require_known("dataset", value, DATASETS)
        for dataset, params in value.items():
            unknown = sorted(set(params) - PARAM_FIELDS)
            if unknown:
                raise ValueError(
                    f"{dataset}: unknown hyperparameter {unknown[0]!r}; known: {', '.join(sorted(PARAM_FIELDS))}"
                )
        return value

    @model_validator(mode="after")
    def _consistency(self) -> ClipSuite:
        if self.backbone.pretrained == "pretrain" and self.pretrain is None:
            raise ValueError("backbone.pretrained is 'pretrain' but the suite has no pretrain section")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.finetune is None and self.pool is None:
            raise ValueError("give finetune (the pool's fine-tuning grid) or pool: {from: ..., theta0: ...}")
        if self.finetune is not None and self.pool is not None:
            raise ValueError("pool.from takes the pool from disk: drop finetune, or drop pool to fine-tune it")
        for dataset in self.forget if self.finetune is not None else ():
            _check_points(lambda dataset=dataset: self.finetune.points(0, self.finetune_per_dataset.get(dataset)))
        _check_reference(self.report, self.methods)
        if self.ablation is not None and self.ablation.pools:
            if self.pool is not None and any(p.where for p in self.ablation.pools.values()):
                raise ValueError(
                    "ablation.pools: a pool from disk has no hyperparameters to filter; use adversarial pools"
                )
            for dataset in self.forget if self.finetune is not None else ():
                points = self.finetune.points(0, self.finetune_per_dataset.get(dataset))
                check_pools(self.ablation.pools, [asdict(p) for p in points], PARAM_FIELDS, f" candidates of {dataset}")
        return self


class SgdGridCfg(Strict):
    """SGD settings: ``base`` updated by every point of the cartesian product of ``grid`` axes. As the
    pool, ``from`` and ``theta0`` take it from a sweep on disk instead (PoolFromCfg)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    default: dict[str, Any] | None = None  # the single run's setting (method single_run)
    from_: str | None = Field(None, alias="from", min_length=1)
    theta0: str | None = Field(None, min_length=1)

    @field_validator("base", "grid")
    @classmethod
    def _known(cls, value: dict[str, Any]) -> dict[str, Any]:
        from bench.classic_train import SgdParams

        require_known("SGD setting", sorted(value), {f.name for f in fields(SgdParams)})
        return value

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if any(len(v) == 0 for v in grid.values()):
            raise ValueError("the grid is empty: every axis needs at least one value")
        return grid

    @model_validator(mode="after")
    def _points_valid(self) -> SgdGridCfg:
        """Every setting checked now, not when its training starts."""
        if (self.from_ is None) != (self.theta0 is None):
            raise ValueError("pool.from and pool.theta0 go together: the sweep and the model it started from")
        if self.from_ is not None and (self.base or self.grid):
            raise ValueError("pool.from takes the pool from disk: drop its base and grid")
        _check_points(lambda: self.points(0), "SGD setting")
        check_default("pool", self.grid, self.default)
        return self

    @property
    def default_index(self) -> int:
        return default_index(self.grid, self.default)

    def points(self, seed: int):
        from bench.classic_train import SgdParams

        axes = list(self.grid)
        return [
            SgdParams(**{"seed": seed, **self.base, **dict(zip(axes, values))})
            for values in itertools.product(*(self.grid[a] for a in axes))
        ]


class ClassicModelCfg(Strict):
    name: str = "small-resnet"
    widths: list[int] | None = None  # small-resnet: channels per stage (16, 32, 64); mlp: hidden (512, 512)

    @model_validator(mode="after")
    def _known(self) -> ClassicModelCfg:
        from bench.classifiers import CLASSIFIERS, WIDTHS

        require_known("classifier", [self.name], CLASSIFIERS)
        if self.widths is not None:
            if self.name not in WIDTHS:
                raise ValueError(f"widths only applies to {', '.join(WIDTHS)}, not {self.name!r}")
            if not self.widths or min(self.widths) < 1:
                raise ValueError(f"widths: give positive layer widths, got {self.widths}")
        return self


class ClassicDataCfg(Strict):
    train_limit: int | None = Field(None, gt=0)
    test_limit: int | None = Field(None, gt=0)  # seeded test subsample, for quick runs only
    val_size: int = Field(1000, gt=0)
    split_seed: int = 0
    root: str | None = None
    download: bool = False


class ForgetCfg(Strict):
    mode: Literal["random", "class"] = "random"
    fraction: float = Field(0.1, gt=0, lt=1)
    classes: list[int] = []


class ClassicSelectionCfg(SelectionCfg):
    rule: Literal["floor", "avg_gap", "control_only"] = "floor"
    rules: list[Literal["floor", "avg_gap", "control_only"]] | None = None
    retain_size: int = Field(1000, gt=0)  # Dr subsample scored at every lambda (a 1k set carries ~+-0.6 points)


class ClassicMiaCfg(Strict):
    n_members: int = Field(2000, gt=1)  # retain samples the attacker trains on as members
    n_nonmembers: int = Field(2000, gt=1)  # test samples it trains on as non-members


class SisaCfg(Strict):
    """SISA (baselines.sisa): every (shards, slices) point of the grid is one result row."""

    shards: int | list[int]
    slices: int | list[int] = 1
    aggregate: Literal["vote", "mean_softmax"] = "vote"
    seed: int = 0  # the shard and slice assignment's seed

    @model_validator(mode="after")
    def _settings_valid(self) -> SisaCfg:
        for axis in ("shards", "slices"):
            if getattr(self, axis) == []:
                raise ValueError(f"sisa.{axis}: give at least one value")
        _check_points(self.settings, "sisa setting")
        return self

    def settings(self):
        from baselines.sisa import SisaSetting

        def axis(value: int | list[int]) -> list[int]:
            return value if isinstance(value, list) else [value]

        return [
            SisaSetting(s, r, self.aggregate, self.seed)
            for s, r in itertools.product(axis(self.shards), axis(self.slices))
        ]


class ClassicSuite(MethodChecks):
    """Protocol B: random-data forgetting on standard classifiers, against Retrain (docs/protocols.md#protocol-b)."""

    protocol: Literal["classic"]
    name: str
    description: str = ""
    seeds: list[int] = [0, 1, 2]
    threads: int = Field(1, gt=0)
    model: ClassicModelCfg = ClassicModelCfg()
    dataset: str = "fashion-mnist"
    data: ClassicDataCfg = ClassicDataCfg()
    forget: ForgetCfg = ForgetCfg()
    train: SgdGridCfg  # Original and Retrain
    original_per_seed: bool = True  # one Original per seed, so the seed spread holds its training noise too (regress)
    baselines: dict[str, SgdGridCfg] = {}  # ft, ga, rl, l1_sparse, salun -> settings (a grid is selected on Val)
    # l1_sparse.alpha, salun.sparsity, and rl/salun.retain_fraction (share of Dr mixed with the relabelled Df)
    baseline_params: dict[str, dict[str, float]] = {}  # per method; unset parameters take its defaults
    pool: SgdGridCfg  # the task-vector candidates: fine-tune the Original on Df
    merge_params: dict[str, dict[str, Any]] = {}  # per merge; unset parameters take the merge's defaults
    sisa: SisaCfg | None = None  # SISA's shards x slices grid (docs/protocols.md#sisa)
    methods: list[str] | None = Field(None, validate_default=True)  # default: all offered, with settings
    bn: Literal["keep", "recalibrate"] = "keep"
    selection: ClassicSelectionCfg = ClassicSelectionCfg(lambda_start=0.5, lambda_stop=4.0, lambda_step=0.5)
    mia: ClassicMiaCfg = ClassicMiaCfg()
    ablation: StudiesCfg | None = None  # the threshold and sub-pool studies on the pool
    report: ReportCfg = ReportCfg()
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_linear_mode(cls, raw: Any) -> Any:
        """Linearised fine-tuning (Protocol A's finetune.mode) is refused here with the reason; a
        ``mode: standard`` is what Protocol B always does and is accepted."""
        for section in ("pool", "finetune"):
            node = raw.get(section) if isinstance(raw, dict) else None
            if isinstance(node, dict) and "mode" in node:
                if node["mode"] != "standard":
                    raise ValueError(
                        f"{section}.mode: {node['mode']!r} is not offered by Protocol B: every classifier it trains "
                        "(small-resnet, mlp, resnet18-cifar, vgg16-bn) has BatchNorm, trained in train mode on batch "
                        "statistics, so the first-order expansion in the weights is not the model trained or "
                        "evaluated; drop the mode (linear fine-tuning is Protocol A's finetune.mode)"
                    )
                raw = {**raw, section: {k: v for k, v in node.items() if k != "mode"}}
                if section == "finetune" and not raw[section]:
                    raw.pop(section)
        return raw

    @model_validator(mode="after")
    def _consistency(self) -> ClassicSuite:
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        from bench.data.classic import NUM_CLASSES

        require_known("dataset", [self.dataset], NUM_CLASSES)
        if self.forget.mode == "class":
            if not self.forget.classes:
                raise ValueError("forget.classes: class-wise forgetting needs at least one class")
            n = NUM_CLASSES[self.dataset]
            bad = [c for c in self.forget.classes if not 0 <= c < n]
            if bad:
                raise ValueError(f"forget.classes: class {bad[0]} does not exist in {self.dataset} (ids 0..{n - 1})")
            if len(set(self.forget.classes)) != len(self.forget.classes):
                raise ValueError("forget.classes: a class is listed twice")
            if len(self.forget.classes) >= n:
                raise ValueError(f"forget.classes: forgetting all {n} classes leaves nothing to retain")
        _check_reference(self.report, self.methods)
        if self.ablation is not None and self.ablation.pools:
            from bench.classic_train import SgdParams

            if self.pool.from_ is not None and any(p.where for p in self.ablation.pools.values()):
                raise ValueError(
                    "ablation.pools: a pool from disk has no hyperparameters to filter; use adversarial pools"
                )
            points = [vars(p) for p in self.pool.points(0)] if self.pool.from_ is None else []
            check_pools(self.ablation.pools, points, {f.name for f in fields(SgdParams)}, " candidates")
        return self


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise BenchError(f"--set {assignment!r}: expected key=value, e.g. --set selection.floor=0.9")
    dotted, value = assignment.split("=", 1)
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BenchError(f"--set {assignment!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise BenchError(f"--set {assignment!r}: the value is not valid YAML ({problem})") from None
    if parts[:-1] == ["selection"] and parts[-1] in ONE_OR_MANY:  # the command line replaces the file's form
        node.pop(ONE_OR_MANY[parts[-1]], None)


# selection's single and list forms of one field: an override of one replaces the other
ONE_OR_MANY = {"floor": "floors", "floors": "floor", "rule": "rules", "rules": "rule"}


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise BenchError(f"config file {path} does not exist")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise BenchError(f"unknown suite {name_or_path!r}; known suites: {known} (or give a .yaml path)")
    return candidate


def load_suite(name_or_path: str, overrides: list[str] | None = None) -> ClipSuite | ClassicSuite:
    path = suite_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: the top level must be a mapping of fields (protocol: ..., name: ...)")
    given = [a.split("=", 1)[0] for a in overrides or []]
    for one, many in (("floor", "floors"), ("rule", "rules")):
        if f"selection.{one}" in given and f"selection.{many}" in given:
            raise BenchError(f"--set selection.{one} and selection.{many}: give one of them, not both")
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    protocol = raw.get("protocol")
    from bench.protocols import PROTOCOLS

    spec = PROTOCOLS.get(protocol) if isinstance(protocol, str) else None
    if spec is None:
        raise BenchError(f"{path}: protocol: expected one of {', '.join(PROTOCOLS)}, got {raw.get('protocol')!r}")
    model = spec.load("suite")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise BenchError(f"{path}: {problems}") from None


def _location(loc: tuple[Any, ...]) -> str:
    """A field path as the user would type it; a key that is not printable text (a newline in a YAML
    key) is quoted, so the error stays one line."""
    parts = [p if not isinstance(p, str) or p.isprintable() else repr(p) for p in loc]
    return ".".join(str(p) for p in parts) or "(top level)"
