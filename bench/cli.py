"""``negmerge-bench`` / ``python -m bench``: run suites and list what is available."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.errors import BenchError


def cache_dir() -> Path:
    from bench.data.offline import negmerge_home

    return Path(os.environ.get("NEGMERGE_CACHE", negmerge_home() / "cache"))


def cmd_run(args: argparse.Namespace) -> int:
    if os.environ.get("NEGMERGE_ALLOW_DOWNLOAD") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast on missing weights, no network timeouts
    from bench.config import ClipSuite, load_suite
    from bench.results import summary_table

    cfg = load_suite(args.suite, args.set)
    out = Path(args.out or Path("runs") / cfg.name)
    print(f"[negmerge-bench] suite {cfg.name} -> {out} (cache {cache_dir()})", file=sys.stderr)
    if isinstance(cfg, ClipSuite):
        from bench.protocol_clip import ClipRun

        rec = ClipRun(cfg, out, cache_dir()).run()
    else:
        from bench.protocol_classic import ClassicRun

        rec = ClassicRun(cfg, out, cache_dir()).run()
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(summary_table(rec.table()).to_string())
    for note in rec.notes:
        print(f"note: {note}")
    print(f"wrote {out / 'results.csv'}, {out / 'curves.csv'}, {out / 'manifest.json'}", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "suites":
        from bench.config import SUITES_DIR, load_suite

        for path in sorted(SUITES_DIR.glob("*.yaml")):
            print(f"{path.stem:20s} {load_suite(str(path)).description}")
    elif args.what == "methods":
        from baselines import MERGES
        from bench.config import CLIP_METHODS

        print("clip protocol:", ", ".join(CLIP_METHODS))
        print("merges:", ", ".join(sorted(MERGES)))
    elif args.what == "datasets":
        from bench.data import DATASETS

        for spec in DATASETS.values():
            print(f"{spec.name:16s} {spec.kind:15s} {spec.description}")
    elif args.what == "backbones":
        from bench.backbones import list_backbones

        print("\n".join(list_backbones()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="negmerge-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite (name or YAML path)")
    run.add_argument("suite")
    run.add_argument("--out", help="output folder (default runs/SUITE)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    run.set_defaults(fn=cmd_run)
    lst = sub.add_parser("list", help="list suites, methods, datasets or backbones")
    lst.add_argument("what", choices=["suites", "methods", "datasets", "backbones"])
    lst.set_defaults(fn=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
