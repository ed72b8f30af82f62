"""`seggpt train`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from seggpt_lib.engine.trainer import NonFiniteLoss, TrainConfig, parse_set, resume, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training config JSON (keys: see TrainConfig; a key not given keeps "
                                             "TrainConfig's default, the original project's recipe, e.g. fg_weight 1)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        overrides = parse_set(args.set)
        if args.resume:
            result = resume(args.resume, args.stop_at_step, not args.no_progress, overrides)
        else:
            if not args.config:
                print("error: give --config FILE (or --resume RUN_DIR)", file=sys.stderr)
                return 2
            d = json.loads(Path(args.config).read_text()) if Path(args.config).is_file() else None
            if d is None:
                raise FileNotFoundError(f"training config not found: {args.config}")
            d.update(overrides)
            cfg = TrainConfig.from_dict(d, source=args.config)
            result = train(cfg, stop_at_step=args.stop_at_step, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run: {result.run_dir}  steps: {result.step}  best val mIoU: {result.best_miou:.4f}")
    return 0
