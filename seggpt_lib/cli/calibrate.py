"""``seggpt calibrate``: choose the line's decision (operating point) on the VALIDATION split.

::

    seggpt calibrate --weights run/checkpoints/best/model.safetensors --data data/split \\
        --grid 2 --top-k 1 --work-size 256 --tile-pairing aligned \\
        --objective max_catch_at_yield --yield-target 0.6

Reads ``--data SPLIT/val`` only (or the dataset folder ``--val DIR``): positive, negative and
defect-free pairs with queries and prompts from that folder, predicted once; then sweeps the
decision's parameters (:mod:`seggpt_lib.eval.calibration`) and writes ``operating_point.json``
beside the weights (``--out``; an existing file is refused without ``--overwrite``), which
``seggpt infer`` then uses (``--operating-point``). Prints the chosen point and the
validation figures raw vs calibrated. Predict with the settings you will infer with.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seggpt_lib.data.layout import DatasetError
from seggpt_lib.eval.calibration import OBJECTIVES, CalibrationGrid, calibrate, catch_yield_curve, collect_pairs
from seggpt_lib.eval.decision import IMAGE_SCORES, operating_point_beside, save_operating_point
from seggpt_lib.eval.scoring import ScoringConfig
from seggpt_lib.model.checkpoint import CheckpointError
from seggpt_lib.predict.predictor import TILE_PAIRINGS, SegGPTPredictor
from seggpt_lib.utils.device import PRECISIONS, resolve_device, resolve_precision
from seggpt_lib.utils.outputs import OutputError, output_file

__all__ = ["add_arguments", "run"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--weights", required=True, metavar="PATH", help="checkpoint (safetensors, official .pth, HF folder)")
    g.add_argument("--preset", help="architecture preset when the checkpoint does not record it")
    g.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS + ("auto",))
    g.add_argument("--max-batch", type=int, default=8, metavar="N", help="pairs per forward pass (default 8)")
    g = parser.add_argument_group("data (validation only)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="SPLIT_ROOT", help="a split root: SPLIT_ROOT/val is used, nothing else")
    src.add_argument("--val", metavar="DIR", help="the validation dataset folder itself")
    g.add_argument("--k", type=int, default=1, help="prompts per pair (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the validation mappings (default 0)")
    g = parser.add_argument_group("procedure (as you will infer)")
    g.add_argument("--grid", type=int, default=1, metavar="N", help="N x N tiles of the work canvas (default 1)")
    g.add_argument("--work-size", type=int, default=1024, metavar="PX", help="work canvas side for grid > 1 (default 1024)")
    g.add_argument("--tile-pairing", default="all", choices=TILE_PAIRINGS)
    g = parser.add_argument_group("sweep")
    g.add_argument("--objective", default="max_pes", choices=OBJECTIVES)
    g.add_argument("--yield-target", type=float, default=0.6, help="negative yield to reach (max_catch_at_yield; default 0.6)")
    g.add_argument("--free-yield-target", type=float, default=None, help="defect-free yield to reach (default: --yield-target)")
    g.add_argument("--pixel-thresholds", type=_floats, default=CalibrationGrid.pixel_thresholds, metavar="A,B,...")
    g.add_argument("--min-areas", type=_floats, default=CalibrationGrid.min_areas, metavar="A,B,...")
    g.add_argument("--image-scores", default=",".join(CalibrationGrid.image_scores),
                   help=f"comma-separated, of {', '.join(IMAGE_SCORES)}")
    g.add_argument("--image-thresholds", type=int, default=CalibrationGrid.n_image_thresholds, metavar="N",
                   help="image-threshold candidates (quantiles of the observed scores)")
    g.add_argument("--no-consistency", action="store_true", help="do not sweep the prompt-consistency threshold")
    g.add_argument("--min-class-pairs", type=int, default=20, metavar="N",
                   help="a prompt class gets its own point with N positive and N negative/free pairs (default 20)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", metavar="JSON", help="default: operating_point.json beside the weights")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.add_argument("--no-progress", action="store_true")


def _val_dir(args: argparse.Namespace) -> Path:
    d = Path(args.data) / "val" if args.data else Path(args.val)
    if not d.is_dir():
        raise FileNotFoundError(f"validation folder not found: {d}")
    return d


def _line(name: str, f: dict) -> str:
    def fmt(x):
        return "–" if x is None or x != x else f"{x:.3f}"
    return (f"{name:<12} catch {fmt(f['catch_rate'])}  yield {fmt(f['yield_rate'])}  "
            f"free yield {fmt(f['free_yield_rate'])}  PES {fmt(f['pes'])}")


def calibrate_command(args: argparse.Namespace) -> dict:
    val = _val_dir(args)
    out = Path(args.out) if args.out else operating_point_beside(args.weights)
    inputs = {"--weights": args.weights, "--data/--val": val}
    scores = tuple(s.strip() for s in args.image_scores.split(",") if s.strip())
    grid = CalibrationGrid(tuple(args.pixel_thresholds), tuple(int(v) for v in args.min_areas), scores,
                           args.image_thresholds, () if args.no_consistency else CalibrationGrid.consistency_quantiles)
    with output_file(out, inputs, what="--out", overwrite=args.overwrite) as tmp:
        device = resolve_device(args.device)
        predictor = SegGPTPredictor.from_checkpoint(args.weights, preset=args.preset, device=device,
                                                    precision=resolve_precision(args.precision, device),
                                                    max_batch=args.max_batch)
        cfg = ScoringConfig(grid=args.grid, top_k=args.k, work_size=args.work_size, tile_pairing=args.tile_pairing)
        pairs = collect_pairs(predictor, val, cfg, k=args.k, seed=args.seed,
                              progress=not args.no_progress and sys.stderr.isatty())
        settings = {"val_dir": str(val), "weights": str(args.weights), "grid": args.grid, "top_k": args.k,
                    "work_size": args.work_size, "tile_pairing": args.tile_pairing, "seed": args.seed,
                    "defect_color": list(predictor.defect_color)}
        point = calibrate(pairs, args.objective, args.yield_target, args.free_yield_target, grid,
                          args.min_class_pairs, settings=settings)
        curve = catch_yield_curve(pairs, point.default)
        point.validation["auc_negative"] = curve["auc_negative"]
        point.validation["auc_free"] = curve["auc_free"]
        save_operating_point(point, tmp)
    v = point.validation
    print(f"validation: {val} ({v['n_pairs']} pairs)")
    print(f"objective {point.objective}" + (f", yield target {point.yield_target}" if point.yield_target is not None else ""))
    print("chosen point: " + json.dumps(point.default.to_dict()) + ("" if v["sweep"]["feasible"] else "  (targets not reached)"))
    for cls, c in point.per_class.items():
        print(f"  class {cls}: " + json.dumps(c.to_dict()))
    print(_line("raw", v["raw"]))
    print(_line("calibrated", v["calibrated"]))
    print(f"written: {out}")
    return point.to_dict()


def run(args: argparse.Namespace) -> int:
    try:
        calibrate_command(args)
    except (OutputError, DatasetError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
