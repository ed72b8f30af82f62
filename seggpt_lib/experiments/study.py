"""Beyond the original: class-aware negatives and prompt tuning, measured side by side.

The original project trained negative pairs (a prompt of another defect class) to paint the
query's *own* defect (``negative_target="query_mask"``): a model so trained answers every
prompt with "the defect in this image", whatever the prompt shows, and its yield on negative
prompts is poor (0.182 published). Two things it did not try:

* **class-aware negatives** (``negative_target="empty"``): a negative pair asks for an empty
  query half, so the prompt's class matters;
* **prompt tuning** (SegGPT §3.3, in-context tuning): SegGPT frozen, one prompt image + label
  learned per class on the training split (:func:`seggpt_lib.engine.prompt_tuning.tune_prompt`).

:func:`compare_recipes` trains the two recipes with the same wall-clock budget and otherwise the
same recipe (an already trained model may stand in for one of them, e.g. notebook 02's), then
scores each on the held-out test split with three kinds of prompt: one image prompt (top-1), a
top-k feature ensemble, and the learned prompt of the class. Every row has mIoU, catch rate
(positive prompts), yield rate (negative prompts), defect-free yield (defect-free queries) and
PES, beside the paint-nothing baseline on the same pairs.

The line's decision (:mod:`seggpt_lib.eval.decision`): each (model, prompt method) also gets an
operating point chosen on the validation split ALONE with notebook 04's functions
(:func:`calibrate_method`: :func:`~seggpt_lib.experiments.evaluation.calibrate_operating_point`
for image prompts, :func:`~seggpt_lib.eval.calibration.calibrate` on the same kind of validation
pairs for learned prompts), applied to the same test pairs: ``decision`` holds a raw and a
calibrated row for each (catch, yield, defect-free yield, PES, PES over the paint-nothing floor
0.5).

``seggpt study`` runs that comparison on the magnetic-tile set under two protocols (see the
README's "Magnetic-tile study"): **seen classes** (a seeded 70/30 split of every class; a
validation share carved from the 70) and **held-out classes** (defect classes never seen in
training; their test images are split into a support half, the prompt pool and the prompt-tuning
data, and a query half). In each protocol every model is trained twice with the same recipe and
the same number of steps (the *init* dimension): **from scratch** and **from pretrained**, the
shipped checkpoint (``pretrained/vit_micro_shapes.safetensors``, pretrained on generic shapes by
``seggpt pretrain``; the pretrained rows keep its architecture, the table says so where the study's
preset differs); that checkpoint is also scored **without fine-tuning**, one-shot in context on
defect classes it never saw, with raw and calibrated rows like the others. Without the checkpoint
the study says so in one line and runs the from-scratch rows alone. ``--quick`` is a sub-minute CPU
check; the GPU configuration is in ``benchmarks/gpu_study.sh``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from seggpt_lib.data.layout import DefectIndex, read_label, read_rgb
from seggpt_lib.engine.prompt_tuning import PromptTuningConfig, save_learned_prompt, to_prompt_pairs, tune_prompt
from seggpt_lib.eval.calibration import OBJECTIVES, PairScore
from seggpt_lib.eval.decision import OperatingPoint
from seggpt_lib.eval.mapping import build_mapping
from seggpt_lib.eval.metrics import CATCH_IOU, YIELD_RESPONSE, evaluate, iou, response_rate
from seggpt_lib.eval.scoring import LearnedPrompts, ScoringConfig, score_mapping
from seggpt_lib.experiments import config as CFG
from seggpt_lib.experiments import dataset as DS
from seggpt_lib.experiments import evaluation as EV
from seggpt_lib.experiments import report as REP
from seggpt_lib.experiments import results as RES
from seggpt_lib.experiments import training as TR
from seggpt_lib.experiments import viz as V
from seggpt_lib.experiments.config import BeyondConfig, PipelineConfig

__all__ = [
    "DECISION_COLUMNS",
    "FULL",
    "INITS",
    "METHODS",
    "NO_FINETUNE",
    "PAINT_NOTHING_PES",
    "QUICK",
    "RECIPES",
    "StudySettings",
    "calibrate_method",
    "checkpoint_info",
    "compare_recipes",
    "decision_figure",
    "decision_note",
    "decision_rows",
    "evaluate_model",
    "floor_sentence",
    "floor_summary",
    "learned_prompts",
    "machine_info",
    "model_key",
    "model_short",
    "operating_point_records",
    "run_beyond",
    "run_study",
    "study_checkpoint",
    "study_dirs",
    "study_settings",
    "train_recipe",
]

RECIPES: dict[str, str] = {
    "query_mask": "original negatives (query mask)",
    "empty": "class-aware negatives (empty)",
}
METHODS = CFG.BEYOND_METHODS  # ("top1", "topk", "learned")
# where a trained model starts: from scratch (the configured weights, none in the study) or from the
# shipped pretrained checkpoint (seggpt_lib.experiments.pretrain), the same recipe and steps
INITS: dict[str, str] = {"scratch": "from scratch", "pretrained": "from pretrained"}
NO_FINETUNE = "pretrained_no_finetune"  # the model key of the pretrained checkpoint scored as it is
FREE = "free"
REPO_ROOT = Path(__file__).resolve().parents[2]

TABLE_COLUMNS = ["recipe", "negative_target", "prompt", "steps", "mIoU", "catch_rate", "yield_rate", "free_yield_rate",
                 "PES", "negative_mIoU", "n_positive", "n_negative", "n_free", "s_per_query"]
# the line's decision: a raw and a calibrated row per (model, prompt method), then paint nothing
DECISION_COLUMNS = ["recipe", "negative_target", "prompt", "decision", "catch_rate", "yield_rate", "free_yield_rate",
                    "PES", "PES_over_floor", "mIoU", "operating_point"]
PAINT_NOTHING_PES = 0.5  # catch 0, yield 1: the floor a calibrated decision must beat


def _quiet(msg: str) -> None:  # a log that says nothing
    pass


def model_key(negative_target: str, init: str = "scratch") -> str:
    """The key of a compared model in :func:`compare_recipes`'s ``models``, ``evals``,
    ``operating_points`` and the tables' hidden ``model`` column: the ``negative_target`` from
    scratch, ``<negative_target>_from_pretrained`` from the pretrained checkpoint."""
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    return negative_target if init == "scratch" else f"{negative_target}_from_pretrained"


def checkpoint_info(weights: str | os.PathLike) -> dict[str, Any]:
    """What the comparison needs of an init checkpoint (the shipped pretrained one, or any of ours):
    ``weights``, ``name`` (the file's stem), ``preset`` and ``model`` (its architecture, read from
    the file), and from the JSON beside it where there is one (``seggpt pretrain``'s export):
    ``defect_color``, ``mean`` / ``std`` (None: ImageNet's), ``steps``, ``sha256``."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    preset, model = CFG.resolve_preset(str(path), "auto")
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    rec = meta.get("recipe") or {}
    return {"weights": str(path), "name": path.stem, "preset": preset, "model": dict(model),
            "defect_color": rec.get("defect_color"), "mean": rec.get("image_mean"), "std": rec.get("image_std"),
            "steps": meta.get("steps"), "sha256": meta.get("sha256")}


def study_checkpoint(value: str | os.PathLike | None) -> tuple[dict[str, Any] | None, str]:
    """The study's init checkpoint (:attr:`StudySettings.pretrained`): ``"pretrained"``, the shipped
    one (:func:`seggpt_lib.experiments.pretrain.shipped_checkpoint`, its hash checked; the folder
    and name read at call time), or a path. Returns ``(checkpoint_info, "")``, or ``(None, the one
    line saying why the study runs its scratch rows only)``: absent, broken or switched off."""
    from seggpt_lib.experiments import pretrain as PT

    if not value:
        return None, "pretrained rows off (setting pretrained: null), from-scratch rows only"
    try:
        path = PT.shipped_checkpoint(name=PT.SHIPPED_NAME) if str(value) == CFG.PRETRAINED_WEIGHTS else Path(value)
        return checkpoint_info(path), ""
    except (PT.PretrainedError, CFG.PipelineError, OSError, ValueError, KeyError) as e:
        what = "no shipped pretrained checkpoint" if str(value) == CFG.PRETRAINED_WEIGHTS else "no init checkpoint"
        return None, f"{what}, from-scratch rows only ({e})"


def _arch(preset: str, model: dict[str, Any] | None) -> str:
    return preset + (f" ({', '.join(f'{k}={v}' for k, v in sorted((model or {}).items()))})" if model else "")


def model_short(row: dict[str, Any]) -> str:
    """A compared model in a figure's row label: the recipe's first word, with its init."""
    if row.get("model") == NO_FINETUNE:
        return "pretrained, no fine-tuning"
    base = str(row.get("recipe") or "").split(" ")[0].rstrip(",")
    init = row.get("init")
    return f"{base} ({init})" if isinstance(init, str) and init else base


# ------------------------------------------------------------------------------------------
# training one recipe
# ------------------------------------------------------------------------------------------
def train_recipe(split_root: str | os.PathLike, run_dir: str | os.PathLike, negative_target: str, *,
                 preset: str = "vit_micro", model_overrides: dict | None = None, weights: str = "",
                 steps: int = 100000, budget_minutes: float | None = None, device: str = "cpu",
                 precision: str = "auto", seed: int = 0, recipe: dict[str, Any] | None = None,
                 normalize: str = "imagenet", mean_std=None, eval_every: int = 50, val_pairs: int = 64,
                 checkpoint: str = "best", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``recipe`` with ``negative_target`` on ``split_root/train`` (validation on ``val``)
    for at most ``steps`` steps or ``budget_minutes`` minutes, in ``run_dir``. Returns
    ``negative_target``, ``weights`` (the ``checkpoint`` chosen), ``steps``, ``minutes``,
    ``best_val_miou``, ``best_val_pes``, ``best_val_prompt_auroc``, ``collapse`` (the last
    validation's: "nothing" / "everything", "" none), ``mean``, ``std``, ``reused`` (False)."""
    if negative_target not in RECIPES:
        raise ValueError(f"negative_target must be one of {sorted(RECIPES)}, got {negative_target!r}")
    train = {**(recipe or {}), "negative_target": negative_target}
    cfg = TR.training_config(split_root, run_dir, CFG.TrainSettings(
        preset=preset, model=dict(model_overrides or {}), weights=weights, steps=steps, train_minutes=budget_minutes,
        device=device, precision=precision, seed=seed, normalize=normalize, recipe=train, eval_every=eval_every,
        val_pairs=val_pairs), mean_std=mean_std, log=log)
    res = TR.run_training(cfg, run_dir, log=log)
    return {"negative_target": negative_target, "weights": str(TR.trained_weights(run_dir, checkpoint)),
            "steps": res["steps_done"], "minutes": res["wall_s"] / 60, "best_val_miou": res["best_val_miou"],
            "best_val_pes": res.get("best_val_pes", math.nan), "best_val_prompt_auroc": res.get("best_val_prompt_auroc", math.nan),
            "collapse": res.get("collapse") or "",
            "mean": list(cfg.image_mean), "std": list(cfg.image_std), "defect_color": cfg.defect_color,
            "reused": False}


# ------------------------------------------------------------------------------------------
# learned prompts
# ------------------------------------------------------------------------------------------
def learned_prompts(em, prompt_root: str | os.PathLike, classes: Sequence[str], *, steps: int = 40, lr: float = 0.1,
                    batch_size: int = 4, fg_weight: float = 1.0, negative_share: float = 0.25, seed: int = 0,
                    save_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One learned prompt per class of ``classes``, tuned on the class's images in ``prompt_root``
    with the model of ``em`` (a :class:`seggpt_lib.experiments.evaluation.EvalModel`) frozen, in the predictor's
    normalisation and defect colour. ``negative_share`` of each batch are images of other classes
    or defect-free ones with an empty target. Returns ``{class: LearnedPrompt}``; with
    ``save_dir`` each is also written as ``<class>.safetensors`` (for ``seggpt infer
    --learned-prompt``)."""
    pred = em.predictor
    index = _scan(prompt_root)
    has_other = bool(index.is_free.any()) or len(set(index.class_names) - {FREE}) > 1
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    recipe = PromptTuningConfig(
        steps=int(steps), lr=float(lr), batch_size=int(batch_size), init="real", seed=int(seed),
        fg_weight=float(fg_weight), negative_share=float(negative_share) if has_other else 0.0, precision="auto",
        defect_color=pred.defect_color, mean=pred.mean, std=pred.std, evaluate=True,
    )
    for cls in sorted(set(classes)):
        prompt, _ = tune_prompt(pred.model, index, cls, recipe, device=pred.device, progress=False)
        out[cls] = prompt
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            save_learned_prompt(prompt, Path(save_dir) / f"{cls}.safetensors")
    pred.model.eval()
    log(f"learned prompts for {len(out)} class(es), {steps} steps each, in {time.perf_counter() - t0:.1f} s")
    return out


_SCANS: dict[tuple[str, int, int], Any] = {}


def _scan(root: str | os.PathLike):
    """``DefectIndex.scan(root)`` (labels decoded, images not verified), kept while the folder's
    image and label listings are unchanged (a study scans the same folders many times)."""

    root = Path(root)
    key = (str(root.resolve()), (root / "images").stat().st_mtime_ns if (root / "images").is_dir() else 0,
           (root / "labels").stat().st_mtime_ns if (root / "labels").is_dir() else 0)
    if key not in _SCANS:
        if len(_SCANS) > 16:
            _SCANS.clear()
        _SCANS[key] = DefectIndex.scan(root, verify=False)
    return _SCANS[key]


def _tune_fg_weight(recipe: dict[str, Any], prompt_root: str | os.PathLike) -> float:
    """Prompt tuning's defect weight: the recipe's ``fg_weight``; ``"auto"`` resolved as the
    trainer resolves it (:func:`seggpt_lib.engine.trainer.auto_fg_weight`) from the defect share of
    the prompt folder's defect images (their labels at full size)."""
    fw = recipe.get("fg_weight", 1.0)
    if fw != "auto":
        return float(fw)
    from seggpt_lib.engine.trainer import auto_fg_weight

    idx = _scan(prompt_root)
    hit = total = 0
    for i in np.flatnonzero(~np.asarray(idx.is_free, dtype=bool)):
        lab = read_label(idx.label_path(int(i)))
        hit += int(np.count_nonzero(lab))
        total += int(lab.size)
    return auto_fg_weight(hit / total if total else math.nan)


def _learned(em, prompts: dict[str, Any]) -> LearnedPrompts:
    """The learned prompts of ``{class: LearnedPrompt}`` as prompt pairs of ``em``'s predictor."""
    return LearnedPrompts({c: to_prompt_pairs(p, em.predictor) for c, p in prompts.items()})


def _score_pairs(em, eval_root, mapping: dict[str, list[str]], kind: str, method: str, *, k: int = 1,
                 learned: LearnedPrompts | None = None, grid: int = 1, work_size: int = 1024,
                 tile_pairing: str = "aligned", point: OperatingPoint | None = None):
    """Predict ``mapping``'s queries (``eval_root``: ``test`` queries, ``train`` prompts) with one
    prompt ``method`` (``top1``, ``topk`` with ``k`` prompts, ``learned``: ``learned``'s prompt of
    the query's class, positive, or of the first mapped prompt's class, negative and free).
    Returns ``(raw PairResults, calibrated PairResults)``; the calibrated ones (the masks of
    ``point``'s decision, :mod:`seggpt_lib.eval.decision`) only with an operating point, else []."""
    q_root, p_root = EV.eval_roots(eval_root)
    if method == "learned":
        cfg = ScoringConfig(grid=grid, work_size=work_size, tile_pairing=tile_pairing,
                            extra={"method": method, "grid": grid, "top_k": 1}, operating_point=point)
    else:
        kk = 1 if method == "top1" else int(k)
        cfg = ScoringConfig(grid=grid, top_k=kk, work_size=work_size, tile_pairing=tile_pairing,
                            extra={"grid": grid, "top_k": kk}, operating_point=point)
    records, calibrated = [], []
    for s in score_mapping(em.predictor, EV.index_folder(_scan(q_root)), {q: mapping[q] for q in sorted(mapping)},
                           kind, cfg, prompts=EV.index_folder(_scan(p_root)),
                           learned=learned if method == "learned" else None):
        if method != "learned":
            s.result.extra["method"] = method
        records.append(s.result)
        if s.calibrated is not None:
            s.calibrated.extra["method"] = method
            calibrated.append(s.calibrated)
    return records, calibrated


def _predict_learned(em, eval_root, mapping: dict[str, list[str]], kind: str, prompts: dict[str, Any],
                     grid: int, work_size: int, tile_pairing: str, method: str):
    """PairResults of ``mapping``'s queries predicted from the learned prompt of the query's
    class (positive) or of the first mapped prompt's class (negative, free)."""
    return _score_pairs(em, eval_root, mapping, kind, method, learned=_learned(em, prompts), grid=grid,
                        work_size=work_size, tile_pairing=tile_pairing)[0]


# ------------------------------------------------------------------------------------------
# the line's decision, calibrated on the validation split
# ------------------------------------------------------------------------------------------
def _learned_val_mappings(val_root: Path, seed: int) -> dict[str, dict[str, list[str]]]:
    """The validation pairs of a learned prompt: every defect query (its class's prompt), and
    the negative and defect-free mappings of :func:`~seggpt_lib.eval.mapping.build_mapping` on
    the validation folder alone (their first prompt's class names the learned prompt)."""
    idx = _scan(val_root)
    out = {"positive": {f: [] for i, f in enumerate(idx.files) if not idx.is_free[i]}}
    for kind in ("negative", "free"):
        try:
            out[kind] = build_mapping(val_root, val_root, kind, k=1, seed=seed)
        except ValueError:  # no such query, or too few prompts of another class
            out[kind] = {}
    return out


def _learned_val_pairs(em, val_root: Path, prompts: dict[str, Any], *, grid: int, work_size: int,
                       tile_pairing: str, seed: int) -> list[PairScore]:
    """:func:`~seggpt_lib.eval.calibration.collect_pairs` for learned prompts: the validation
    folder's positive, negative and defect-free pairs predicted once with the learned prompt of
    each pair's class (``prompts`` must hold every class needed)."""
    folder = EV.index_folder(_scan(val_root))
    learned = _learned(em, prompts)
    cfg = ScoringConfig(grid=grid, work_size=work_size, tile_pairing=tile_pairing, consistency=True)
    out: list[PairScore] = []
    for kind, mapping in _learned_val_mappings(val_root, seed).items():
        if not mapping:
            continue
        for sp in score_mapping(em.predictor, folder, mapping, kind, cfg, prompts=folder, learned=learned):
            r = sp.result
            gt = None if r.gt is None else np.asarray(r.gt).astype(bool)
            out.append(PairScore(r.query, r.kind, r.query_class, sp.prompt_class,
                                 np.asarray(sp.prediction.score, dtype=np.float32), gt, sp.prediction.consistency))
    return out


def _learned_val_classes(val_root: Path, seed: int) -> set[str]:
    """The classes whose learned prompt the validation pairs ask for."""
    idx = _scan(val_root)
    maps = _learned_val_mappings(val_root, seed)
    need = {idx.class_of(idx.find(q)) for q in maps["positive"]}
    for kind in ("negative", "free"):
        need |= {idx.class_of(idx.find(ps[0])) for ps in maps[kind].values() if ps}
    return need


def calibrate_method(em, val_root: str | os.PathLike, method: str, *, k: int = 1, prompts: dict[str, Any] | None = None,
                     grid: int = 1, work_size: int = 1024, tile_pairing: str = "aligned",
                     objective: str = "max_pes", yield_target: float = 0.6, seed: int = 0,
                     catch_iou: float = CATCH_IOU, yield_response: float = YIELD_RESPONSE,
                     log: Callable[[str], None] = print) -> OperatingPoint | None:
    """The line's decision of one (model, prompt method), chosen on the dataset folder
    ``val_root`` ALONE (the validation split; queries and image prompts from it), predicted as the
    test pairs will be: image prompts (``top1``; ``topk`` with ``k`` prompts, one where the folder
    has fewer per class) through notebook 04's
    :func:`~seggpt_lib.experiments.evaluation.calibrate_operating_point`; learned prompts (tuned on
    the training split, ``prompts``: ``{class: LearnedPrompt}``) on the same positive, negative and
    defect-free pairs, then :func:`~seggpt_lib.eval.calibration.calibrate`. None (and a log line)
    when there is nothing to calibrate on."""
    val_root = Path(val_root)
    kw = dict(grid=grid, work_size=int(work_size), tile_pairing=tile_pairing, objective=objective,
              yield_target=yield_target, seed=seed, catch_iou=catch_iou, yield_response=yield_response)
    if method != "learned":
        for kk in dict.fromkeys((int(k) if method == "topk" else 1, 1)):
            point = EV.calibrate_operating_point(em, val_root, top_k=kk, log=log, **kw)
            if point is not None:
                return point
            if kk > 1:
                log(f"{method}: calibrating with one prompt per pair instead of {kk}")
        return None
    settings = {"val_dir": str(val_root), "weights": em.weights, "prompt": "learned", "grid": grid, "top_k": 1,
                "work_size": int(work_size), "tile_pairing": tile_pairing, "seed": seed,
                "defect_color": [int(c) for c in em.predictor.defect_color]}
    return EV.calibrate_collected(
        lambda: _learned_val_pairs(em, val_root, prompts or {}, grid=grid, work_size=int(work_size),
                                   tile_pairing=tile_pairing, seed=seed),
        settings, objective=objective, yield_target=yield_target, catch_iou=catch_iou, yield_response=yield_response,
        what=f"of the learned prompts on {val_root}", log=log, errors=(ValueError, KeyError))


def _point_short(point: OperatingPoint | None) -> str:
    """The chosen decision in a table cell."""
    if point is None:
        return "none (nothing to calibrate on in the validation split)"
    c = point.default
    parts = [f"score >= {c.pixel_threshold:g}", f"area >= {c.min_area}", f"{c.image_score} >= {c.image_threshold:.4g}"]
    if c.consistency_threshold is not None:
        parts.append(f"consistency >= {c.consistency_threshold:.3f}")
    if point.per_class:
        parts.append(f"{len(point.per_class)} class point(s)")
    k = (point.settings or {}).get("top_k")
    if k is not None and (point.settings or {}).get("prompt") != "learned":
        parts.append(f"val top-{k}")
    return ", ".join(parts)


def _decision_values(summary: dict[str, Any] | None) -> dict[str, Any]:
    s = summary or {}
    pes = s.get("pes", math.nan)
    return {"catch_rate": s.get("catch_rate", math.nan), "yield_rate": s.get("yield_rate", math.nan),
            "free_yield_rate": s.get("free_yield_rate", math.nan), "PES": pes,
            "PES_over_floor": pes - PAINT_NOTHING_PES if pes is not None else math.nan,
            "mIoU": s.get("miou", math.nan)}


# ------------------------------------------------------------------------------------------
# evaluating one model
# ------------------------------------------------------------------------------------------
def _method_label(method: str, k: int, tune_steps: int) -> str:
    return {"top1": "image prompt, top-1", "topk": f"image prompts, top-{k} ensemble",
            "learned": f"learned prompt ({tune_steps} steps)"}[method]


def _row(summary: dict[str, Any], table) -> dict[str, Any]:
    sec = table["seconds"].astype(float) if "seconds" in table and len(table) else None
    return {"mIoU": summary["miou"], "catch_rate": summary["catch_rate"], "yield_rate": summary["yield_rate"],
            "free_yield_rate": summary["free_yield_rate"], "PES": summary["pes"],
            "negative_mIoU": summary["negative_miou"], "n_positive": summary["n_positive"],
            "n_negative": summary["n_negative"], "n_free": summary["n_free"],
            "s_per_query": float(sec.mean()) if sec is not None else math.nan}


def evaluate_model(em, eval_root: str | os.PathLike, *, methods: Sequence[str] = METHODS, top_k: int = 3,
                   grid: int = 1, work_size: int | str = "auto", tile_pairing: str = "aligned",
                   max_queries: int | None = None, mapping_seed: int = 0, catch_iou: float = CATCH_IOU,
                   yield_response: float = YIELD_RESPONSE, tune_steps: int = 40, tune_lr: float = 0.1,
                   tune_batch: int = 4, tune_fg_weight: float = 1.0, tune_negative_share: float = 0.25,
                   seed: int = 0, prompt_dir: str | os.PathLike | None = None,
                   val_root: str | os.PathLike | None = None, calibration_objective: str | None = None,
                   calibration_yield_target: float = 0.6, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score one model (an :class:`~seggpt_lib.experiments.evaluation.EvalModel`) on ``eval_root`` (a folder
    with ``test/``, the queries, and ``train/``, the prompts and prompt-tuning data), queries cut
    into ``grid x grid`` tiles.

    The same positive, negative and defect-free query sets (at most ``max_queries`` each, spread
    over the classes) go through every method of ``methods``: ``top1`` (the first mapped image
    prompt), ``topk`` (the first ``top_k``, feature ensemble), ``learned`` (the class's learned
    prompt; for negative and defect-free queries the prompt of the first mapped prompt's class,
    so each negative pair asks for the same other class as the image-prompt rows).

    With ``calibration_objective`` and a ``val_root`` (the validation split: never the test
    queries), each method also gets the line's decision chosen there (:func:`calibrate_method`)
    and applied to the same test pairs: ``decision_rows`` holds a ``raw`` and a ``calibrated``
    row per method (catch, yield, defect-free yield, PES, PES over the paint-nothing floor).
    Returns ``rows`` ({method, prompt, metrics...}), ``per_image`` (every scored pair, with a
    ``method`` column; ``calibrated_*`` columns where calibrated), ``baseline`` (the paint-nothing
    row), ``decision_rows``, ``operating_points`` ({method: OperatingPoint or None}; empty without
    calibration), ``prompts`` (the learned ones), ``mappings``, ``work_size``."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; methods: {METHODS}")
    q_root, p_root = EV.eval_roots(eval_root)
    ws = EV.work_size_of(work_size, q_root, em)
    k = int(top_k) if "topk" in methods else 1
    methods = list(methods)
    try:
        pos = EV.prompt_mapping(eval_root, "positive", k=k, seed=mapping_seed, max_queries=max_queries)
    except ValueError as e:
        if k == 1:
            raise
        log(f"no top-{k} rows: {e}")
        methods = [m for m in methods if m != "topk"]
        k = 1
        pos = EV.prompt_mapping(eval_root, "positive", k=1, seed=mapping_seed, max_queries=max_queries)
    mappings = {"positive": pos}
    for kind in ("negative", "free"):
        try:
            mappings[kind] = EV.prompt_mapping(eval_root, kind, k=k, seed=mapping_seed, max_queries=max_queries)
        except ValueError:
            mappings[kind] = {}
        if not mappings[kind] and k > 1:  # too few prompts of other classes for k: fall back to one
            mappings[kind] = EV.prompt_mapping(eval_root, kind, k=1, seed=mapping_seed, max_queries=max_queries)

    calibrating = bool(calibration_objective) and val_root is not None
    prompts: dict[str, Any] = {}
    if "learned" in methods:
        p_idx, q_idx = _scan(p_root), _scan(q_root)
        need = {q_idx.class_of(q_idx.find(q)) for q in pos}
        for kind in ("negative", "free"):
            need |= {p_idx.class_of(p_idx.find(ps[0])) for ps in mappings[kind].values()}
        if calibrating:  # the validation pairs' classes too (the prompts are tuned on train/ all the same)
            need |= {c for c in _learned_val_classes(Path(val_root), mapping_seed) if c in set(p_idx.class_names)}
        prompts = learned_prompts(em, p_root, sorted(need), steps=tune_steps, lr=tune_lr, batch_size=tune_batch,
                                  fg_weight=tune_fg_weight, negative_share=tune_negative_share, seed=seed,
                                  save_dir=prompt_dir, log=log)
    learned = _learned(em, prompts) if prompts else None
    rows, tables, baseline, decisions, points = [], [], None, [], {}
    for method in methods:
        label = _method_label(method, k, tune_steps)
        point = None
        if calibrating:
            point = calibrate_method(em, val_root, method, k=k, prompts=prompts, grid=grid, work_size=ws,
                                     tile_pairing=tile_pairing, objective=calibration_objective,
                                     yield_target=calibration_yield_target, seed=mapping_seed, catch_iou=catch_iou,
                                     yield_response=yield_response, log=log)
            points[method] = point
        records, calibrated = [], []
        t0 = time.perf_counter()
        for kind, m in mappings.items():
            if not m:
                continue
            r, c = _score_pairs(em, eval_root, m, kind, method, k=k, learned=learned, grid=grid, work_size=ws,
                                tile_pairing=tile_pairing, point=point)
            records += r
            calibrated += c
        table, summary = evaluate(records, catch_iou=catch_iou, yield_response=yield_response,
                                  calibrated=calibrated if point is not None else None)
        log(f"  {label}: {len(records)} pairs in {time.perf_counter() - t0:.1f} s, "
            f"mIoU {summary['miou']:.3f}, catch {summary['catch_rate']:.3f}, yield {summary['yield_rate']:.3f}, "
            f"PES {summary['pes']:.3f}" + (f"; calibrated PES {summary['calibrated']['pes']:.3f}"
                                           if summary.get("calibrated") else ""))
        rows.append({"method": method, "prompt": label, **_row(summary, table)})
        if calibrating:
            decisions.append({"method": method, "prompt": label, "decision": "raw", **_decision_values(summary),
                              "operating_point": "raw snapped mask"})
            decisions.append({"method": method, "prompt": label, "decision": "calibrated",
                              **_decision_values(summary.get("calibrated") if point is not None else None),
                              "operating_point": _point_short(point)})
        tables.append(table)
        if baseline is None:
            b = summary["baselines"]["paint_nothing"]
            baseline = {"mIoU": b["miou"], "catch_rate": b["catch_rate"], "yield_rate": b["yield_rate"],
                        "free_yield_rate": b["free_yield_rate"], "PES": b["pes"], "negative_mIoU": b["negative_miou"],
                        "n_positive": summary["n_positive"], "n_negative": summary["n_negative"],
                        "n_free": summary["n_free"], "s_per_query": 0.0}
    per_image = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return {"rows": rows, "per_image": per_image, "baseline": baseline, "decision_rows": decisions,
            "operating_points": points, "prompts": prompts, "mappings": mappings, "work_size": ws, "top_k": k}


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------
def compare_recipes(split_root: str | os.PathLike, cfg: BeyondConfig, *,
                    reuse: dict[str, dict[str, Any] | str] | None = None,
                    negative_targets: Sequence[str] = ("query_mask", "empty"),
                    eval_root: str | os.PathLike | None = None, work_dir: str | os.PathLike | None = None,
                    mean_std=None, results_dir: str | os.PathLike | None = None, table_name: str | None = None,
                    title: str | None = None, val_root: str | os.PathLike | None = None,
                    pretrained: str | os.PathLike | dict[str, Any] | None = None, label_init: bool = False,
                    no_finetune: bool = True, note: str = "",
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse) one model per ``negative_targets`` entry with the same recipe and budget
    (``cfg``: :class:`~seggpt_lib.experiments.config.BeyondConfig`, its ``recipe`` over the
    pipeline's, ``steps`` / ``budget_minutes``), score each with :func:`evaluate_model` on
    ``eval_root`` (default ``split_root``: its ``test`` queries, ``train`` prompts) with
    ``cfg.methods`` at tiling grid ``cfg.grid``.

    ``reuse``: ``{negative_target: weights path or a train_recipe-like dict}``: an already
    trained model for that recipe (say notebook 02's class-aware model) instead of training it.
    Prompt tuning uses the recipe's ``fg_weight``. Returns ``table`` (a DataFrame: one row per
    (recipe, prompt method), then ``paint nothing``; columns :data:`TABLE_COLUMNS`), ``per_image``,
    ``training`` (one row per recipe: steps, minutes, best validation mIoU, reused),
    ``models`` ({model key: its training dict}), ``evals`` ({model key: evaluate_model's
    result}) and ``seconds``. With ``results_dir`` and ``table_name`` the tables are written there
    (``tables/<name>.{csv,md}``, ``<name>_per_image``, ``<name>_training``).

    The init dimension (``seggpt study``): with ``pretrained`` (an init checkpoint's path, or
    :func:`checkpoint_info`'s dict; the study gives the shipped one) each negative target is also
    trained from that checkpoint with the same recipe and the same number of steps as its
    from-scratch model (the steps that model did: a wall-clock budget is matched in steps), in the
    checkpoint's own architecture (said in the note where it is not ``cfg``'s), and, with
    ``no_finetune``, the checkpoint itself is scored as it is (one-shot in context; its learned
    prompts tuned with it frozen). Model keys: :func:`model_key` (the negative target from scratch,
    ``<negative_target>_from_pretrained``) and :data:`NO_FINETUNE`. With ``pretrained`` or
    ``label_init`` the rows carry an ``init`` column (``scratch`` / ``pretrained``), the recipes
    say ``, from scratch`` / ``, from pretrained``, and the training table the ``init`` and
    ``preset`` of each model. ``note`` is appended to the table's note.

    The line's decision (``cfg.calibration_objective``; None: off): each (model, prompt method)
    gets an operating point chosen on ``val_root`` ALONE (default: ``split_root``'s ``val``
    split; never the test queries), as notebook 04 chooses its own (:func:`calibrate_method`), and
    ``decision`` (a DataFrame, columns :data:`DECISION_COLUMNS` + ``method``, ``model``) holds its
    ``raw`` and ``calibrated`` rows on the same test pairs, then paint nothing (PES 0.5, the
    floor); written as ``<name>_decision``. ``operating_points``: ``{model key: {method: point}}``."""
    t_all = time.perf_counter()
    recipe = cfg.full_recipe()
    device = CFG.resolve_device_name(cfg.device)
    eval_root = Path(eval_root or split_root)
    if val_root is None:
        val_root = DS.split_roots(split_root).get("val")
    if cfg.calibration_objective and val_root is None:
        log(f"{split_root}: no val/ split: raw rows only (no calibration)")
    work = Path(work_dir) if work_dir is not None else Path(split_root).parent / "compare"
    ckpt = None
    if pretrained is not None:
        ckpt = dict(pretrained) if isinstance(pretrained, dict) else checkpoint_info(pretrained)
    by_init = bool(label_init or ckpt)
    notes: list[str] = []
    if ckpt is not None:
        arch, own = _arch(ckpt["preset"], ckpt.get("model")), _arch(cfg.preset, cfg.model)
        notes.append(f"from pretrained: initialised from {ckpt['name']} ({arch}), the same recipe and the same steps "
                     f"as the from-scratch model of its negatives recipe"
                     + (" (their wall-clock budget matched in steps)." if cfg.budget_minutes else "."))
        if arch != own:
            notes.append(f"The pretrained rows use the checkpoint's architecture, {arch}; the from-scratch rows {own}.")
            log(f"the pretrained rows use the checkpoint's architecture {arch}, not {own}")
        if no_finetune:
            notes.append(f"pretrained {ckpt['name']}, no fine-tuning: the checkpoint as it is, one-shot in context on "
                         "defect classes it never saw (learned prompts tuned with it frozen).")
    models: dict[str, dict[str, Any]] = {}
    for nt in negative_targets:
        given = (reuse or {}).get(nt)
        scratch_label = f"{RECIPES[nt]}, {INITS['scratch']}" if by_init else RECIPES[nt]
        if given:
            info = {"weights": given} if isinstance(given, (str, os.PathLike)) else dict(given)
            info = {"negative_target": nt, "steps": None, "minutes": None, "best_val_miou": math.nan, **info,
                    "reused": True}
            info["weights"] = str(info["weights"])
            log(f"{info.get('label') or scratch_label}: reusing {info['weights']}")
        else:
            log(f"{scratch_label}: training ({cfg.budget_minutes if cfg.budget_minutes else 'no'} min budget, "
                f"<= {cfg.steps} steps)")
            info = train_recipe(split_root, work / f"run_{nt}", nt, preset=cfg.preset, model_overrides=cfg.model,
                                weights=cfg.weights, steps=cfg.steps, budget_minutes=cfg.budget_minutes, device=device,
                                precision=cfg.precision, seed=cfg.seed, recipe=recipe, normalize=cfg.normalize,
                                mean_std=mean_std, eval_every=cfg.eval_every, val_pairs=cfg.val_pairs,
                                checkpoint=cfg.checkpoint, log=log)
        info.setdefault("label", scratch_label)
        info.setdefault("preset", "" if info.get("reused") else _arch(cfg.preset, cfg.model))
        info["init"] = "scratch"
        models[model_key(nt, "scratch")] = info
        if ckpt is not None:
            key, label = model_key(nt, "pretrained"), f"{RECIPES[nt]}, {INITS['pretrained']}"
            steps = int(info.get("steps") or cfg.steps)  # the same budget in steps as from scratch
            log(f"{label}: training from {ckpt['name']} ({steps} steps, as from scratch)")
            p = train_recipe(split_root, work / f"run_{key}", nt, preset=ckpt["preset"],
                             model_overrides=ckpt.get("model"), weights=ckpt["weights"], steps=steps,
                             budget_minutes=None, device=device, precision=cfg.precision, seed=cfg.seed, recipe=recipe,
                             normalize=cfg.normalize, mean_std=mean_std, eval_every=cfg.eval_every,
                             val_pairs=cfg.val_pairs, checkpoint=cfg.checkpoint, log=log)
            p.update(label=label, init="pretrained", preset=_arch(ckpt["preset"], ckpt.get("model")))
            models[key] = p
    if ckpt is not None and no_finetune:
        models[NO_FINETUNE] = {
            "negative_target": "", "label": f"pretrained {ckpt['name']}, no fine-tuning", "init": "pretrained",
            "preset": _arch(ckpt["preset"], ckpt.get("model")), "weights": str(ckpt["weights"]), "steps": 0,
            "minutes": 0.0, "best_val_miou": math.nan, "mean": ckpt.get("mean"), "std": ckpt.get("std"),
            "defect_color": ckpt.get("defect_color"), "reused": True}

    rows, per_image, evals, ems, baseline, decision = [], [], {}, {}, None, []
    extra = lambda info: {"init": info.get("init", "")} if by_init else {}  # noqa: E731
    for key, info in models.items():
        nt = info["negative_target"]
        label = info.get("label") or RECIPES[nt]
        em = EV.load_eval_model(work, weights=info["weights"], preset="auto", device=device, precision=cfg.precision,
                                max_batch=cfg.max_batch, mean=info.get("mean"), std=info.get("std"),
                                defect_color=info.get("defect_color") or recipe.get("defect_color"))
        ems[key] = em
        log(f"evaluating {label}: {em.describe()}")
        ev = evaluate_model(em, eval_root, methods=cfg.methods, top_k=cfg.top_k, grid=cfg.grid,
                            work_size=cfg.work_size, tile_pairing=cfg.tile_pairing, max_queries=cfg.max_queries,
                            mapping_seed=cfg.mapping_seed, catch_iou=cfg.catch_iou,
                            yield_response=cfg.yield_response, tune_steps=cfg.tune_steps, tune_lr=cfg.tune_lr,
                            tune_batch=cfg.tune_batch, tune_fg_weight=_tune_fg_weight(recipe, EV.eval_roots(eval_root)[1]),
                            tune_negative_share=cfg.tune_negative_share, seed=cfg.seed,
                            prompt_dir=work / f"prompts_{key}", val_root=val_root,
                            calibration_objective=cfg.calibration_objective,
                            calibration_yield_target=cfg.calibration_yield_target, log=log)
        evals[key] = ev
        for r in ev["rows"]:
            rows.append({"recipe": label, "negative_target": nt, "steps": info.get("steps"), **extra(info), **r,
                         "model": key})
        for r in ev["decision_rows"]:
            decision.append({"recipe": label, "negative_target": nt, **extra(info), **r, "model": key})
        t = ev["per_image"].copy()
        if by_init:
            t.insert(0, "init", info.get("init", ""))
        t.insert(0, "negative_target", nt)
        if by_init:
            t.insert(0, "model", key)
        per_image.append(t)
        baseline = baseline or ev["baseline"]
    if baseline is not None:
        rows.append({"recipe": "baseline", "negative_target": "", "prompt": "paint nothing", "steps": None,
                     **extra({}), "method": "paint_nothing", **baseline, "model": ""})
    if baseline is not None and decision:
        decision.append({"recipe": "baseline", "negative_target": "", "prompt": "paint nothing", "decision": "none",
                         **extra({}), "method": "paint_nothing",
                         **_decision_values({"catch_rate": baseline["catch_rate"], "yield_rate": baseline["yield_rate"],
                                             "free_yield_rate": baseline["free_yield_rate"], "pes": baseline["PES"],
                                             "miou": baseline["mIoU"]}),
                         "operating_point": "an empty mask", "model": ""})
    hidden = ["method", "model"] if by_init else ["method"]  # model: the model key (with an init dimension)
    dec_cols = DECISION_COLUMNS[:4] + (["init"] if by_init else []) + DECISION_COLUMNS[4:]
    decision_df = pd.DataFrame([{c: r.get(c) for c in dec_cols + hidden} for r in decision], columns=dec_cols + hidden)
    table = pd.DataFrame(rows)
    tab_cols = TABLE_COLUMNS[:4] + (["init"] if by_init else []) + TABLE_COLUMNS[4:]
    table = table[[c for c in tab_cols if c in table.columns] + hidden]
    table["steps"] = pd.Series([None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                                for v in table["steps"]], dtype=object)  # 123, or empty for the baseline
    per_image_df = pd.concat(per_image, ignore_index=True) if per_image else pd.DataFrame()
    training = pd.DataFrame([{"recipe": m.get("label") or RECIPES[m["negative_target"]],
                              "negative_target": m["negative_target"],
                              **({"init": m.get("init", ""), "preset": m.get("preset", "")} if by_init else {}),
                              "steps": m.get("steps"), "minutes": m.get("minutes"),
                              "best_val_mIoU": m.get("best_val_miou"), "best_val_PES": m.get("best_val_pes", math.nan),
                              "best_val_prompt_AUROC": m.get("best_val_prompt_auroc", math.nan),
                              "collapse": m.get("collapse") or ("none" if m.get("steps") else "–"),
                              "reused": bool(m.get("reused")),
                              "weights": Path(m["weights"]).name} for m in models.values()])
    if results_dir is not None and table_name:
        RES.write_table(table.drop(columns=hidden), results_dir, table_name,
                        title=title or "Beyond the original",
                        note=" ".join(["Same test queries for every row; PES = 0.5·catch + 0.5·yield (negative "
                                       "prompts). Paint nothing: the trivial baseline on the same pairs.", *notes,
                                       *([note] if note else [])]))
        if len(per_image_df):
            RES.write_table(per_image_df, results_dir, f"{table_name}_per_image", title="Every scored pair")
        RES.write_table(training, results_dir, f"{table_name}_training", title="The models compared",
                        note=" ".join(notes) if notes else None)
        if len(decision_df):
            RES.write_table(decision_df.drop(columns=hidden), results_dir, f"{table_name}_decision",
                            title=f"{title or 'Beyond the original'}: the line's decision, raw and calibrated",
                            note=decision_note(decision_df, cfg.calibration_objective))
    return {"table": table, "per_image": per_image_df, "training": training, "models": models, "evals": evals,
            "decision": decision_df, "operating_points": {k: ev["operating_points"] for k, ev in evals.items()},
            "eval_models": ems, "eval_root": str(eval_root), "grid": cfg.grid, "tile_pairing": cfg.tile_pairing,
            "pretrained": ckpt, "notes": notes, "seconds": time.perf_counter() - t_all}


def run_beyond(results_dir: str | os.PathLike, cfg: PipelineConfig, log: Callable[[str], None] = print, *,
               calibration_objective: str | None = None,
               calibration_yield_target: float | None = None) -> dict[str, Any]:
    """Notebook 05: notebook 02's model stands for its own recipe (``cfg.train``'s
    ``negative_target``) and the other recipe trains here with the same budget
    (``beyond_minutes``, None: ``train_minutes``); both are compared by :func:`compare_recipes` on
    notebook 01's split and written as ``tables/05_beyond*``. Without training in 02 (``steps``
    0) only the prompts are compared, on the given weights. Every (model, prompt) also gets the
    line's decision chosen on the validation split only (``calibration_objective`` /
    ``calibration_yield_target``, default ``cfg``'s, as notebook 04; ``"none"``: raw rows only):
    ``decision`` holds its raw and calibrated rows. Returns :func:`compare_recipes`'s result plus
    ``fragment`` (the :class:`~seggpt_lib.experiments.results.BeyondFragment`)."""
    R = Path(results_dir)
    data = RES.load_fragment(R, RES.DataFragment)
    trained = RES.load_fragment(R, RES.TrainingFragment)
    objective = cfg.calibration_objective if calibration_objective is None else calibration_objective
    objective = None if not objective or str(objective).lower() == "none" else str(objective)
    bc = cfg.beyond().replace(calibration_objective=objective, calibration_yield_target=float(
        cfg.calibration_yield_target if calibration_yield_target is None else calibration_yield_target))
    own = cfg.train.get("negative_target", CFG.PIPELINE_RECIPE["negative_target"])  # the recipe notebook 02 trained
    reuse = {own: {"weights": trained.weights, "steps": trained.steps_done, "minutes": (trained.wall_s or 0) / 60,
                   "best_val_miou": trained.best_val_miou, "best_val_pes": trained.best_val_pes,
                   "best_val_prompt_auroc": trained.best_val_prompt_auroc, "collapse": trained.collapse or "",
                   "mean": trained.mean, "std": trained.std,
                   "defect_color": trained.defect_color}}
    if trained.trained:
        targets: tuple[str, ...] = ("query_mask", "empty")
        log(f"notebook 02 trained the {RECIPES[own]} recipe for {reuse[own]['minutes']:.1f} min "
            f"({trained.steps_done} steps); the other one trains here with {bc.budget_minutes} min and the same recipe")
    else:
        targets = (own,)
        reuse[own]["label"] = f"given weights ({Path(trained.weights).name})"
        log("no training in notebook 02 (steps = 0): comparing the prompts on the given weights only")
    res = compare_recipes(data.split_root, bc, reuse=reuse, negative_targets=targets, work_dir=R / "work" / "beyond",
                          mean_std=data.mean_std() if cfg.normalize == "dataset" else None, results_dir=R,
                          table_name=RES.BeyondFragment.NAME,
                          title=f"Beyond the original (grid {bc.grid}, same test queries for every row)", log=log)
    val_dir = DS.split_roots(data.split_root).get("val")
    res["fragment"] = RES.BeyondFragment(
        rows=headline_rows(res["table"]), training=res["training"].to_dict("records"),
        budget_minutes=bc.budget_minutes, grid=bc.grid, top_k=bc.top_k, tune_steps=bc.tune_steps,
        max_queries=bc.max_queries, device=CFG.resolve_device_name(cfg.device), seconds=res["seconds"],
        decision_rows=decision_rows(res["decision"]), operating_points=operating_point_records(res),
        calibration_objective=bc.calibration_objective,
        calibration_yield_target=bc.calibration_yield_target if bc.calibration_objective else None,
        val_dir=_portable_path(val_dir) if val_dir is not None else None)
    return res


def example_panels(res: dict[str, Any], n: int = 3, kinds: Sequence[str] = ("positive", "negative"),
                   methods: Sequence[str] = ("top1", "learned"), size: int = 128):
    """A contact sheet from :func:`compare_recipes`'s result: for ``n`` queries of each kind
    (spread over the mapping), the query with its ground truth (green), then the prediction
    (red) of every compared model with each of ``methods``. Returns the figure, or None when
    there is nothing to show."""

    eval_root = res["eval_root"]
    q_root, p_root = EV.eval_roots(eval_root)
    q_idx, p_idx = _scan(q_root), _scan(p_root)
    images, titles, ncols = [], [], 1
    ev0 = next(iter(res["evals"].values()), None)
    for kind in kinds:
        if ev0 is None or not ev0["mappings"].get(kind):
            continue
        qs = sorted(ev0["mappings"][kind])
        pick = [qs[int(i)] for i in np.unique(np.linspace(0, len(qs) - 1, min(n, len(qs))).round().astype(int))]
        preds: dict[tuple[str, str], dict[str, Any]] = {}  # (recipe, method) -> {query: PairResult}
        for nt, ev in res["evals"].items():
            em, m = res["eval_models"][nt], ev["mappings"][kind]
            sub = {q: m[q] for q in pick}
            for method in methods:
                if method == "learned":
                    if not ev["prompts"]:
                        continue
                    recs = _predict_learned(em, eval_root, sub, kind, ev["prompts"], res["grid"], ev["work_size"],
                                            res["tile_pairing"], method)
                else:
                    recs = EV.predict_mapping(em, eval_root, sub, kind, grid=res["grid"],
                                             top_k=1 if method == "top1" else ev["top_k"], work_size=ev["work_size"],
                                             tile_pairing=res["tile_pairing"])
                preds[(nt, method)] = {r.query: r for r in recs}
        for q in pick:
            i = q_idx.find(q)
            img, gt = read_rgb(q_idx.image_path(i)), read_label(q_idx.label_path(i)) != 0
            h = min(size, img.shape[0])
            hw = (h, max(1, round(img.shape[1] * h / img.shape[0])))
            row = [V.resize_image(V.overlay(img, gt, color=(0, 200, 0)), hw)]
            row_t = [f"{kind}: {q_idx.class_of(i)}"]
            for (nt, method), recs in preds.items():
                rec = recs[q]
                ptxt = rec.prompts[0] if method == "learned" else p_idx.class_of(p_idx.find(rec.prompts[0]))
                shown = V.overlay_pred_gt(img, rec.pred, gt) if kind == "positive" else V.overlay(img, rec.pred)
                row.append(V.resize_image(shown, hw))
                score = f"IoU {iou(rec.pred, gt):.2f}" if kind == "positive" else f"resp {response_rate(rec.pred):.4f}"
                row_t.append(f"{nt} {method} ({ptxt})\n{score}")
            ncols = len(row)
            images += row
            titles += row_t
    if not images:
        return None
    return V.contact_sheet(images, titles, ncols=ncols, cell=2.0,
                           suptitle="query with its defect (green); positive: hit yellow, missed green, false red; negative: painted red")


def prompt_previews(res: dict[str, Any], max_classes: int = 6):
    """The learned prompts (image | label | snapped mask) of every compared model."""

    images, titles = [], []
    for nt, ev in res["evals"].items():
        for cls in sorted(ev["prompts"])[:max_classes]:
            p = ev["prompts"][cls]
            images.append(p.preview())
            loss0, loss1 = p.info.get("initial_loss"), p.final_loss
            titles.append(f"{nt}: {cls}" + (f"\nloss {loss0:.3f} -> {loss1:.3f}" if loss0 is not None and loss1 is not None
                                            else ""))
    if not images:
        return None
    return V.contact_sheet(images, titles, ncols=3, cell=2.6, suptitle="learned prompts: image | label | snapped mask")


def decision_rows(decision) -> list[dict[str, Any]]:
    """:func:`compare_recipes`'s ``decision`` table as plain dicts for a summary (NaN as None)."""
    if decision is None or not len(decision):
        return []
    out = []
    for r in decision.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return out


def operating_point_records(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<negative_target>/<method>": what a summary keeps of its operating point}``
    (:func:`~seggpt_lib.experiments.evaluation.operating_point_record`; ``{}`` where none was chosen)."""
    out = {f"{nt}/{m}": EV.operating_point_record(p, None)
           for nt, pts in (res.get("operating_points") or {}).items() for m, p in pts.items()}
    for rec in out.values():  # summaries are committed: the settings' files relative to the repository
        settings = rec.get("settings") or {}
        for k in ("weights", "val_dir"):
            if settings.get(k):
                settings[k] = _portable_path(Path(settings[k]))
    return out


def _model_column(decision) -> str:
    """The column naming the compared model: ``model`` (with an init dimension), else ``negative_target``."""
    return "model" if "model" in decision.columns else "negative_target"


def floor_sentence(decision) -> str:
    """One sentence per compared model: its best calibrated PES (the test pairs, the decision
    chosen on validation) against the paint-nothing floor (0.5), beside its raw PES."""
    if decision is None or not len(decision):
        return "No calibrated rows (no calibration)."
    parts = []
    by = _model_column(decision)
    for nt in [v for v in dict.fromkeys(decision[by]) if v]:
        d = decision[decision[by] == nt]
        cal = d[(d["decision"] == "calibrated") & d["PES"].notna()]
        raw = d[(d["decision"] == "raw") & d["PES"].notna()]
        name = d["recipe"].iloc[0]
        if not len(cal):
            parts.append(f"{name}: no calibrated row (nothing to calibrate on in the validation split).")
            continue
        best = cal.sort_values("PES", ascending=False).iloc[0]
        diff = float(best["PES"]) - PAINT_NOTHING_PES
        where = "above" if diff > 1e-12 else ("at" if abs(diff) <= 1e-12 else "below")
        raw_best = f"; best raw PES {raw['PES'].max():.3f}" if len(raw) else ""
        parts.append(f"{name}: best calibrated PES {best['PES']:.3f} ({best['prompt']}; catch "
                     f"{best['catch_rate']:.3f}, yield {best['yield_rate']:.3f}), {abs(diff):.3f} {where} the "
                     f"paint-nothing floor {PAINT_NOTHING_PES}{raw_best}.")
    return " ".join(parts)


def floor_summary(decision) -> dict[str, Any]:
    """Each compared model's best calibrated PES against the paint-nothing floor: ``floor``,
    ``models`` ({model key (the negative_target from scratch, :func:`model_key`): {recipe, prompt,
    pes, raw_pes (same prompt), over_floor, above}}), ``sentence`` (:func:`floor_sentence`)."""
    models: dict[str, Any] = {}
    if decision is not None and len(decision):
        by = _model_column(decision)
        for nt in [v for v in dict.fromkeys(decision[by]) if v]:
            d = decision[decision[by] == nt]
            cal = d[(d["decision"] == "calibrated") & d["PES"].notna()]
            if not len(cal):
                models[nt] = {"recipe": d["recipe"].iloc[0], "prompt": None, "pes": None, "raw_pes": None,
                              "over_floor": None, "above": None}
                continue
            best = cal.sort_values("PES", ascending=False).iloc[0]
            raw = d[(d["decision"] == "raw") & (d["method"] == best["method"])]
            models[nt] = {"recipe": best["recipe"], "prompt": best["prompt"], "pes": float(best["PES"]),
                          "raw_pes": float(raw["PES"].iloc[0]) if len(raw) else None,
                          "over_floor": float(best["PES"]) - PAINT_NOTHING_PES,
                          "above": bool(float(best["PES"]) > PAINT_NOTHING_PES)}
    return {"floor": PAINT_NOTHING_PES, "models": models, "sentence": floor_sentence(decision)}


def decision_figure(decision, title: str = "The line's decision: raw and calibrated on val"):
    """PES of every (model, prompt), raw beside calibrated, the paint-nothing floor dashed."""
    d = decision[decision["decision"].isin(("raw", "calibrated"))]
    by = _model_column(decision)
    wide = d.pivot_table(index=[by, "method"], columns="decision", values="PES", aggfunc="first",
                         sort=False, dropna=False).reset_index()
    labels = {(r[by], r["method"]): f"{model_short(r)} · {r['prompt']}" for r in d.to_dict("records")}
    wide["row"] = [labels[(a, b)] for a, b in zip(wide[by], wide["method"])]
    cols = [c for c in ("raw", "calibrated") if c in wide.columns]
    return V.bar_chart(wide.rename(columns={c: f"PES {c}" for c in cols}), "row", [f"PES {c}" for c in cols],
                       title=title, hline=PAINT_NOTHING_PES, hline_label="paint nothing (0.5)", rotate=30)


def decision_note(decision, objective: str | None) -> str:
    """The note under the decision table: how the calibrated rows were chosen and how they compare
    with the paint-nothing floor."""
    return (f"raw: the snapped masks; calibrated: the line's decision (pixel threshold, min area, image score) "
            f"chosen per model and prompt on the validation split only ({objective}), applied to the same test "
            f"pairs. PES_over_floor = PES - {PAINT_NOTHING_PES} (paint nothing). " + floor_sentence(decision))


def headline_rows(table) -> list[dict[str, Any]]:
    """The comparison's rows as plain dicts for a summary (recipe, prompt, steps, the rates)."""
    keep = ["recipe", "negative_target", *(["init", "model"] if "init" in table.columns else []), "prompt", "steps",
            "mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES"]
    out = []
    for r in table.to_dict("records"):
        out.append({k: (None if isinstance(r.get(k), float) and math.isnan(r[k]) else r.get(k)) for k in keep})
    return out


# ------------------------------------------------------------------------------------------
# the magnetic-tile study (seggpt study)
# ------------------------------------------------------------------------------------------
def _portable_path(path: Path) -> str:
    """``path`` relative to the repository where it lies beside or in it (summaries are committed:
    no machine's absolute paths in them), else as given."""
    try:
        return os.path.relpath(Path(path).resolve(), REPO_ROOT) if Path(path).resolve().is_relative_to(
            REPO_ROOT.parent) else str(path)
    except ValueError:  # another drive
        return str(path)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Platform, CPU model and count, GPU name, python / torch versions."""

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": torch.cuda.get_device_name(0), "memory_gib": round(p.total_memory / 2**30, 1),
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


@dataclass
class StudySettings:
    """The settings of ``seggpt study`` (``--set key=value``; ``train`` merged key by key). The
    default is the lent-GPU configuration (``benchmarks/gpu_study.sh``): vit_tiny (224 px per
    image), a wall-clock budget per trained model, prompt tuning 60 steps per class."""

    limit_per_class: int | None = None  # first N photos of each class
    preset: str = "vit_tiny"
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides
    steps: int = 100000
    minutes: float | None = 0.35  # training budget per model and protocol
    eval_every: int = 100
    val_pairs: int = 32
    tune_steps: int = 60  # prompt-tuning steps per class
    max_queries: int | None = None  # queries per kind
    top_k: int = 3  # prompts of the ensemble row
    train: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3, "batch_size": 32, "warmup_steps": 50,
                                                           "num_workers": 6})  # TrainConfig keys over PIPELINE_RECIPE
    val: float = 0.1  # the split: validation share (configs/magnetic_tile.json splits the same way)
    test: float = 0.3  # test share
    # the line's decision per (model, prompt), chosen on each protocol's validation split (None: raw only)
    calibration_objective: str | None = PipelineConfig.calibration_objective
    calibration_yield_target: float = PipelineConfig.calibration_yield_target
    # the init dimension: every model also trained from this checkpoint (same recipe, same steps, its
    # own architecture) and the checkpoint scored without fine-tuning. "pretrained": the shipped one
    # (pretrained/vit_micro_shapes.safetensors; absent: scratch rows only, said in one line); a path:
    # that checkpoint; None: scratch rows only
    pretrained: str | None = CFG.PRETRAINED_WEIGHTS

    def with_overrides(self, overrides: dict[str, Any] | None) -> "StudySettings":
        valid = [f.name for f in dataclasses.fields(self)]
        changes: dict[str, Any] = {}
        for k, v in (overrides or {}).items():
            if k not in valid:
                raise ValueError(f"unknown study setting {k!r}; settings: {', '.join(sorted(valid))}")
            changes[k] = {**self.train, **v} if k == "train" and isinstance(v, dict) else v
        out = dataclasses.replace(self, **json.loads(json.dumps(changes)))
        if out.calibration_objective not in (None, *OBJECTIVES):
            raise ValueError(f"calibration_objective must be one of {OBJECTIVES} or null, got {out.calibration_objective!r}")
        return out

    def beyond(self, device: str, seed: int, recipe: dict[str, Any]) -> BeyondConfig:
        """The :class:`~seggpt_lib.experiments.config.BeyondConfig` of one protocol's comparison."""
        return BeyondConfig(preset=self.preset, model=dict(self.model), weights="", steps=int(self.steps),  # scratch rows
                            budget_minutes=self.minutes, device=device, seed=seed, recipe=recipe,
                            eval_every=int(self.eval_every), val_pairs=int(self.val_pairs), top_k=int(self.top_k),
                            max_queries=self.max_queries, tune_steps=int(self.tune_steps),
                            calibration_objective=self.calibration_objective or None,
                            calibration_yield_target=float(self.calibration_yield_target))


# the quick CPU configuration (--quick; the test suite runs it): a handful of images per class,
# a 235 k-parameter model (32x32 per image) trained a few steps, a few prompt-tuning steps
QUICK = StudySettings(
    limit_per_class=6, preset="vit_nano",
    steps=3, minutes=None, eval_every=3, val_pairs=4, tune_steps=2, max_queries=3, top_k=2,
    train={"batch_size": 4, "warmup_steps": 1})
# the default (a lent GPU: benchmarks/gpu_study.sh)
FULL = StudySettings()


def study_settings(quick: bool = False, overrides: dict[str, Any] | None = None, device: str = "cpu") -> StudySettings:
    """:data:`QUICK` or :data:`FULL` with ``overrides`` (``train`` merged); on a CPU the loader
    processes are capped at cores - 2 unless ``train.num_workers`` is given (they compete with the
    training threads for the cores)."""
    st = (QUICK if quick else FULL).with_overrides(overrides)
    if str(CFG.resolve_device_name(device)).startswith("cpu") and "num_workers" not in ((overrides or {}).get("train") or {}):
        workers = st.train.get("num_workers", CFG.PIPELINE_RECIPE.get("num_workers", 0))
        st = dataclasses.replace(st, train={**st.train, "num_workers": min(int(workers), max(0, (os.cpu_count() or 1) - 2))})
    return st


def study_dirs(out: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The study's results folder and its work folder (``out/work`` unless given); refuses a source tree."""
    out = Path(out)
    if any((out / m).exists() for m in (".git", "pyproject.toml")):
        raise ValueError(f"{out} looks like a source tree; pick a results folder")
    work = Path(work_dir) if work_dir else RES.result_dirs(out)["work"]
    work.mkdir(parents=True, exist_ok=True)
    return out, work


def run_study(prepared: dict[str, Any], out: str | os.PathLike, settings: StudySettings, *, device: str = "cpu",
              seed: int = 0, quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The magnetic-tile study on data prepared by :func:`data_prep.study_data.prepare_study_data`
    (converted, split per protocol: seen classes 70/30 by class with a 10 % val carved from the 70;
    held-out classes never in training): :func:`compare_recipes` per protocol, every model trained
    from scratch and, from the same steps and recipe, from the pretrained checkpoint
    (``settings.pretrained``: the shipped one by default; :func:`study_checkpoint`), beside that
    checkpoint scored without fine-tuning; without the checkpoint one log line says so and the
    from-scratch rows run alone. Writes
    ``out/tables/study_<protocol>*.{csv,md}`` (``study_<protocol>_decision``: the raw and the
    calibrated rows, the decision chosen on the protocol's validation split only),
    ``out/figures/study_<protocol>.png`` (``_decision.png``: raw against calibrated PES, the
    paint-nothing floor dashed) and ``out/summary.json`` (rows, ``decision_rows``,
    ``operating_points``, ``calibrated_vs_floor``, settings, ``pretrained`` (the checkpoint, or why
    none), timings, machine)."""
    t_all = time.perf_counter()
    st = settings
    out = Path(out)
    RES.result_dirs(out)
    work = Path(prepared["work"])
    dev = CFG.resolve_device_name(device)
    times: dict[str, float] = {"convert_s": prepared["convert_s"]}
    recipe = {**CFG.PIPELINE_RECIPE, **st.train}
    bc = st.beyond(dev, seed, recipe)
    ckpt, missing = study_checkpoint(st.pretrained)
    if ckpt is None:
        log(missing)
    else:
        log(f"each model trains from scratch and from {ckpt['name']} ({_arch(ckpt['preset'], ckpt.get('model'))}), "
            f"the same steps; {ckpt['name']} is also scored without fine-tuning")
    results: dict[str, Any] = {}
    for proto, prep in prepared["protocols"].items():
        split_dir, eval_root, held = Path(prep["split_root"]), Path(prep["eval_root"]), prep["holdout_classes"]
        log(f"[{proto}] split in {prep['split_s']:.1f} s" + (f"; held-out classes {held}" if held else ""))
        name = f"study_{proto}"
        title = ("Magnetic tile, seen classes (70/30 split by class)" if proto == "seen" else
                 f"Magnetic tile, held-out classes {', '.join(held)} (never in training)")
        res = compare_recipes(split_dir, bc, eval_root=eval_root, work_dir=work / f"compare_{proto}", results_dir=out,
                              table_name=name, title=title, pretrained=ckpt, label_init=True,
                              note=f"{missing[:1].upper()}{missing[1:]}." if ckpt is None else "",
                              log=lambda m, p=proto: log(f"[{p}] {m}"))
        times[f"{proto}_s"] = prep["split_s"] + res["seconds"]
        tab = res["table"]
        fig = V.bar_chart(tab.assign(row=[f"{model_short(r)} · {r['prompt']}" if r["recipe"] != "baseline" else
                                          r["prompt"] for r in tab.to_dict("records")]), "row",
                          ["mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES"], title=title, rotate=30)
        RES.save_figure(fig, out, name, show=False)
        dec = res["decision"]
        if len(dec):
            RES.save_figure(decision_figure(dec, title=f"{title}: raw and calibrated on val"), out, f"{name}_decision",
                            show=False)
            log(f"[{proto}] {floor_sentence(dec)}")
        results[proto] = {"holdout_classes": held, "notes": res["notes"], "rows": headline_rows(tab),
                          "decision_rows": decision_rows(dec), "operating_points": operating_point_records(res),
                          "calibrated_vs_floor": floor_summary(dec),
                          "training": json.loads(res["training"].to_json(orient="records")),
                          "counts": DS.class_counts(eval_root).to_dict("records"), "seconds": res["seconds"]}
    times["total_s"] = prepared["convert_s"] + time.perf_counter() - t_all
    summary = {
        "study": "magnetic_tile", "quick": bool(quick), "data": _portable_path(Path(prepared["source"])), "device": dev,
        "seed": seed, "settings": dataclasses.asdict(st), "recipe": recipe,
        "pretrained": ({"available": False, "message": missing} if ckpt is None else
                       {"available": True, "weights": _portable_path(Path(ckpt["weights"])), "name": ckpt["name"],
                        "preset": ckpt["preset"], "model": ckpt.get("model") or {}, "steps": ckpt.get("steps"),
                        "sha256": ckpt.get("sha256"), "study_preset": st.preset,
                        "same_architecture": _arch(ckpt["preset"], ckpt.get("model")) == _arch(st.preset, st.model)}),
        "protocols": results, "timings_s": times,
        "machine": machine_info(dev), "git_commit": REP.git_commit(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "summary.json").write_text(json.dumps(RES.jsonable(summary), indent=2) + "\n")
    log(f"study done in {times['total_s']:.1f} s: {out / 'summary.json'}")
    return summary
