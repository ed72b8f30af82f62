"""``seggpt infer``: prompted inference over a mapping JSON, with masks, overlays and metrics.

::

    seggpt infer --weights W.safetensors --mapping positive.json \\
        --prompt-img-dir DATA/images --prompt-label-dir DATA/labels --dataset-dir DATA \\
        --top-k 1 --grid 2 --outdir runs/pos_grid2

Inputs: the mapping ``{query_file: [prompt_file, ...]}`` (the original's format); queries are
``DATASET/images/<file>`` (or ``DATASET/<file>``) with optional ground truth
``DATASET/labels/<stem>.png``; prompts are ``PROMPT_IMG_DIR/<file>`` with their masks
``PROMPT_LABEL_DIR/<stem>.png`` (binary, the image's size).

Outputs in ``--outdir`` (the rule of :mod:`seggpt_lib.utils.outputs`: refused when it is, lies inside
or contains an input (``--dataset-dir``, the prompt folders, the mapping, the weights, the learned
prompt; symlinks resolved), and when it exists and is not empty, unless ``--overwrite``, which
replaces only the files listed here, other files in the folder stay). They are built in a hidden
sibling folder and moved into ``--outdir`` only when the run succeeded: a failed run leaves no
output (and, with ``--overwrite``, the previous outputs as they were):

* ``color/<stem>.png``: the mask written, at the query's resolution, in the palette: the
  prediction snapped to it (raw masks), or the decision's mask in the defect colour on black;
* ``label/<stem>.png``: the binary mask written, 0/255 (the decision's: all 0 = pass);
* ``concat/<stem>.png``: input | ground truth (green) | the mask written (red), side by side;
* ``per_image.csv``: one row per mapping entry (file, class, kind, prompts, iou, catch,
  response_rate, yield, pixel counts, gt_missing, n_prompts, seconds; these are the raw
  masks' figures); with an operating point also the decision's: ``calibrated_*`` (its mask's
  IoU, catch, response rate, yield, pixels), ``image_score`` (the value compared with the
  image threshold), ``image_score_kind``, ``verdict`` (``pass`` or ``defect``) and ``mask``
  (which mask was written: ``calibrated`` or ``raw``);
* ``summary.json``: :func:`seggpt_lib.eval.metrics.evaluate`'s summary (``miou``, ``catch_rate``,
  ``yield_rate``, ``pes``, counts, thresholds, baselines; ``calibrated`` with an operating
  point) plus ``masks`` (``calibrated`` or ``raw``), ``decision`` (the operating point's file,
  its default decision, ``n_defect`` / ``n_pass``), ``settings`` and ``timing``;
* ``results.txt``: the original's text report, one line per image (IoU, response rate, and
  the verdict with an operating point), then the means and rates.

Which masks are written: with an operating point (``operating_point.json`` beside the weights,
written by ``seggpt calibrate`` or notebook 04, or ``--operating-point FILE``) the line's
decision's (:mod:`seggpt_lib.eval.decision`: pixel threshold, min area, image score; an empty
mask = pass); ``--raw-masks`` writes the raw snapped masks instead (the decision is still
scored and reported); without an operating point (none found, or ``--operating-point none``)
the raw snapped masks. The run says which on start.

A learned prompt (``--learned-prompt FILE.safetensors``, from ``seggpt tune-prompt``) replaces
the mapping's image prompts: every query is predicted from it (``--top-k`` does not apply), the
mapping may then list the queries only (a JSON list ``["q1.png", ...]``, or an object whose
prompt lists are ignored), ``--prompt-img-dir`` / ``--prompt-label-dir`` are not needed, the
normalisation and defect colour come from the prompt file (an explicit ``--mean``, ``--std``
or ``--defect-color`` must match it), and the prompt class for ``--kind auto`` is the
prompt's class.

Pair kinds (``--kind``): ``positive`` (catch is scored), ``negative`` / ``free`` (yield is
scored), or ``auto``: a query of class ``free`` or with an empty ground truth is ``free``; a
query whose class differs from every prompt's class is ``negative``; otherwise ``positive``.
Classes come from ``classes.csv`` (query dataset; prompt dataset root) or the file-name prefix.

All input problems are reported before any work starts, each kind in one message listing every
file: missing query / prompt images or prompt masks, non-binary or wrong-size prompt masks,
ground truths of the wrong size. Exit code 2 with ``error: ...`` on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seggpt_lib.cli import parse_triple as _triple
from seggpt_lib.data.layout import DatasetError, class_lookup, header_size, image_dir
from seggpt_lib.engine.prompt_tuning import LearnedPromptError, load_learned_prompt, predictor_kwargs, to_prompt_pairs
from seggpt_lib.eval.decision import OperatingPointError, load_operating_point, operating_point_beside
from seggpt_lib.eval.mapping import validate_mapping
from seggpt_lib.eval.metrics import CATCH_IOU, YIELD_RESPONSE, PairResult, evaluate, summary_markdown
from seggpt_lib.eval.scoring import Folder, LearnedPrompts, ScoringConfig, score_mapping
from seggpt_lib.model.checkpoint import CheckpointError
from seggpt_lib.predict.predictor import (
    TILE_PAIRINGS,
    PromptMaskError,
    SegGPTPredictor,
    check_prompt_mask,
    load_mask_file,
)
from seggpt_lib.predict.tiling import MIN_TILE, check_grid, max_grid
from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD
from seggpt_lib.utils.device import PRECISIONS, resolve_device, resolve_precision
from seggpt_lib.utils.outputs import OutputError, StagedDir

__all__ = ["InferInputError", "add_arguments", "infer", "results_text", "run"]

OUTPUT_DIRS = ("color", "label", "concat")
OUTPUT_FILES = ("per_image.csv", "summary.json", "results.txt")
KIND_CHOICES = ("auto", "positive", "negative", "free")


class InferInputError(ValueError):
    """Bad input to ``seggpt infer`` (reported as ``error: ...``, exit code 2)."""


# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--weights", required=True, metavar="PATH", help="checkpoint (safetensors, official .pth, HF folder)")
    g.add_argument("--preset", help="architecture preset when the checkpoint does not record it (e.g. vit_large)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS + ("auto",),
                   help="autocast precision (default fp32; auto: bf16 on CUDA, else fp32)")
    g.add_argument("--max-batch", type=int, default=8, metavar="N", help="(query tile, prompt tile) pairs per forward pass (default 8)")
    g = parser.add_argument_group("data")
    g.add_argument("--mapping", required=True, metavar="JSON", help="{query_file: [prompt_file, ...]}")
    g.add_argument("--prompt-img-dir", metavar="DIR", help="prompt images (DIR/images when it exists); required "
                                                           "unless --learned-prompt")
    g.add_argument("--prompt-label-dir", metavar="DIR", help="prompt masks, <stem>.png; required unless --learned-prompt")
    g.add_argument("--learned-prompt", metavar="FILE", help="a learned prompt (seggpt tune-prompt) used for every query "
                                                            "in place of the mapping's prompts; the mapping may then "
                                                            "list the queries only")
    g.add_argument("--dataset-dir", required=True, metavar="DIR", help="query dataset root: images/, labels/ (optional), classes.csv")
    g.add_argument("--kind", default="auto", choices=KIND_CHOICES, help="pair kind for the metrics (default auto)")
    g = parser.add_argument_group("procedure")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="use the first K prompts of each entry (default: all)")
    g.add_argument("--grid", type=int, default=None, metavar="N", help="N x N tiles of the work canvas (default 1: no tiling)")
    g.add_argument("--split", type=int, default=None, dest="split_alias", help=argparse.SUPPRESS)  # deprecated: --grid
    g.add_argument("--work-size", type=int, default=1024, metavar="PX", help="side of the square work canvas for grid > 1 (default 1024)")
    g.add_argument("--tile-pairing", default="all", choices=TILE_PAIRINGS, help="query tile with every prompt tile (all, the original) or the same tile (aligned)")
    g.add_argument("--seam-pass", action="store_true", help="re-predict windows centred on the tile seams")
    g.add_argument("--no-ensemble", action="store_true", help="average per-prompt outputs instead of the feature ensemble")
    g.add_argument("--defect-color", type=lambda s: _triple(s, int), default=None, metavar="R,G,B", help="prompt-mask defect colour (default 255,255,255; with --learned-prompt the prompt's)")
    g.add_argument("--mean", type=_triple, default=None, metavar="R,G,B", help="normalisation mean (default ImageNet; with --learned-prompt the prompt's)")
    g.add_argument("--std", type=_triple, default=None, metavar="R,G,B", help="normalisation std (default ImageNet; with --learned-prompt the prompt's)")
    g = parser.add_argument_group("metrics and output")
    g.add_argument("--catch-iou", type=float, default=CATCH_IOU, help=f"good catch when IoU >= this (default {CATCH_IOU})")
    g.add_argument("--yield-response", type=float, default=YIELD_RESPONSE, help=f"correct yield when response rate < this (default {YIELD_RESPONSE})")
    g.add_argument("--outdir", required=True, metavar="DIR", help="output folder (must be new or empty, and outside "
                                                                "every input)")
    g.add_argument("--overwrite", action="store_true", help="replace this command's outputs in a non-empty --outdir")
    g.add_argument("--no-concat", action="store_true", help="skip the concat/ images")
    g.add_argument("--operating-point", default=None, metavar="PATH|none",
                   help="the line's decision (seggpt calibrate / notebook 04): the masks written are the decision's "
                        "(empty mask = pass), each image's score and verdict go to per_image.csv, the calibrated "
                        "rates to summary.json; default: operating_point.json beside the weights when present; "
                        "none: off (raw snapped masks)")
    g.add_argument("--raw-masks", action="store_true",
                   help="write the raw snapped masks (score >= 0.5) even with an operating point; the decision is "
                        "still scored and reported")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------
# input checks (everything before any work)
# ------------------------------------------------------------------------------------------
def _output_stage(args: argparse.Namespace) -> StagedDir:
    """``--outdir`` staged (:class:`seggpt_lib.utils.outputs.StagedDir`): the inputs it must stay
    out of, and the names this command owns in it (only those are replaced with ``--overwrite``)."""
    inputs = {"--dataset-dir": args.dataset_dir, "--prompt-img-dir": args.prompt_img_dir,
              "--prompt-label-dir": args.prompt_label_dir, "--mapping": args.mapping,
              "--learned-prompt": args.learned_prompt, "--weights": args.weights}
    return StagedDir(args.outdir, inputs, what="--outdir", overwrite=args.overwrite, replace=OUTPUT_DIRS + OUTPUT_FILES)


def _check_outdir(stage: StagedDir) -> None:
    """The output rule, before any work (InferInputError when refused)."""
    try:
        stage.check()
    except OutputError as e:
        raise InferInputError(str(e)) from None


def _load_mapping(path: str, queries_only: bool = False) -> dict[str, list[str]]:
    """The mapping JSON; with ``queries_only`` (a learned prompt) a list of query files is
    accepted too, and the prompt lists are dropped."""
    p = Path(path)
    if not p.is_file():
        raise InferInputError(f"mapping not found: {p}")
    try:
        mapping = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InferInputError(f"{p}: not a JSON mapping ({e})") from None
    if queries_only:
        if isinstance(mapping, list) and all(isinstance(q, str) for q in mapping):
            mapping = {q: [] for q in mapping}
        if not isinstance(mapping, dict) or not mapping:
            raise InferInputError(f"{p}: with --learned-prompt the mapping must be a non-empty JSON list of query "
                                  "files or an object {query: [prompts]} (prompts ignored)")
        return {str(q): [] for q in mapping}
    if not isinstance(mapping, dict) or not mapping:
        raise InferInputError(f"{p}: a mapping must be a non-empty JSON object {{query: [prompts]}}")
    return mapping


def _label_path(label_dir: Path, file: str) -> Path | None:
    """``<stem>.png`` in ``label_dir``, else a file of the same name; None when neither exists."""
    for cand in (label_dir / f"{Path(file).stem}.png", label_dir / file):
        if cand.is_file():
            return cand
    return None


def _header_hw(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the image header (no decoding): :func:`seggpt_lib.data.layout.header_size`."""
    w, h = header_size(path)
    return h, w


