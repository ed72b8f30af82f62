"""The `seggpt` console command.

Each subcommand is one thin module in this package (arguments -> config -> library call) exposing
``add_arguments(parser)`` and ``run(args) -> int``. Register a new subcommand by
adding one line to ``COMMANDS`` below (name -> (module, one-line help)).
Modules are imported only when their subcommand is used, so ``seggpt --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("seggpt_lib.cli.train", "fine-tune SegGPT on defect pairs (single process, or DDP under torchrun)"),
    "pretrain": ("seggpt_lib.cli.pretrain", "pretrain the shipped in-context checkpoint on generic shapes (resumable; make pretrained)"),
    "info": ("seggpt_lib.cli.info", "show presets, parameter counts and the checkpoint formats understood"),
    "prepare": ("data_prep.cli", "build datasets: synthetic, coco, magnetic-tile, split, stats"),
    "make-mapping": ("seggpt_lib.cli.make_mapping", "build prompt mapping JSONs (positive, negative, free, retrieval) from a dataset"),
    "bench": ("seggpt_lib.cli.bench", "benchmark this SegGPT against transformers' SegGptForImageSegmentation"),
    "infer": ("seggpt_lib.cli.infer", "prompted inference over a mapping JSON: masks, overlays, per-image metrics, summary"),
    "calibrate": ("seggpt_lib.cli.calibrate", "choose the line's decision (operating_point.json) on the validation split"),
    "tune-prompt": ("seggpt_lib.cli.tune_prompt", "learn a prompt image+mask for one defect class with SegGPT frozen"),
    "reproduce": ("seggpt_lib.cli.reproduce", "run the notebook pipeline (01-04, 06) with papermill and regenerate results/"),
    "ablate": ("seggpt_lib.cli.ablate", "run an ablation grid (configs/ablations/NAME.json): every cell's notebooks, then mean ± std over seeds"),
    "study": ("seggpt_lib.cli.study", "magnetic-tile study: original vs class-aware negatives, image vs learned prompts, seen and held-out classes"),
}


def parse_triple(text: str, kind: type = float) -> tuple:
    """An ``R,G,B``-style command-line value: three comma-separated numbers."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seggpt",
        description="Fine-tune and evaluate SegGPT for few-shot industrial defect segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
