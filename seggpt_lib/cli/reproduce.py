"""`seggpt reproduce`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seggpt_lib.experiments.config import NOTEBOOK_PARAMETERS, PRETRAINED_WEIGHTS, PipelineError, load_config, parse_data_spec
from seggpt_lib.experiments.runner import reproduce
from seggpt_lib.utils.outputs import OutputError, check_not_inside


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="pipeline config JSON (default: configs/pipeline.json if present)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; JSON values; train.lr=1e-4 for nested keys)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stages to run (numbers or names; default: all, 1-5; the "
                             "interactive explorer by name); a partial run keeps the other stages' results")
    parser.add_argument("--smoke", action="store_true",
                        help="a one-minute check of the whole pipeline: tiny synthetic set, tiny model, 3 steps "
                             "(applied after --config, before --set)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _resolve_stages(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = list(NOTEBOOK_PARAMETERS)  # the stages in order (number i: the i-th), then the explorer
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit() and 1 <= int(part) <= len(names):
            out.append(names[int(part) - 1])
        elif part in names:
            out.append(part)
        else:
            raise PipelineError(f"unknown stage {part!r}; stages: numbers or {', '.join(names)}")
    return out


def _check_results_dir(cfg: dict) -> None:
    """results_dir is never the data folder or the weights, inside them, or above them
    (:mod:`seggpt_lib.utils.outputs`)."""
    try:
        _, data_path = parse_data_spec(cfg["data"])
    except PipelineError:  # a missing data folder: reported by the stage that reads it
        data_path = ""
    try:
        # weights "pretrained": the shipped checkpoint in the repository's pretrained/, which the
        # runner's source-tree check keeps results out of
        weights = cfg.get("weights") if cfg.get("weights") != PRETRAINED_WEIGHTS else ""
        check_not_inside(cfg["results_dir"], {"data": data_path, "weights": weights}, what="results_dir")
    except OutputError as e:
        raise PipelineError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    try:
        path = args.config
        if path is None and (Path("configs") / "pipeline.json").is_file():
            path = Path("configs") / "pipeline.json"
        cfg = load_config(path, args.set, smoke=args.smoke)
        if args.print_config:
            print(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=2))
            return 0
        stages = _resolve_stages(args.stages)
        _check_results_dir(cfg)

        def log(msg: str) -> None:
            print(msg, flush=True)

        reproduce(cfg, stages=stages, log=log)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
