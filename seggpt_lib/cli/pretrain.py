"""`seggpt pretrain`: build the shapes set, pretrain (resumably) and export the shipped checkpoint.

    seggpt pretrain [--run-dir runs/pretrain] [--steps N] [--set key=value ...] [--export-only]
                    [--no-export] [--out pretrained] [--device cpu|cuda|auto]

``make pretrained`` runs it with the defaults. Interrupted (Ctrl-C, a lost session), the same
command continues from the newest complete checkpoint; when the run reaches its steps the
weights, their SHA-256, the recipe, this command and the curve are written to ``pretrained/``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from data_prep.shapes import generate_shapes
from seggpt_lib.experiments.config import parse_set
from seggpt_lib.experiments.pretrain import PRETRAINED_DIR, PretrainConfig, PretrainedError, export_pretrained, run_pretraining


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/pretrain", help="the training run (resumed when it exists)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {PretrainConfig.steps})")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a PretrainConfig key (images, val_images, preset, batch_size, lr, fg_weight, "
                             "weight_query_defects, init_weights, ...)")
    parser.add_argument("--out", default=str(PRETRAINED_DIR), help="where the exported checkpoint goes (default pretrained/)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--export-only", action="store_true", help="export the run's last checkpoint without training")
    parser.add_argument("--no-export", action="store_true", help="train only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        values = parse_set(args.set)
        if args.steps is not None:
            values["steps"] = args.steps
        cfg = PretrainConfig.from_dict(values)
        run_dir = Path(args.run_dir)
        data = run_dir.parent / f"{run_dir.name}_data"
        command = "seggpt pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["pretrain"] \
            else "seggpt pretrain"
        wall = None
        if not args.export_only:
            spec = {"images": cfg.images, "val_images": cfg.val_images, "size": cfg.image_size, "seed": cfg.data_seed}
            if cfg.class_colours:  # (a key only when set: the random-colour set's stamp stays as it was)
                spec["class_colours"] = True
            stamp = data / "spec.json"
            if not (stamp.is_file() and json.loads(stamp.read_text()) == spec):
                print(f"building the shapes set ({cfg.images} + {cfg.val_images} images) in {data}", flush=True)
                generate_shapes(data / "train", n_images=cfg.images, seed=cfg.data_seed, size=cfg.image_size,
                                overwrite=True, show_progress=not args.quiet, class_colours=cfg.class_colours)
                generate_shapes(data / "val", n_images=cfg.val_images, seed=cfg.data_seed + 1_000_003,
                                size=cfg.image_size, overwrite=True, show_progress=not args.quiet,
                                class_colours=cfg.class_colours)
                stamp.write_text(json.dumps(spec) + "\n")
            res = run_pretraining(cfg, data / "train", data / "val", run_dir, device=args.device,
                                  progress=not args.quiet, log=lambda m: print(m, flush=True))
            wall = res["wall_s"]
            print(f"pretraining: step {res['steps']} of {cfg.steps} ({wall / 60:.1f} min this call)", flush=True)
            if res["interrupted"] or res["steps"] < cfg.steps:
                print("not finished: run the same command again to continue", flush=True)
                return 0 if res["interrupted"] else 1
        if not args.no_export:
            info = export_pretrained(run_dir, cfg, command, args.out, wall_s=wall)
            print(f"exported {Path(args.out) / info['file']} ({info['bytes'] / 1e6:.1f} MB, step {info['steps']}, "
                  f"sha256 {info['sha256'][:16]}...)", flush=True)
    except (ValueError, FileNotFoundError, OSError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
