"""Suite configs: YAML validated on load. Any unknown key, method, dataset or backbone, empty grid or
out-of-range floor is one clear error naming the field (pydantic does the field paths)."""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import fields
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


class GridCfg(Strict):
    """Candidates = ``base`` updated by every point of the cartesian product of ``grid`` axes."""

    base: dict[str, Any] = {}
    grid: dict[str, list[Any]]

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
        return self

    def points(self, seed: int, dataset_base: dict[str, Any] | None = None) -> list[FinetuneParams]:
        """Grid points; ``dataset_base`` (per-dataset settings, e.g. the paper's epochs) sits between
        ``base`` and the grid axes."""
        axes = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[a] for a in axes)):
            params = {"seed": seed, **self.base, **(dataset_base or {}), **dict(zip(axes, values))}
            out.append(FinetuneParams(**params))
        return out


class PoolFromCfg(Strict):
    """A candidate pool from a sweep already on disk (docs/checkpoints.md): ``from`` is a folder, glob
    or checkpoint list of the fine-tuned candidates, ``theta0`` the model they started from; both may
    hold ``{dataset}`` and ``{seed}``. No fine-tuning runs for the pool."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field(alias="from", min_length=1)
    theta0: str = Field(min_length=1)


class SelectionCfg(Strict):
    lambda_start: float = 0.0
    lambda_stop: float = 1.0
    lambda_step: float = Field(0.05, gt=0)
    floor: float = 0.95

    @field_validator("floor")
    @classmethod
    def _floor_range(cls, v: float) -> float:
        if not (0 < v <= 1):
            raise ValueError(f"floor must be in (0, 1], got {v}")
        return v

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


class AblationCfg(Strict):
    """Pool-size ablation: NegMerge over random subsets of the (cached) pool, N = each size, several draws."""

    sizes: list[int] = []  # empty: 2 .. K
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
    def _at_least_two(cls, sizes: list[int]) -> list[int]:
        small = [n for n in sizes if n < 2]
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
    finetune: GridCfg | None = None  # the candidate pool's fine-tuning grid, or:
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
        return self


class SgdGridCfg(Strict):
    """SGD settings: ``base`` updated by every point of the cartesian product of ``grid`` axes. As the
    pool, ``from`` and ``theta0`` take it from a sweep on disk instead (PoolFromCfg)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
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
        return self

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
    rule: Literal["floor", "avg_gap"] = "floor"
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
    progress: bool = True

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
