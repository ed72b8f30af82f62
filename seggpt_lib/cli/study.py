"""`seggpt study`: command-line arguments -> library call."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from data_prep.study_data import default_data, prepare_study_data
from seggpt_lib.experiments.config import parse_set
from seggpt_lib.experiments.study import run_study, study_dirs, study_settings


ROWS = ("Rows, per protocol (seen classes, held-out classes): each negatives recipe (original, class-aware) "
        "trained from scratch AND, with the same recipe and the same steps, from the shipped pretrained checkpoint "
        "(pretrained/vit_micro_shapes.safetensors: generic shapes, seggpt pretrain; the pretrained rows keep its "
        "vit_micro architecture, the table says so where --set preset differs), each scored with top-1, top-k "
        "ensemble and learned prompts; the shipped checkpoint without any fine-tuning (one-shot in context on defect "
        "classes it never saw); paint nothing. Each row's recipe says 'from scratch' / 'from pretrained' (column "
        "init). Without the shipped checkpoint the study says so in one line and runs the from-scratch rows only "
        "(--set pretrained=null: the same on purpose; pretrained=PATH: another init checkpoint).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = f"{parser.description}. {ROWS}" if parser.description else ROWS
    parser.add_argument("--data", default=None, help="magnetic-tile source folder (MT_<Class>/Imgs); default "
                                                     "../shared/datasets/magnetic_tile beside the repository")
    parser.add_argument("--out", default="results/magnetic_tile", help="results folder (default results/magnetic_tile)")
    parser.add_argument("--work", default=None, help="intermediate data and runs (default OUT/work)")
    parser.add_argument("--quick", action="store_true", help="a sub-minute CPU check: 6 images per class, tiny model "
                                                              "(the pretrained rows: the checkpoint's), 3 steps")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--protocols", default="seen,holdout", help="comma-separated: seen, holdout (default both)")
    parser.add_argument("--holdout-classes", default=None, help="comma-separated defect classes never trained on")
    parser.add_argument("--holdout-n", type=int, default=2, help="else this many, drawn with --seed (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a study setting (StudySettings: preset, model, steps, minutes, eval_every, "
                             "val_pairs, tune_steps, max_queries, top_k, limit_per_class, val, test, "
                             "calibration_objective (max_pes, max_catch_at_yield or null: raw rows only), "
                             "calibration_yield_target, pretrained (\"pretrained\": the shipped checkpoint, the "
                             "default; a path; null: from-scratch rows only), train.<TrainConfig key>). Every model "
                             "(from scratch, from pretrained, pretrained without fine-tuning) and prompt gets a raw "
                             "and a calibrated row (the line's decision chosen on the protocol's validation split "
                             "only): tables/study_<protocol>_decision, summary.json decision_rows")


def study(data: str | None, out: str, *, quick: bool = False, device: str = "auto", protocols=("seen", "holdout"),
          holdout_classes=None, holdout_n: int = 2, seed: int = 0, work_dir: str | None = None,
          overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """``seggpt study``: the settings, the data (converted and split per protocol), the comparison."""
    st = study_settings(quick, overrides, device)
    out_dir, work = study_dirs(out, work_dir)
    prepared = prepare_study_data(data or default_data(), work, limit_per_class=st.limit_per_class, val=st.val,
                                  test=st.test, protocols=protocols, seed=seed, holdout_classes=holdout_classes,
                                  holdout_n=holdout_n, log=log)
    return run_study(prepared, out_dir, st, device=device, seed=seed, quick=quick, log=log)


def run(args: argparse.Namespace) -> int:
    try:
        ov: dict[str, Any] = {}
        for k, v in parse_set(args.set).items():
            if k.startswith("train."):
                ov.setdefault("train", {})[k[len("train."):]] = v
            else:
                ov[k] = v
        study(args.data, args.out, quick=args.quick, device=args.device,
              protocols=[p.strip() for p in args.protocols.split(",") if p.strip()],
              holdout_classes=[c.strip() for c in args.holdout_classes.split(",")] if args.holdout_classes else None,
              holdout_n=args.holdout_n, seed=args.seed, work_dir=args.work, overrides=ov,
              log=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