def _check_grid(args: argparse.Namespace, grid: int) -> None:
    """A grid the work canvas allows (:func:`seggpt_lib.predict.tiling.check_grid`), before any work."""
    try:
        check_grid(grid, args.work_size)
    except ValueError:
        flag = "--split" if getattr(args, "split_alias", None) is not None else "--grid"
        raise InferInputError(
            f"{flag} {grid} is too large for --work-size {args.work_size}: tiles would be "
            f"{args.work_size // grid} px (at least {MIN_TILE} px per side: {flag} <= {max_grid(args.work_size)}, "
            "or a larger --work-size)") from None


def _check_inputs(mapping, args, q_dir: Path, p_dir: Path | None, p_label_dir: Path | None, gt_dir: Path):
    """Every missing file in one error; then every bad prompt mask / gt size in one error.
    Without ``p_dir`` (a learned prompt) only the queries and their ground truths are checked."""
    problems = []
    if p_dir is None:
        missing_q = sorted(q for q in mapping if not (q_dir / q).is_file())
        if missing_q:
            raise InferInputError(f"mapping refers to missing files:\n{len(missing_q)} query image(s) missing from "
                                  f"{q_dir}:\n" + "\n".join(f"  {f}" for f in missing_q))
    used = {q: ps[: args.top_k] if isinstance(ps, list) else ps for q, ps in mapping.items()}
    try:
        if p_dir is not None:
            validate_mapping(used, q_dir, p_dir)
    except FileNotFoundError as e:
        problems.append(str(e))
    except ValueError as e:
        raise InferInputError(str(e)) from None
    prompts = sorted({p for ps in mapping.values() for p in ps[: args.top_k]})
    prompt_labels = {p: _label_path(p_label_dir, p) for p in prompts}
    missing = sorted(p for p, lp in prompt_labels.items() if lp is None and (p_dir / p).is_file())
    if missing:
        lines = [f"{len(missing)} prompt mask(s) missing from {p_label_dir} (expected <stem>.png):"]
        lines += [f"  {Path(p).stem}.png (for {p})" for p in missing]
        problems.append(("mapping refers to missing files:\n" if not problems else "") + "\n".join(lines))
    if problems:
        raise InferInputError("\n".join(problems))

    stems: dict[str, str] = {}
    for q in mapping:
        s = Path(q).stem
        if s in stems:
            raise InferInputError(f"queries {stems[s]} and {q} share the stem {s!r}: their outputs would collide")
        stems[s] = q

    bad = []
    for p in prompts:
        lp = prompt_labels[p]
        try:
            check_prompt_mask(load_mask_file(lp), _header_hw(p_dir / p), name=str(lp))
        except (PromptMaskError, DatasetError) as e:
            bad.append(str(e))
        except OSError as e:
            bad.append(f"{lp}: unreadable ({e})")
    gts: dict[str, Path | None] = {}
    for q in mapping:
        g = _label_path(gt_dir, q) if gt_dir.is_dir() else None
        gts[q] = g
        if g is not None:
            try:
                gh, qh = _header_hw(g), _header_hw(q_dir / q)
            except DatasetError as e:
                bad.append(str(e))
                continue
            if gh != qh:
                bad.append(f"{g}: ground truth is {gh[0]}x{gh[1]} (HxW) but its image {q} is {qh[0]}x{qh[1]}")
    if bad:
        raise InferInputError(f"{len(bad)} bad mask file(s):\n  " + "\n  ".join(bad))
    return prompt_labels, gts


