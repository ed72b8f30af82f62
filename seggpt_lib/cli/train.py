"""`seggpt train`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch.distributed as dist

from seggpt_lib.engine.trainer import NonFiniteLoss, TrainConfig, TrainingInterrupted, parse_set, resume, train
from seggpt_lib.utils.outputs import check_not_inside


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training config JSON (keys: see TrainConfig; a key not given keeps "
                                             "TrainConfig's default, the original project's recipe, e.g. fg_weight 1)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest complete checkpoint (checkpoints/last, else the "
                        "highest step_N); Ctrl-C or SIGTERM during training saves last and exits 130")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop (with a checkpoint) at this step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_log_dir(cfg: TrainConfig) -> None:
    """log_dir (where the run folder goes) is never a training/validation data folder, inside
    one, or above one (:mod:`seggpt_lib.utils.outputs`); raises ValueError (an OutputError)."""
    check_not_inside(cfg.log_dir, {"train_dataset_dir": cfg.train_dataset_dir, "val_dataset_dir": cfg.val_dataset_dir},
                     what="log_dir")


def run(args: argparse.Namespace) -> int:
    try:
        overrides = parse_set(args.set)
        if args.resume:
            result = resume(args.resume, args.stop_at_step, not args.no_progress, overrides)
        else:
            if not args.config:
                print("error: give --config FILE (or --resume RUN_DIR)", file=sys.stderr)
                return 2
            cfg = TrainConfig.from_json(args.config, overrides)
            check_log_dir(cfg)
            result = train(cfg, stop_at_step=args.stop_at_step, progress=not args.no_progress)
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: stopped after a step, checkpoints/last saved
        result = e.result
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        if result.interrupted:
            print(f"{result.interrupted}: stopped at step {result.step}; saved {result.run_dir / 'checkpoints' / 'last'}. "
                  f"Resume with:\n  seggpt train --resume {shlex.quote(str(result.run_dir))}", file=sys.stderr)
        else:
            print(f"run: {result.run_dir}  steps: {result.step}  best val mIoU: {result.best_miou:.4f}")
    return 130 if result.interrupted else 0
