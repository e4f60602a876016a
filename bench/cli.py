"""``negmerge-bench`` / ``python -m bench``: run suites and list what is available."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from bench.cluster import EXECUTORS
from bench.errors import BenchError
from bench.tracking import TRACKERS


def cache_dir() -> Path:
    from bench.data.offline import negmerge_home

    return Path(os.environ.get("NEGMERGE_CACHE", negmerge_home() / "cache"))


def cmd_run(args: argparse.Namespace) -> int:
    if os.environ.get("NEGMERGE_ALLOW_DOWNLOAD") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast on missing weights, no network timeouts
    from bench.config import load_suite
    from bench.runner import run_suite

    cfg = load_suite(args.suite, _runtime_overrides(args))  # validated here, before anything is submitted
    out = Path(args.out or Path("runs") / cfg.name)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out: {out} is a file; give a folder for the run's outputs")
    trackers = _start_trackers(cfg, out)
    if args.executor and not _run_on_cluster(args, cfg, out):
        return 0  # submitted with --no-wait
    print(f"[negmerge-bench] suite {cfg.name} -> {out} (cache {cache_dir()})", file=sys.stderr)
    rec = run_suite(cfg, out, cache_dir())
    print(f"wrote {out / 'results.csv'}, {out / 'curves.csv'}, {out / 'manifest.json'}", file=sys.stderr)
    if not args.no_report:
        from bench.report import build_report

        build_report(out)
        print((out / "report" / "summary.md").read_text())
    else:
        for note in rec.notes:
            print(f"note: {note}")
    _log_to_trackers(trackers, out)
    return 0


def _start_trackers(cfg, out: Path) -> list:
    """The suite's trackers that can log (one warning line for each that cannot); checked at start-up."""
    if not cfg.tracking:
        return []
    from bench.tracking import settings_for, start_trackers

    return start_trackers(cfg.tracking, settings_for(cfg, out))


def _log_to_trackers(trackers: list, out: Path) -> None:
    """Once, from the finished run's files (a cluster run: from its assembly, here)."""
    from bench.tracking import log_run

    for where in log_run(trackers, out):
        print(f"[negmerge-bench] tracked: {where}", file=sys.stderr)


