"""`seggpt train`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

import torch.distributed as dist

from seggpt_lib.engine.trainer import (
    CollapseWarning,
    NonFiniteLoss,
    TrainConfig,
    TrainingInterrupted,
    parse_set,
    resume,
    train,
)
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


def _show_collapse(message, category, filename, lineno, file=None, line=None) -> None:
    """A CollapseWarning in capitals, on a line of its own (other warnings as Python shows them)."""
    if issubclass(category, CollapseWarning):
        print(f"\n!!! WARNING: {message}\n", file=sys.stderr, flush=True)
    else:
        _plain_showwarning(message, category, filename, lineno, file, line)


_plain_showwarning = warnings.showwarning


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("always", CollapseWarning)  # every validation with a collapse is said
        warnings.showwarning = _show_collapse
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
            b = result.best_val
            best = (f"best (by val {result.select_by}, step {result.best_step}): val PES {float(b.get('val_pes', 'nan')):.4f} "
                    f"catch {float(b.get('val_catch', 'nan')):.3f} yield {float(b.get('val_yield_neg', 'nan')):.3f} "
                    f"mIoU {result.best_miou:.4f}" if result.best_step is not None else "no validation")
            print(f"run: {result.run_dir}  steps: {result.step}  fg_weight: {result.fg_weight:.3g}  {best}")
        if result.collapse:
            what = result.collapse.upper()
            print(f"\n!!! WARNING: COLLAPSE: at its last validation the model paints {what} (validation steps with a "
                  f"collapse: {', '.join(map(str, result.collapse_steps))}); every figure equals the paint-"
                  f"{result.collapse} baseline. metrics.csv: column collapse.\n", file=sys.stderr)
    return 130 if result.interrupted else 0