# ------------------------------------------------------------------------------------------
# classes and kinds
# ------------------------------------------------------------------------------------------
def _prompt_root(p_img_dir: Path) -> Path:
    return p_img_dir.parent if p_img_dir.name == "images" else p_img_dir


# ------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------
def _overlay(image: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int], alpha: float = 0.55) -> np.ndarray:
    out = image.astype(np.float32)
    if mask is None:  # no ground truth: a dimmed input
        return (out * 0.35).astype(np.uint8)
    c = np.asarray(colour, np.float32)
    out[mask] = out[mask] * (1 - alpha) + c * alpha
    return out.round().astype(np.uint8)


def _written(pred, decision, defect_color: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The mask written and its colour image: the raw snapped prediction (``decision`` None), or
    the decision's mask (empty when the image passes) in ``defect_color`` on black."""
    if decision is None:
        return np.asarray(pred.mask, dtype=bool), pred.color
    mask = np.asarray(decision.mask, dtype=bool)
    color = np.zeros(mask.shape + (3,), np.uint8)
    color[mask] = np.asarray(defect_color, np.uint8)
    return mask, color


def _write_outputs(outdir: Path, stem: str, image: np.ndarray, gt: np.ndarray | None, mask: np.ndarray,
                   color: np.ndarray, concat: bool) -> None:
    Image.fromarray(color).save(outdir / "color" / f"{stem}.png", compress_level=1)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(outdir / "label" / f"{stem}.png", compress_level=6)
    if concat:
        sep = np.full((image.shape[0], 4, 3), 255, np.uint8)
        row = np.concatenate([image, sep, _overlay(image, gt, (0, 255, 0)), sep, _overlay(image, mask, (255, 0, 0))], axis=1)
        Image.fromarray(row).save(outdir / "concat" / f"{stem}.png", compress_level=1)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _fmt(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def results_text(table, summary: dict, settings: dict) -> str:
    """The original's text report: one line per image (IoU, response rate), then the means."""
    lines = [
        f"# seggpt infer: grid {settings['grid']}, top-k {settings['top_k'] or 'all'}, "
        f"tile pairing {settings['tile_pairing']}, seam pass {settings['seam_pass']}, weights {settings['weights']}",
    ]
    if settings.get("operating_point"):
        lines.append(f"# masks written: {settings.get('masks')}; the line's decision from {settings['operating_point']}")
    width = max([len(str(f)) for f in table["file"]] + [4])
    for _, r in table.iterrows():
        gt_note = "  (no ground truth)" if bool(r["gt_missing"]) else ""
        verdict = f"  verdict: {r['verdict']} (image score {_fmt(r['image_score'], 4)})" if "verdict" in r else ""
        lines.append(f"{str(r['file']):<{width}}  {r['kind']:<8}  IoU: {_fmt(r['iou'], 4)}  "
                     f"response rate: {_fmt(r['response_rate'], 6)}{verdict}{gt_note}")
    resp = table["response_rate"].astype(float)
    lines += [
        "",
        f"mIoU (positive pairs): {_fmt(summary.get('miou'), 4)}",
        f"mIoU (negative pairs): {_fmt(summary.get('negative_miou'), 4)}",
        f"mean response rate: {_fmt(float(resp.mean()) if len(resp) else math.nan, 6)}",
        f"catch rate: {_fmt(summary.get('catch_rate'), 4)} ({summary.get('n_catch', 0)}/{summary.get('n_positive', 0)}, IoU >= {summary['catch_iou']:g})",
        f"yield rate: {_fmt(summary.get('yield_rate'), 4)} ({summary.get('n_yield', 0)}/{summary.get('n_negative', 0)}, response < {summary['yield_response']:g})",
        f"free yield rate: {_fmt(summary.get('free_yield_rate'), 4)} ({summary.get('n_free_yield', 0)}/{summary.get('n_free', 0)})",
        f"PES: {_fmt(summary.get('pes'), 4)} (yield from {summary.get('pes_yield_source')})",
    ]
    cal = summary.get("calibrated")
    if cal:
        lines += [
            f"calibrated (the line's decision): catch rate {_fmt(cal.get('catch_rate'), 4)}, yield rate "
            f"{_fmt(cal.get('yield_rate'), 4)}, free yield rate {_fmt(cal.get('free_yield_rate'), 4)}, "
            f"PES {_fmt(cal.get('pes'), 4)}",
        ]
    dec = summary.get("decision") or {}
    if "n_defect" in dec:
        lines.append(f"verdicts: {dec['n_defect']} defect, {dec['n_pass']} pass")
    if summary.get("n_missing_gt"):
        lines.append(f"{summary['n_missing_gt']} image(s) without ground truth: predictions written, not scored")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------
def _grid(args: argparse.Namespace) -> int:
    """``--grid``, or the deprecated ``--split`` (with a warning); default 1."""
    alias = getattr(args, "split_alias", None)
    if alias is not None:
        print("warning: --split is deprecated, use --grid (N x N tiles)", file=sys.stderr)
        if args.grid is not None and args.grid != alias:
            raise InferInputError(f"--grid {args.grid} and --split {alias} disagree (--split is the old name of --grid)")
        return alias
    return 1 if args.grid is None else args.grid


def _operating_point(args: argparse.Namespace):
    """``--operating-point``: a file, ``none``, or (default) operating_point.json beside the weights if present."""
    choice = getattr(args, "operating_point", None)
    if choice is not None and str(choice).lower() == "none":
        return None
    path = Path(choice) if choice else operating_point_beside(args.weights)
    if choice is None and not path.is_file():
        return None
    try:
        point = load_operating_point(path)
    except OperatingPointError as e:
        raise InferInputError(f"--operating-point: {e}") from None
    args._operating_point_path = str(path)
    return point


def _masks_line(masks: str, point_path: str | None, raw_asked: bool) -> str:
    """The line printed on start: which masks this run writes, and why."""
    if masks == "calibrated":
        return (f"masks: the line's decision from {point_path} (an empty mask = pass); --raw-masks writes the raw "
                "snapped masks")
    if point_path:
        return f"masks: raw snapped masks (--raw-masks); the decision of {point_path} is still scored and reported"
    note = " (--raw-masks has nothing to override)" if raw_asked else ""
    return f"masks: raw snapped masks (no operating point: none beside the weights, or --operating-point none){note}"


def infer(args: argparse.Namespace) -> dict:
    """Do the work of ``seggpt infer``; returns the summary. Raises InferInputError on bad input.
    The outputs are built aside and moved into ``--outdir`` at the end; a failure leaves none."""
    stage = _output_stage(args)
    try:
        return _infer(args, stage)
    finally:
        stage.discard()  # a no-op after the commit


def _infer(args: argparse.Namespace, stage: StagedDir) -> dict:
    t_start = time.perf_counter()
    grid = _grid(args)
    for name, v, lo in (("--grid", grid, 1), ("--max-batch", args.max_batch, 1), ("--work-size", args.work_size, 8)):
        if v < lo:
            raise InferInputError(f"{name} must be >= {lo}, got {v}")
    if args.top_k is not None and args.top_k < 1:
        raise InferInputError(f"--top-k must be >= 1, got {args.top_k}")
    _check_grid(args, grid)
    outdir = Path(args.outdir)
    _check_outdir(stage)

    learned = None
    if args.learned_prompt:
        try:
            learned = load_learned_prompt(args.learned_prompt)
        except FileNotFoundError as e:
            raise InferInputError(f"--learned-prompt: {e}") from None
    mapping = _load_mapping(args.mapping, queries_only=learned is not None)
    dataset = Path(args.dataset_dir)
    if not dataset.is_dir():
        raise InferInputError(f"--dataset-dir not found: {dataset}")
    for flag, d in (("--prompt-img-dir", args.prompt_img_dir), ("--prompt-label-dir", args.prompt_label_dir)):
        if learned is None and not d:
            raise InferInputError(f"{flag} is required (or give --learned-prompt)")
        if d and not Path(d).is_dir():
            raise InferInputError(f"{flag} not found: {d}")
    q_dir, gt_dir = image_dir(dataset), dataset / "labels"
    p_dir = image_dir(args.prompt_img_dir) if learned is None else None
    p_label_dir = Path(args.prompt_label_dir) if learned is None else None
    _check_inputs(mapping, args, q_dir, p_dir, p_label_dir, gt_dir)
    classes = class_lookup(dataset, _prompt_root(Path(args.prompt_img_dir)) if args.prompt_img_dir else None)
    point = _operating_point(args)
    masks = "calibrated" if point is not None and not getattr(args, "raw_masks", False) else "raw"
    print(_masks_line(masks, getattr(args, "_operating_point_path", None), bool(getattr(args, "raw_masks", False))),
          flush=True)

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    look = {"mean": args.mean, "std": args.std, "defect_color": args.defect_color}
    if learned is not None:  # the prompt's normalisation and colour unless given (then they must match)
        pk = predictor_kwargs(learned)
        look = {k: v if v is not None else pk[k] for k, v in look.items()}
    try:
        predictor = SegGPTPredictor.from_checkpoint(
            args.weights, preset=args.preset, device=device, precision=precision,
            max_batch=args.max_batch, defect_color=look["defect_color"] or (255, 255, 255),
            mean=look["mean"] or IMAGENET_MEAN, std=look["std"] or IMAGENET_STD,
        )
    except FileNotFoundError as e:
        raise InferInputError(str(e)) from None
    prompts = learned_prompts = None
    if learned is not None:
        learned.check_fits(predictor.model, source=str(args.learned_prompt))
        name = f"learned:{learned.class_name or Path(args.learned_prompt).stem}"
        learned_prompts = LearnedPrompts({learned.class_name: to_prompt_pairs(learned, predictor)},
                                         names={learned.class_name: name})
    else:
        prompts = Folder(p_dir, p_label_dir, classes)
    t_loaded = time.perf_counter()

    work = stage.open()  # a hidden sibling of --outdir, moved into place when complete
    for d in OUTPUT_DIRS if not args.no_concat else OUTPUT_DIRS[:2]:
        (work / d).mkdir(parents=True, exist_ok=True)
    k_max = 1 if learned is not None else max(len(ps[: args.top_k]) for ps in mapping.values())
    per_query = predictor.pairs_per_query(k_max, grid, args.tile_pairing, args.seam_pass)
    cfg = ScoringConfig(
        grid=grid, top_k=args.top_k if learned is None else None, work_size=args.work_size,
        tile_pairing=args.tile_pairing, seam_pass=args.seam_pass, ensemble=not args.no_ensemble,
        queries_per_call=max(1, math.ceil(4 * args.max_batch / per_query)),  # about four full passes per call
        columns=("n_prompts", "n_pairs", "seconds"),
        operating_point=point,
    )

    records: list[PairResult] = []
    calibrated: list[PairResult] = []
    verdicts: list[dict[str, Any]] = []
    model_s = 0.0
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = []
        for scored in score_mapping(predictor, Folder(q_dir, gt_dir, classes), mapping, args.kind, cfg,
                                    prompts=prompts, learned=learned_prompts, desc="infer",
                                    progress=not args.no_progress and sys.stderr.isatty()):
            r, pred = scored.result, scored.prediction
            model_s += pred.timing["model_s"]
            r.extra["seconds"] = round(r.extra["seconds"], 4)
            records.append(r)
            if scored.calibrated is not None:
                calibrated.append(scored.calibrated)
            d = scored.decision
            if d is not None:
                verdicts.append({"image_score": float(d.image_score),
                                 "image_score_kind": point.config_for(scored.prompt_class).image_score,
                                 "verdict": "defect" if d.defect else "pass", "mask": masks})
            mask, color = _written(pred, d if masks == "calibrated" else None, predictor.defect_color)
            writes.append(pool.submit(_write_outputs, work, Path(r.query).stem, scored.image, r.gt, mask, color,
                                      not args.no_concat))
        for w in writes:
            w.result()
    t_done = time.perf_counter()

    table, summary = evaluate(records, catch_iou=args.catch_iou, yield_response=args.yield_response,
                              calibrated=calibrated if cfg.operating_point is not None else None)
    decision: dict[str, Any] = {"operating_point": getattr(args, "_operating_point_path", None)}
    if point is not None:
        for key in ("image_score", "image_score_kind", "verdict", "mask"):
            table[key] = [v[key] for v in verdicts]
        decision.update(default=point.default.to_dict(), per_class={c: v.to_dict() for c, v in point.per_class.items()},
                        n_defect=sum(v["verdict"] == "defect" for v in verdicts),
                        n_pass=sum(v["verdict"] == "pass" for v in verdicts))
    settings = {
        "weights": str(args.weights), "preset": args.preset, "mapping": str(args.mapping),
        "dataset_dir": str(args.dataset_dir), "prompt_img_dir": str(args.prompt_img_dir),
        "prompt_label_dir": str(args.prompt_label_dir), "kind": args.kind, "grid": grid,
        "top_k": args.top_k if learned is None else None, "tile_pairing": args.tile_pairing, "seam_pass": args.seam_pass,
        "learned_prompt": str(args.learned_prompt) if learned is not None else None,
        "learned_prompt_class": learned.class_name if learned is not None else None,
        "work_size": args.work_size, "ensemble": not args.no_ensemble, "precision": precision,
        "device": str(predictor.device), "max_batch": args.max_batch,
        "defect_color": list(predictor.defect_color), "mean": list(predictor.mean), "std": list(predictor.std),
        "model": predictor.model.cfg.to_dict(),
        "operating_point": getattr(args, "_operating_point_path", None), "masks": masks,
    }
    n = len(mapping)
    timing = {
        "total_s": round(t_done - t_start, 3), "load_s": round(t_loaded - t_start, 3),
        "predict_s": round(t_done - t_loaded, 3), "model_s": round(model_s, 3),
        "seconds_per_image": round((t_done - t_loaded) / n, 4), "images_per_s": round(n / max(t_done - t_loaded, 1e-9), 3),
        "pairs": int(predictor.stats["pairs"]), "forward_passes": int(predictor.stats["forward_passes"]),
    }
    summary = {**summary, "n_images": n, "masks": masks, "decision": decision, "settings": settings, "timing": timing}
    table.to_csv(work / "per_image.csv", index=False)
    (work / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")
    (work / "results.txt").write_text(results_text(table, summary, settings), encoding="utf-8")
    stage.commit()
    print(summary_markdown(summary), end="")
    print(f"{n} image(s), {timing['pairs']} pairs in {timing['forward_passes']} forward passes, "
          f"{timing['predict_s']:.2f} s ({timing['seconds_per_image']:.3f} s/image); outputs in {outdir}")
    if point is not None:
        print(f"verdicts: {decision['n_defect']} defect, {decision['n_pass']} pass; masks written: {masks}")
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        infer(args)
    except (InferInputError, OutputError, PromptMaskError, DatasetError, CheckpointError, LearnedPromptError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
