"""`seggpt ablate`: command-line arguments -> library call (:mod:`seggpt_lib.experiments.ablate`)."""
from __future__ import annotations

import argparse
import sys

from seggpt_lib.experiments.ablate import EXECUTORS, AblationError, is_finished, plan, run_ablation
from seggpt_lib.experiments.config import PipelineError, parse_data_spec
from seggpt_lib.utils.outputs import OutputError, check_not_inside


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="ablation grid JSON (configs/ablations/NAME.json): base config, grid and/or variants, "
                             "seeds, notebooks, budgets, executor")
    parser.add_argument("--quick", action="store_true",
                        help="the file's quick variant (its \"quick\" keys replace the file's): a short check, "
                             "into results/ablations/NAME_quick")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a key of the base pipeline config of every cell (JSON values; train.lr=... "
                             "for nested keys; results_dir=... moves the ablation's folder)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where cells run (default: the file's, else local)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="local executor: cells at a time, each with its share of the cores (default: the file's, "
                             "else 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per cell (default: cores/jobs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the grid and list its cells (finished or not); run nothing")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run no cell: rewrite the aggregate (index.html, tables, figures) from the finished ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the log lines stay)")


def run(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        ab = plan(args.config, quick=args.quick, overrides=args.set,
                  executor={"kind": args.executor, "jobs": args.jobs, "threads": args.threads})
        base = ab.cells[0].config if ab.cells else {}
        try:
            _, data_path = parse_data_spec(base.get("data", "synthetic"))
        except PipelineError:
            data_path = ""
        try:
            check_not_inside(ab.root, {"data": data_path, "weights": base.get("weights")}, what="ablation folder")
        except OutputError as e:
            raise AblationError(str(e)) from None
        if args.dry_run:
            done = sum(is_finished(c) for c in ab.cells)
            log(f"{ab.name}: {len(ab.cells)} cells ({done} finished) -> {ab.root}")
            for c in ab.cells:
                log(f"  {'done   ' if is_finished(c) else 'to run '} {c.name}")
            return 0
        res = run_ablation(ab, log=log, progress=not args.no_progress, aggregate_only=args.aggregate_only)
    except PipelineError as e:  # AblationError included
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if res.failed else 0