def cmd_track(args: argparse.Namespace) -> int:
    """Log a finished run folder to trackers (again): its config's tracking fields, or the flags."""
    import json

    from bench.config import TrackingFields

    run_dir = Path(args.run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        raise BenchError(f"{run_dir}: no manifest.json; `track` logs a finished run folder")
    saved = json.loads(manifest.read_text()).get("config", {})
    fields = {k: saved[k] for k in TrackingFields.model_fields if k in saved}
    if args.track:
        fields["tracking"] = args.track
    for flag in ("tracking_dir", "tracking_uri", "tracking_project"):
        if getattr(args, flag):
            fields[flag] = getattr(args, flag)
    cfg = TrackingFields.model_validate(fields)
    if not cfg.tracking:
        raise BenchError(f"{run_dir}: its config names no tracker; give --track wandb|mlflow|tensorboard")
    trackers = _start_trackers(cfg, run_dir)
    _log_to_trackers(trackers, run_dir)
    return 0 if len(trackers) == len(set(cfg.tracking)) else 1


def _runtime_overrides(args: argparse.Namespace) -> list[str]:
    """--device / --precision / --jobs as the config overrides they are (after --set: the flags win)."""
    extra = [f"device={args.device}"] if getattr(args, "device", None) else []
    extra += [f"precision={args.precision}"] if getattr(args, "precision", None) else []
    extra += [f"jobs={args.jobs}"] if getattr(args, "jobs", None) else []
    extra += [f"tracking=[{','.join(args.track)}]"] if getattr(args, "track", None) else []
    args.set = [*args.set, *extra]  # cluster jobs get the same overrides
    return args.set


def cmd_plan(args: argparse.Namespace) -> int:
    from bench.config import load_suite
    from bench.plan import make_plan

    cfg = load_suite(args.suite, _runtime_overrides(args))
    print(make_plan(cfg, args.images_per_second, args.measure))
    return 0


def _run_on_cluster(args: argparse.Namespace, cfg, out: Path) -> bool:
    """Fill the shared cache with one job per work unit; True when the local assembly should follow."""
    from bench.cluster import ClusterOptions, submit_units
    from bench.units import describe_plan, plan_units

    opts = ClusterOptions(
        executor=args.executor,
        partition=args.partition,
        timeout_min=args.timeout_min,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        array_parallelism=args.array_parallelism,
        units_per_job=args.units_per_job,
    )
    phases = plan_units(cfg)
    print(f"[negmerge-bench] {describe_plan(phases)}", file=sys.stderr)
    jobs = submit_units(args.suite, args.set, phases, out, cache_dir(), opts, wait=not args.no_wait)
    print(f"[negmerge-bench] {len(jobs)} jobs; logs in {out}/cluster-logs", file=sys.stderr)
    if args.no_wait:
        print(
            f"follow with `negmerge-bench status {out}`; when done, assemble with the same command without --executor"
        )
        return False
    print("[negmerge-bench] every unit finished; assembling from the cache", file=sys.stderr)
    return True


def cmd_status(args: argparse.Namespace) -> int:
    """A run folder: each unit's state and log. A suite: the units a cluster run would submit."""
    import pandas as pd

    from bench.cluster import unit_status

    target = Path(args.run_or_suite)
    if not (target / "units" / "plan.json").is_file():
        from bench.config import load_suite
        from bench.units import describe_plan, plan_units

        if target.is_dir():
            raise BenchError(f"{target}: no units/plan.json; status reads a run submitted with --executor, or a suite")
        cfg = load_suite(args.run_or_suite, args.set)
        print(f"{cfg.name}: work units of a cluster run (one job each with --units-per-job 1)")
        print(describe_plan(plan_units(cfg)))
        return 0
    rows = pd.DataFrame(unit_status(target))
    counts = rows.state.value_counts()
    print(", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "running", "failed", "killed", "missing")))
    shown = rows if args.all else rows[rows.state != "done"]
    if not shown.empty:
        print(shown.to_markdown(index=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from bench.report import build_report

    start = time.perf_counter()
    written = build_report(Path(args.run_dir))
    print(f"wrote {len(written)} files to {Path(args.run_dir) / 'report'} in {time.perf_counter() - start:.1f} s")
    print((Path(args.run_dir) / "report" / "summary.md").read_text())
    return 0


def cmd_regress(args: argparse.Namespace) -> int:
    from bench.regress import compare, is_regression

    table = compare(Path(args.run_dir), Path(args.against), abs_tol=args.abs_tol, sigmas=args.sigmas)
    moved = table if args.all else table[table.status != "ok"]
    if moved.empty:
        print(f"no metric moved beyond tolerance ({len(table)} checked)")
    else:
        print(moved.round(2).to_markdown(index=False))
    if is_regression(table):
        print("REGRESSION: unlearning got worse beyond tolerance")
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "suites":
        from bench.config import SUITES_DIR, load_suite

        for path in sorted(SUITES_DIR.glob("*.yaml")):
            print(f"{path.stem:20s} {load_suite(str(path)).description}")
    elif args.what == "methods":
        from baselines import all_methods
        from bench.protocols import PROTOCOLS, offered_methods

        for method in all_methods():
            where = ", ".join(p for p in PROTOCOLS if method.name in offered_methods(p))
            params = ", ".join(method.parameters()) or "-"
            print(f"{method.name:12s} {method.kind:10s} {method.plain:16s} protocols: {where:14s} params: {params}")
    elif args.what == "datasets":
        from bench.data import DATASETS

        for spec in DATASETS.values():
            print(f"{spec.name:16s} {spec.kind:15s} {spec.description}")
    elif args.what == "backbones":
        from bench.backbones import list_backbones

        print("\n".join(list_backbones()))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from bench.checkpoints.merge import MergeRequest, run_merge

    out = Path(args.out) if args.out else None
    if args.recipe:
        from bench.checkpoints.recipe import load_recipe

        given = [f for f in ("base", "candidates", "method", "lam") if getattr(args, f) not in (None, [])]
        if given or args.set or args.vector_only or args.include or args.exclude:
            raise BenchError("--recipe holds the whole merge; give only --out / --overwrite beside it")
        request = load_recipe(Path(args.recipe), out, args.overwrite)
    else:
        missing = [f"--{f}" for f in ("base", "candidates", "method", "out") if not getattr(args, f)]
        if missing:
            raise BenchError(f"merge needs {', '.join(missing)} (or --recipe r.yaml)")
        request = MergeRequest(
            base=Path(args.base),
            candidates=list(args.candidates),
            method=args.method,
            out=out,
            params=_key_values(args.set, "--set"),
            lam=args.lam,
            vector_only=args.vector_only,
            include=list(args.include),
            exclude=list(args.exclude),
            overwrite=args.overwrite,
        )
    request.hash_inputs = not args.no_hash
    record = run_merge(request, log=lambda m: print(m, file=sys.stderr))
    rate = record["consensus_rate"]["overall"]
    print(
        f"wrote {request.out} ({record['method']}, {len(record['candidates'])} candidates, kept {rate:.2%} of elements)"
    )
    return 0


def _key_values(items: list[str], flag: str) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} threshold=0.8")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    from bench.checkpoints.unpickle import convert_checkpoint

    prefixes = convert_checkpoint(Path(args.checkpoint), Path(args.out), args.strip_prefix, args.overwrite)
    print(f"wrote {args.out}; key prefixes:")
    for prefix, count in prefixes:
        print(f"  {prefix}  ({count} tensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="negmerge-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite (name or YAML path)")
    run.add_argument("suite")
    run.add_argument("--out", help="output folder (default runs/SUITE)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    run.add_argument("--no-report", action="store_true", help="skip writing DIR/report (tables, figures)")
    _runtime_flags(run)
    run.add_argument(
        "--track",
        action="append",
        choices=TRACKERS,
        metavar="NAME",
        help="log the finished run to wandb (offline), mlflow or tensorboard (repeatable; replaces the suite's "
        "`tracking` list); stores in `tracking/` beside the run folder unless --set tracking_dir=/tracking_uri=",
    )
    cluster = run.add_argument_group("cluster (submitit): one job per work unit, then assembly from the shared cache")
    cluster.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="run the suite's work units (fine-tunes, trained models, sweeps; `status SUITE` lists them) as jobs: "
        "slurm (job arrays, one per phase), local (subprocesses here) or debug (in this process)",
    )
    cluster.add_argument("--partition", help="SLURM partition")
    cluster.add_argument("--timeout-min", type=int, default=240, help="per-job time limit (default 240)")
    cluster.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per job (default: 1 on SLURM, 0 for local/debug)"
    )
    cluster.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per job (default 8)")
    cluster.add_argument("--mem-gb", type=float, help="memory per job in GB")
    cluster.add_argument("--array-parallelism", type=int, help="at most this many jobs of an array at once")
    cluster.add_argument("--units-per-job", type=int, default=1, help="pack several small units into one job")
    cluster.add_argument("--no-wait", action="store_true", help="submit and return (SLURM); assemble later")
    run.set_defaults(fn=cmd_run)
    tr = sub.add_parser("track", help="log a finished run folder to experiment trackers (wandb, mlflow, tensorboard)")
    tr.add_argument("run_dir")
    tr.add_argument("--track", action="append", choices=TRACKERS, metavar="NAME", help="tracker (repeatable)")
    tr.add_argument("--tracking-dir", help="local stores (default: tracking/ beside the run folder)")
    tr.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the tracking dir)")
    tr.add_argument("--tracking-project", help="W&B project and MLflow experiment")
    tr.set_defaults(fn=cmd_track)
    rep = sub.add_parser("report", help="LaTeX tables, figures and a summary from a run's files")
    rep.add_argument("run_dir")
    rep.set_defaults(fn=cmd_report)
    reg = sub.add_parser("regress", help="compare a run with reference results; exit 1 on regression")
    reg.add_argument("run_dir")
    reg.add_argument("--against", required=True, help="reference run folder, e.g. results/mini-clip")
    reg.add_argument(
        "--abs-tol", type=float, default=None, help="minimum tolerance in points for every metric (default: per metric)"
    )
    reg.add_argument("--sigmas", type=float, default=3.0, help="tolerance in units of seed noise (default 3)")
    reg.add_argument("--all", action="store_true", help="print every checked metric, not only those that moved")
    reg.set_defaults(fn=cmd_regress)
    pl = sub.add_parser("plan", help="the work a suite implies, its FLOPs and an estimated time, before running it")
    pl.add_argument("suite")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pl.add_argument("--images-per-second", type=float, help="forward images/s of your device (training: a third)")
    pl.add_argument("--measure", action="store_true", help="measure eval and train images/s on this machine's device")
    _runtime_flags(pl)
    pl.set_defaults(fn=cmd_plan)
    ca = sub.add_parser("cache", help="the cache ($NEGMERGE_CACHE): verify [--repair] | gc --keep RUN_DIR...")
    ca.add_argument("action", choices=["verify", "gc"])
    ca.add_argument("--repair", action="store_true", help="verify: move damaged entries to CACHE/quarantine")
    ca.add_argument("--keep", nargs="+", default=[], metavar="RUN_DIR", help="gc: the runs whose entries stay")
    ca.add_argument("--dry-run", action="store_true", help="gc: say what would go, remove nothing")
    ca.set_defaults(fn=cmd_cache)
    st = sub.add_parser("status", help="a cluster run's units (done/running/failed/missing), or a suite's job layout")
    st.add_argument("run_or_suite")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a suite field")
    st.add_argument("--all", action="store_true", help="list finished units too")
    st.set_defaults(fn=cmd_status)
    mg = sub.add_parser("merge", help="merge checkpoints you already have (safetensors, HF folders, state dicts)")
    mg.add_argument("--base", help="theta_0: a checkpoint file or Hugging Face folder")
    mg.add_argument("--candidates", nargs="+", default=[], help="fine-tuned checkpoints, folders of them, or globs")
    mg.add_argument("--method", help="a registered merge: negmerge, ties, magmax, average, ...")
    mg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a merge parameter")
    lam = mg.add_mutually_exclusive_group()
    lam.add_argument("--lam", type=float, help="write theta_0 - LAM * merged")
    lam.add_argument("--vector-only", action="store_true", help="write the merged task vector instead")
    mg.add_argument("--include", nargs="+", default=[], metavar="GLOB", help="merge only keys matching these")
    mg.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="keep these keys at theta_0")
    mg.add_argument("--recipe", help="a mergekit-style YAML recipe instead of the flags above")
    mg.add_argument("--out", help="output .safetensors file (single-file base) or folder (Hugging Face base)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    mg.add_argument("--no-hash", action="store_true", help="skip the inputs' sha256 in the sidecar (sizes only)")
    mg.set_defaults(fn=cmd_merge)
    cv = sub.add_parser("convert", help="import a pickled model or state dict to safetensors, running none of its code")
    cv.add_argument("checkpoint")
    cv.add_argument("out")
    cv.add_argument("--strip-prefix", default="", help="drop this prefix from every key (e.g. model.)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    cv.set_defaults(fn=cmd_convert)
    lst = sub.add_parser("list", help="list suites, methods, datasets or backbones")
    lst.add_argument("what", choices=["suites", "methods", "datasets", "backbones"])
    lst.set_defaults(fn=cmd_list)
    return parser


def cmd_cache(args: argparse.Namespace) -> int:
    """verify: check every entry (content hashes included); --repair quarantines the damaged ones.
    gc: remove the entries none of the ``--keep`` runs uses (``bench.gc``)."""
    from bench.integrity import verify_cache

    root = cache_dir()
    if not root.is_dir():
        raise BenchError(f"cache {root} does not exist (set NEGMERGE_CACHE to the cache to check)")
    if args.action == "gc":
        return _cache_gc(root, args)
    checked, problems = verify_cache(root, repair=args.repair)
    for p in problems:
        print(f"damaged: {p['entry']}: {p['problem']}")
    action = "moved to quarantine; the next run recomputes them" if args.repair else "rerun with --repair"
    print(f"{checked} entries checked in {root}: {len(problems)} damaged" + (f" ({action})" if problems else ""))
    return 1 if problems and not args.repair else 0


def _cache_gc(root: Path, args: argparse.Namespace) -> int:
    from bench.gc import collect_garbage

    if not args.keep:
        raise BenchError("cache gc: name the runs to keep with --keep RUN_DIR ... (everything else goes)")
    removed, freed = collect_garbage(root, [Path(r) for r in args.keep], dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} entries ({freed / 1e6:.1f} MB) that none of {len(args.keep)} kept runs uses")
    return 0


def _runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision of forward passes")
    parser.add_argument("--jobs", help="work run at once here: auto (one per `threads` cores on a CPU) or N")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: everything finished so far is cached; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: no space left writing {exc.filename or 'the cache or run folder'} ({exc.strerror}); nothing "
            "half-written was kept: free space (or move NEGMERGE_CACHE / --out) and rerun to resume",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
