"""Notebooks 03/04's calls: the original's published figures, the evaluated model, prompt mappings, predictions scored per pair."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from seggpt_lib.data.layout import read_label, read_rgb
from seggpt_lib.eval.calibration import PairScore, calibrate, catch_yield_curve, collect_pairs, pairs_summary
from seggpt_lib.eval.decision import (
    OPERATING_POINT_FILE,
    DecisionConfig,
    OperatingPoint,
    operating_point_beside,
    save_operating_point,
)
from seggpt_lib.eval.mapping import build_mapping
from seggpt_lib.eval.metrics import CATCH_IOU, KINDS, YIELD_RESPONSE, PairResult, auroc, evaluate
from seggpt_lib.eval.scoring import Folder, ScoringConfig, score_mapping
from seggpt_lib.experiments import viz
from seggpt_lib.experiments.config import PipelineError, resolve_preset, resolve_weights
from seggpt_lib.experiments.dataset import scan_index, split_roots
from seggpt_lib.experiments.results import read_fragment, result_dirs
from seggpt_lib.model.checkpoint import build_from_checkpoint
from seggpt_lib.predict.predictor import SegGPTPredictor
from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD
from seggpt_lib.utils.device import resolve_device_name, resolve_precision

# ------------------------------------------------------------------------------------------
# the original project's published figures (its README: 11 VISION queries, one per defect type, grid 2)
# ------------------------------------------------------------------------------------------
PUBLISHED: dict[str, Any] = {
    "grid_miou": {1: 0.173, 2: 0.538, 4: 0.327},
    "positive_miou": 0.541,
    "catch_rate": 0.91,  # 10 of 11
    "negative_miou": 0.527,
    "yield_rate": 0.182,  # 2 of 11
    "pes": 0.546,
    "grid": 2,
    "queries": 11,
}
PUBLISHED_PER_IMAGE: list[tuple[str, float, float, float]] = [
    ("front_000925", 0.843, 0.858, 0.000719),
    ("impurities_000045", 0.777, 0.782, 0.001883),
    ("mouse_bite_000518", 0.424, 0.422, 0.000169),
    ("open_circuit_000061", 0.562, 0.489, 0.000237),
    ("Porosity_000925", 0.419, 0.382, 0.000706),
    ("RCS_000081", 0.623, 0.606, 0.000431),
    ("short_000081", 0.608, 0.624, 0.000596),
    ("spur_000045", 0.508, 0.481, 0.000362),
    ("spurious_copper_000497", 0.609, 0.600, 0.000482),
    ("thunderbolt_000925", 0.534, 0.526, 0.021971),
    ("torn_apart_000045", 0.044, 0.032, 0.000618),
]


# ------------------------------------------------------------------------------------------
# 03 / 04: evaluation
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalModel:
    """A predictor and what it was built from."""

    predictor: Any
    weights: str
    preset: str
    model: dict[str, Any]
    mean: list[float]
    std: list[float]
    device: str
    precision: str

    def describe(self) -> str:
        return (f"{self.preset}{' ' + json.dumps(self.model) if self.model else ''} from {self.weights} "
                f"on {self.device} ({self.precision})")


def load_eval_model(results_dir: str | os.PathLike, weights: str = "", preset: str = "auto", model: dict | None = None,
                    device: str = "cpu", precision: str = "auto", max_batch: int = 64,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    defect_color: Sequence[int] | None = None) -> EvalModel:
    """The model to evaluate: ``weights`` (official, HF or ours), or, when empty, what notebook
    02 produced (its fragment: weights, architecture, normalisation, the fixed defect colour
    it was trained with). The prompt masks are painted in ``defect_color`` (default white).
    ``weights`` "pretrained": the shipped pretrained checkpoint."""

    weights = resolve_weights(weights)
    if not weights:
        frag = read_fragment(results_dir, "02_training")
        weights, preset, model = frag["weights"], frag["preset"], frag.get("model") or {}
        mean, std = mean or frag.get("mean"), std or frag.get("std")
        defect_color = defect_color or frag.get("defect_color")
    mean = list(mean or IMAGENET_MEAN)
    std = list(std or IMAGENET_STD)
    name, ov = resolve_preset(weights, preset, model)
    net = build_from_checkpoint(weights, preset=name, **ov)
    dev = resolve_device_name(device)
    prec = resolve_precision(precision, dev)
    extra = {"defect_color": tuple(int(c) for c in defect_color)} if defect_color else {}
    pred = SegGPTPredictor(net, device=dev, precision=prec, mean=mean, std=std, max_batch=max_batch, **extra)
    return EvalModel(pred, str(weights), name, ov, mean, std, dev, prec)


def eval_roots(split_root: str | os.PathLike) -> tuple[Path, Path]:
    """(query root = test split, prompt root = train split)."""
    roots = split_roots(split_root)
    if "test" not in roots or "train" not in roots:
        raise PipelineError(f"{split_root}: needs train/ and test/ splits")
    return roots["test"], roots["train"]


def auto_work_size(query_root: str | os.PathLike, model_hw: Sequence[int], cap: int = 1024) -> int:
    """The canvas for tiling: the queries' median longer side, at most ``cap``, at least the model size."""

    idx = scan_index(Path(query_root))
    sides = []
    for i in range(len(idx)):
        h, w = int(idx.heights[i]), int(idx.widths[i])
        if h <= 0 or w <= 0:
            with Image.open(idx.image_path(i)) as im:
                w, h = im.size
        sides.append(max(h, w))
    med = int(np.median(sides)) if sides else cap
    return int(max(min(med, cap), max(model_hw)))


def work_size_of(work_size: int | str, query_root: str | os.PathLike, em: EvalModel) -> int:
    return auto_work_size(query_root, em.predictor.image_size) if work_size == "auto" else int(work_size)


def _limit(mapping: dict[str, list[str]], classes: dict[str, str], n: int | None) -> dict[str, list[str]]:
    """At most ``n`` queries, taken round-robin over the classes (sorted), so every class shows."""
    if not n or len(mapping) <= n:
        return mapping
    by_cls: dict[str, list[str]] = {}
    for q in sorted(mapping):
        by_cls.setdefault(classes.get(q, ""), []).append(q)
    keep: list[str] = []
    while len(keep) < n:
        for c in sorted(by_cls):
            if by_cls[c] and len(keep) < n:
                keep.append(by_cls[c].pop(0))
    return {q: mapping[q] for q in sorted(keep)}


def prompt_mapping(split_root: str | os.PathLike, kind: str, k: int = 1, seed: int = 0,
                   max_queries: int | None = None) -> dict[str, list[str]]:
    """``{test query: [k train prompts]}`` of ``kind`` (positive, negative, free); empty when the
    test split has no such query or too few prompts (a ``ValueError`` from
    :func:`seggpt_lib.eval.mapping.build_mapping` is re-raised for positive mappings)."""

    q_root, p_root = eval_roots(split_root)
    try:
        m = build_mapping(q_root, p_root, kind, k=k, seed=seed)
    except ValueError:
        if kind == "positive":
            raise
        return {}
    idx = scan_index(q_root)
    classes = {f: idx.class_of(i) for i, f in enumerate(idx.files)}
    return _limit(m, classes, max_queries)


def _label_mask(path: Path) -> np.ndarray:
    return read_label(path) != 0


def index_folder(index) -> Folder:
    """A scanned split as a :class:`seggpt_lib.eval.scoring.Folder` (its classes; labels read as
    the data pipeline reads them, non-zero = defect)."""
    return Folder.of_index(index, read_mask=_label_mask)


def predict_mapping(em: EvalModel, split_root: str | os.PathLike, mapping: dict[str, list[str]], kind: str,
                    grid: int = 1, top_k: int = 1, work_size: int | str = "auto", tile_pairing: str = "aligned",
                    keep: bool = False, log: Callable[[str], None] | None = None):
    """Predict every query of ``mapping`` (``grid x grid`` tiles) from its first ``top_k`` prompts
    (:func:`seggpt_lib.eval.scoring.score_mapping`); returns a list of
    :class:`seggpt_lib.eval.metrics.PairResult` (extra columns ``split`` = the grid, ``top_k``,
    ``seconds``) and, with ``keep``, the :class:`~seggpt_lib.predict.predictor.Prediction` of
    each query (raw kept)."""

    q_root, p_root = eval_roots(split_root)
    ws = work_size_of(work_size, q_root, em)
    cfg = ScoringConfig(grid=grid, top_k=top_k, work_size=ws, tile_pairing=tile_pairing, keep_raw=keep,
                        extra={"grid": grid, "top_k": top_k})
    records, kept = [], {}
    t_all = time.perf_counter()
    for s in score_mapping(em.predictor, index_folder(scan_index(q_root)), {q: mapping[q] for q in sorted(mapping)},
                           kind, cfg, prompts=index_folder(scan_index(p_root))):
        records.append(s.result)
        if keep:
            kept[s.result.query] = s.prediction
    if log:
        log(f"{kind} grid {grid} top-{top_k}: {len(records)} queries in {time.perf_counter() - t_all:.1f} s")
    return (records, kept) if keep else records


def grid_ablation(em: EvalModel, split_root: str | os.PathLike, grids: Sequence[int] = (1, 2, 4), top_k: int = 1,
                  extra_top_k: int = 0, eval_grid: int = 2, work_size: int | str = "auto", tile_pairing: str = "aligned",
                  catch_iou: float = CATCH_IOU, seed: int = 0, max_queries: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """mIoU by tiling grid (``grid x grid`` tiles) on the positive pairs of the test split.

    Returns ``table`` (one row per (grid, top_k), the grid in column ``split`` as the original
    named it: queries, mIoU, catch rate, the original's mIoU at that grid, seconds per query;
    the ``extra_top_k`` row is at ``eval_grid``), ``per_class`` (class x grid mean IoU, columns
    ``split_<grid>``), ``per_image`` (every scored pair), ``mapping`` and ``work_size``."""


    k_max = max(top_k, extra_top_k or 0)
    try:
        mapping = prompt_mapping(split_root, "positive", k=k_max, seed=seed, max_queries=max_queries)
    except ValueError as e:
        if k_max == top_k:
            raise
        log(f"no top-{extra_top_k} row: {e}")
        extra_top_k, k_max = 0, top_k
        mapping = prompt_mapping(split_root, "positive", k=top_k, seed=seed, max_queries=max_queries)
    runs = [(int(g), int(top_k)) for g in grids]
    if extra_top_k and extra_top_k != top_k:
        runs.append((int(eval_grid), int(extra_top_k)))
    rows, per_image = [], []
    q_root, _ = eval_roots(split_root)
    ws = work_size_of(work_size, q_root, em)
    for s, k in runs:
        recs = predict_mapping(em, split_root, mapping, "positive", grid=s, top_k=k, work_size=ws,
                               tile_pairing=tile_pairing, log=log)
        table, summ = evaluate(recs, catch_iou=catch_iou)
        per_image.append(table)
        rows.append({
            "grid": s, "top_k": k, "queries": summ["n_positive"], "mIoU": summ["miou"], "catch_rate": summ["catch_rate"],
            "catches": summ["n_catch"], "original_mIoU": PUBLISHED["grid_miou"].get(s, math.nan) if k == 1 else math.nan,
            "s_per_query": float(table["seconds"].mean()) if len(table) else math.nan,
        })
    per_image_df = pd.concat(per_image, ignore_index=True)
    top = per_image_df[per_image_df["top_k"] == top_k]
    per_class = top.pivot_table(index="class", columns="grid", values="iou", aggfunc="mean")
    per_class.columns = [f"grid_{c}" for c in per_class.columns]
    per_class = per_class.reset_index()
    return {"table": pd.DataFrame(rows), "per_class": per_class, "per_image": per_image_df, "mapping": mapping,
            "work_size": ws, "tile_pairing": tile_pairing}


def operating_point_path(results_dir: str | os.PathLike, weights: str | os.PathLike) -> Path:
    """Where the pipeline writes the operating point of ``weights``: ``operating_point.json`` beside
    them (:func:`~seggpt_lib.eval.decision.operating_point_beside`) when that folder lies inside
    ``results_dir`` (weights the pipeline trained), else ``results_dir/work/operating_point.json``:
    never into a folder of the user's."""
    beside = operating_point_beside(weights)
    try:
        beside.parent.resolve().relative_to(Path(results_dir).resolve())
        return beside
    except ValueError:
        return result_dirs(results_dir)["work"] / OPERATING_POINT_FILE


def calibrate_operating_point(em: EvalModel, val_root: str | os.PathLike, *, grid: int = 2, top_k: int = 1,
                              work_size: int = 1024, tile_pairing: str = "aligned", objective: str = "max_pes",
                              yield_target: float = 0.6, seed: int = 0, catch_iou: float = CATCH_IOU,
                              yield_response: float = YIELD_RESPONSE,
                              log: Callable[[str], None] = print) -> OperatingPoint | None:
    """The line's decision chosen on the dataset folder ``val_root`` ALONE (the validation split):
    its positive, negative and defect-free pairs (queries and prompts from it,
    :func:`~seggpt_lib.eval.calibration.collect_pairs`) predicted as the test pairs will be
    (``grid``, ``top_k``, ``work_size``, ``tile_pairing``), then
    :func:`~seggpt_lib.eval.calibration.calibrate` for ``objective``. ``validation`` of the point
    also holds the AUCs of its catch / yield curve on those pairs. None (and a log line) when
    the folder has no positive pairs to calibrate on."""
    cfg = ScoringConfig(grid=grid, top_k=top_k, work_size=int(work_size), tile_pairing=tile_pairing)
    settings = {"val_dir": str(val_root), "weights": em.weights, "grid": grid, "top_k": top_k,
                "work_size": int(work_size), "tile_pairing": tile_pairing, "seed": seed,
                "defect_color": [int(c) for c in em.predictor.defect_color]}
    return calibrate_collected(lambda: collect_pairs(em.predictor, val_root, cfg, k=top_k, seed=seed), settings,
                               objective=objective, yield_target=yield_target, catch_iou=catch_iou,
                               yield_response=yield_response, what=f"on {val_root}", log=log)


def calibrate_collected(collect: Callable[[], list], settings: dict[str, Any], *, objective: str,
                        yield_target: float, catch_iou: float, yield_response: float, what: str,
                        log: Callable[[str], None] = print,
                        errors: tuple[type[BaseException], ...] = (ValueError,)) -> OperatingPoint | None:
    """Collect the validation pairs (``collect()``), :func:`~seggpt_lib.eval.calibration.calibrate`
    them for ``objective`` and add the AUCs of the chosen point's catch / yield curve, the pairs'
    counts and the seconds to its ``validation``; None (and a log line "no calibration
    ``what``") when collecting or calibrating raises one of ``errors``."""
    t0 = time.perf_counter()
    try:
        pairs = collect()
        point = calibrate(pairs, objective, yield_target, catch_iou=catch_iou, yield_response=yield_response,
                          settings=settings)
    except errors as e:
        log(f"no calibration {what}: {e}")
        return None
    curve = catch_yield_curve(pairs, point.default, catch_iou=catch_iou, yield_response=yield_response)
    point.validation.update(auc_negative=curve["auc_negative"], auc_free=curve["auc_free"],
                            pairs=pairs_summary(pairs), seconds=time.perf_counter() - t0)
    log(f"calibrated {what} ({len(pairs)} pairs, {objective}) in {time.perf_counter() - t0:.1f} s: "
        + json.dumps(point.default.to_dict()))
    return point


def pair_evaluation(em: EvalModel, split_root: str | os.PathLike, grid: int = 2, top_k: int = 1,
                    work_size: int | str = "auto", tile_pairing: str = "aligned", catch_iou: float = CATCH_IOU,
                    yield_response: float = YIELD_RESPONSE, seed: int = 0, max_queries: int | None = None,
                    calibration_objective: str | None = "max_pes", calibration_yield_target: float = 0.6,
                    results_dir: str | os.PathLike | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Positive prompts, negative prompts and defect-free queries of the test split, ``grid x grid``
    tiles, each pair scored raw (the snapped mask) and, with ``calibration_objective``, with the
    line's decision chosen on the VALIDATION split (:func:`calibrate_operating_point`; the test
    split is not read for it), in one pass.

    Returns ``table`` (every pair, :func:`seggpt_lib.eval.metrics.evaluate`'s columns, the
    ``calibrated_*`` ones and ``consistency``), ``summary`` (its summary, with the paint-nothing /
    paint-everything baselines and ``calibrated``), ``operating_point`` (or None) and
    ``operating_point_path`` (written there when ``results_dir`` is given:
    :func:`operating_point_path`), ``curve`` (:func:`~seggpt_lib.eval.calibration.catch_yield_curve`
    of the test pairs under the calibrated decision, per prompt class too), ``raw_curve`` (under
    the raw decision), ``mappings``, ``work_size``."""

    q_root, p_root = eval_roots(split_root)
    ws = work_size_of(work_size, q_root, em)
    point, point_path = None, None
    if calibration_objective:
        val_root = split_roots(split_root).get("val")
        if val_root is None:
            log(f"{split_root}: no val/ split: no calibration")
        else:
            point = calibrate_operating_point(em, val_root, grid=grid, top_k=top_k, work_size=ws,
                                              tile_pairing=tile_pairing, objective=calibration_objective,
                                              yield_target=calibration_yield_target, seed=seed, catch_iou=catch_iou,
                                              yield_response=yield_response, log=log)
        if point is not None and results_dir is not None:
            point_path = save_operating_point(point, operating_point_path(results_dir, em.weights))
    cfg = ScoringConfig(grid=grid, top_k=top_k, work_size=ws, tile_pairing=tile_pairing,
                        extra={"grid": grid, "top_k": top_k}, operating_point=point, consistency=True)
    queries, prompts = index_folder(scan_index(q_root)), index_folder(scan_index(p_root))
    records, calibrated, pairs, mappings = [], [], [], {}
    for kind in KINDS:
        m = prompt_mapping(split_root, kind, k=top_k, seed=seed, max_queries=max_queries)
        mappings[kind] = m
        if not m:
            log(f"no {kind} pairs in the test split")
            continue
        t0 = time.perf_counter()
        for s in score_mapping(em.predictor, queries, {q: m[q] for q in sorted(m)}, kind, cfg, prompts=prompts):
            c = s.prediction.consistency
            s.result.extra["consistency"] = math.nan if c is None else float(c)
            records.append(s.result)
            if s.calibrated is not None:
                calibrated.append(s.calibrated)
            gt = None if s.result.gt is None else np.asarray(s.result.gt).astype(bool)
            pairs.append(PairScore(s.result.query, s.result.kind, s.result.query_class, s.prompt_class,
                                   np.asarray(s.prediction.score, dtype=np.float32), gt, c))
        log(f"{kind} grid {grid} top-{top_k}: {len(m)} queries in {time.perf_counter() - t0:.1f} s")
    table, summary = evaluate(records, catch_iou=catch_iou, yield_response=yield_response,
                              calibrated=calibrated if point is not None else None)
    kw = dict(catch_iou=catch_iou, yield_response=yield_response)
    curve = catch_yield_curve(pairs, point.default if point is not None else DecisionConfig(), by_class=True, **kw)
    raw_curve = catch_yield_curve(pairs, DecisionConfig(), **kw)
    return {"table": table, "summary": summary, "operating_point": point, "operating_point_path": point_path,
            "curve": curve, "raw_curve": raw_curve, "mappings": mappings, "work_size": ws, "tile_pairing": tile_pairing}


def decision_table(raw: dict[str, Any], calibrated: dict[str, Any] | None = None,
                   baselines: dict[str, Any] | None = None):
    """The line's decision in rows: the model raw (snapped masks) and calibrated (the operating
    point chosen on validation), the paint-nothing / paint-everything baselines and the original's
    published point; columns catch rate, yield rate (negative prompts), defect-free yield, PES."""
    cols = ("catch_rate", "yield_rate", "free_yield_rate", "pes")
    b = baselines or {}
    rows = [("model, raw (snapped mask)", raw), ("model, calibrated on val", calibrated),
            ("paint nothing", b.get("paint_nothing")), ("paint everything", b.get("paint_everything")),
            ("original (published)", {k: PUBLISHED.get(k, math.nan) for k in cols})]
    out = [{"row": name, **{("PES" if c == "pes" else c): (v or {}).get(c, math.nan) for c in cols}}
           for name, v in rows if v is not None]
    df = pd.DataFrame(out)
    return df.astype({c: float for c in df.columns if c != "row"})


def pretrained_without_finetuning(split_root: str | os.PathLike, finetuned: dict[str, Any] | None = None, *,
                                  weights: str = "pretrained", device: str = "cpu", precision: str = "auto",
                                  max_batch: int = 64, log: Callable[[str], None] = print,
                                  **evaluation: Any) -> dict[str, Any] | None:
    """SegGPT as it is used: the shipped pretrained in-context checkpoint, *not* fine-tuned,
    prompted one-shot on the test split's defect classes, none of which it ever saw (it was
    pretrained on generic shapes only). Scored on the same pairs and with the same settings
    (``evaluation``: :func:`pair_evaluation`'s keyword arguments, without ``results_dir``: its
    operating point is calibrated on the validation split and kept in memory, never written over
    the fine-tuned model's) as the fine-tuned model's ``finetuned`` summary.

    Returns ``summary`` (with ``calibrated``), ``table`` (rows: pretrained / fine-tuned, raw /
    calibrated, paint nothing; catch, yield, defect-free yield, PES, mIoU) and ``weights``;
    None (said in one line) when the shipped checkpoint is absent."""
    from seggpt_lib.experiments.pretrain import PretrainedError
    try:
        em = load_eval_model("", weights=weights, device=device, precision=precision, max_batch=max_batch)
    except (PipelineError, PretrainedError) as e:
        log(f"no comparison without fine-tuning: {e}")
        return None
    log(f"without fine-tuning: {em.describe()}")
    ev = pair_evaluation(em, split_root, results_dir=None, log=log, **evaluation)
    cols = ("miou", "catch_rate", "yield_rate", "free_yield_rate", "pes")

    def row(model: str, decision: str, s: dict[str, Any] | None) -> dict[str, Any]:
        return {"model": model, "decision": decision,
                **{("PES" if c == "pes" else "mIoU" if c == "miou" else c): (s or {}).get(c, math.nan) for c in cols}}

    rows = [row("pretrained, no fine-tuning", "raw", ev["summary"])]
    if ev["summary"].get("calibrated"):
        rows.append(row("pretrained, no fine-tuning", "calibrated", ev["summary"]["calibrated"]))
    if finetuned:
        rows.append(row("fine-tuned", "raw", finetuned))
        if finetuned.get("calibrated"):
            rows.append(row("fine-tuned", "calibrated", finetuned["calibrated"]))
    nothing = ev["summary"].get("baselines", {}).get("paint_nothing")
    if nothing:
        rows.append(row("paint nothing", "none", nothing))
    table = pd.DataFrame(rows)
    return {"summary": ev["summary"], "table": table.astype({c: float for c in table.columns
                                                             if c not in ("model", "decision")}),
            "weights": em.weights, "operating_point": ev["operating_point"]}


def decision_points(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The points of the catch / yield figure (:func:`seggpt_lib.experiments.viz.catch_yield_figure`)
    from :func:`pair_evaluation`'s ``summary``: raw, calibrated (when there), the original's
    published point and the two trivial baselines as measured on the same pairs."""
    keys = ("catch_rate", "yield_rate", "free_yield_rate")
    b = summary.get("baselines", {})
    pts = {"raw": {k: summary.get(k) for k in keys}}
    if summary.get("calibrated"):
        pts["calibrated"] = {k: summary["calibrated"].get(k) for k in keys}
    pts["original"] = {"catch_rate": PUBLISHED["catch_rate"], "yield_rate": PUBLISHED["yield_rate"]}
    for name in ("paint_nothing", "paint_everything"):
        if name in b:
            pts[name] = {k: b[name].get(k) for k in keys}
    return pts


def operating_point_text(point: OperatingPoint | dict[str, Any] | None) -> str:
    """One line saying which decision was chosen (objective, per-pixel threshold, min area, image
    score and threshold, consistency threshold, classes with their own point)."""
    if point is None:
        return "no operating point (no validation split to calibrate on): raw masks only"
    d = point.to_dict() if isinstance(point, OperatingPoint) else point
    c = d["default"]
    obj = d.get("objective", "max_pes")
    if obj == "max_catch_at_yield" and d.get("yield_target") is not None:
        obj += f" (yield target {d['yield_target']:g})"
    parts = [f"pixel score >= {c['pixel_threshold']:g}", f"components >= {c['min_area']} px",
             f"{c['image_score']} >= {c['image_threshold']:.4g}"]
    if c.get("consistency_threshold") is not None:
        parts.append(f"prompt consistency >= {c['consistency_threshold']:.3f}")
    per = d.get("per_class") or {}
    own = f"; {len(per)} prompt class(es) with their own point ({', '.join(sorted(per))})" if per else ""
    n = (d.get("validation") or {}).get("n_pairs")
    return (f"operating point ({obj}, chosen on {n} validation pairs): a defect when "
            + ", ".join(parts) + own + ".")


def operating_point_record(point: OperatingPoint | None, path: str | os.PathLike | None,
                           results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the summary keeps of an operating point: the decision(s), objective, where it was
    written (relative to ``results_dir`` when inside it) and its validation figures."""
    if point is None:
        return {}
    d = point.to_dict()
    v = d.get("validation") or {}
    label = None
    if path is not None:
        label = str(path)
        if results_dir is not None:
            try:
                label = str(Path(path).resolve().relative_to(Path(results_dir).resolve()))
            except ValueError:
                pass
    return {"path": label, "objective": d["objective"], "yield_target": d["yield_target"], "default": d["default"],
            "per_class": d["per_class"], "settings": d["settings"],
            "validation": {k: v.get(k) for k in ("n_pairs", "pairs", "raw", "calibrated", "auc_negative", "auc_free",
                                                 "seconds")}}


def curve_record(curve: dict[str, Any], raw_curve: dict[str, Any] | None = None) -> dict[str, Any]:
    """The AUCs of :func:`pair_evaluation`'s catch / yield curves (the test pairs): under the
    calibrated decision (``auc_negative``, ``auc_free``, per prompt class) and the raw one."""
    out = {"auc_negative": curve.get("auc_negative"), "auc_free": curve.get("auc_free")}
    if raw_curve is not None:
        out.update(raw_auc_negative=raw_curve.get("auc_negative"), raw_auc_free=raw_curve.get("auc_free"))
    out["per_class"] = {c: {"auc_negative": v.get("auc_negative"), "auc_free": v.get("auc_free")}
                        for c, v in (curve.get("per_class") or {}).items()}
    return out


def consistency_separation(table, good: float = 0.7, weak: float = 0.6) -> dict[str, Any]:
    """Does the prompt consistency (column ``consistency``) separate positive from negative pairs?
    ``auroc``: the chance that a positive pair scores higher than a negative one (ties count
    half; 0.5 = no separation), ``separates`` (AUROC >= ``good``), the finite ``positive`` /
    ``negative`` / ``free`` values and a ``sentence`` saying so."""
    def vals(kind: str) -> np.ndarray:
        if "consistency" not in table or "kind" not in table:
            return np.zeros(0)
        v = table.loc[table["kind"] == kind, "consistency"].to_numpy(dtype=float)
        return v[np.isfinite(v)]

    pos, neg, free = vals("positive"), vals("negative"), vals("free")
    separation = auroc(pos, neg)
    n = f"{pos.size} positive and {neg.size} negative pairs with a value"
    if math.isnan(separation):
        sentence = f"The prompt consistency cannot be judged here ({n})."
    elif separation >= good:
        sentence = (f"The prompt consistency separates positive from negative pairs: AUROC {separation:.2f} "
                    f"(0.5 = chance; {n}), so a consistency threshold can withdraw answers to a wrong prompt.")
    elif separation >= weak:
        sentence = (f"The prompt consistency separates positive from negative pairs only weakly: AUROC {separation:.2f} "
                    f"(0.5 = chance; {n}).")
    else:
        sentence = (f"The prompt consistency does not separate positive from negative pairs for this model: "
                    f"AUROC {separation:.2f} (0.5 = chance; {n}), so it cannot tell a wrong prompt apart.")
    return {"auroc": separation, "separates": bool(separation >= good) if not math.isnan(separation) else False,
            "n_positive": int(pos.size), "n_negative": int(neg.size), "n_free": int(free.size),
            "positive": pos, "negative": neg, "free": free, "sentence": sentence}


def per_image_tables(table) -> dict[str, Any]:
    """The per-image tables of 04: ``positive`` (IoU, catch), ``negative`` (IoU, response, yield),
    ``free`` (response, yield) and ``side_by_side`` (the original's layout: query, positive IoU,
    negative IoU, negative response rate)."""

    cols = {"positive": ["file", "class", "prompts", "iou", "catch", "pred_pixels", "gt_pixels"],
            "negative": ["file", "class", "prompts", "iou", "response_rate", "yield", "pred_pixels"],
            "free": ["file", "class", "prompts", "response_rate", "yield", "pred_pixels"]}
    extra = {"positive": ["calibrated_iou", "calibrated_catch"], "negative": ["calibrated_response_rate", "calibrated_yield"],
             "free": ["calibrated_response_rate", "calibrated_yield"]}
    cols = {k: c + [x for x in extra[k] if x in table] for k, c in cols.items()}
    out = {k: table[table["kind"] == k][c].reset_index(drop=True) for k, c in cols.items()}
    pos = out["positive"][["file", "class", "iou"]].rename(columns={"iou": "positive_iou"})
    neg = out["negative"][["file", "iou", "response_rate"]].rename(
        columns={"iou": "negative_iou", "response_rate": "negative_response_rate"})
    out["side_by_side"] = pd.merge(pos, neg, on="file", how="outer").sort_values("file").reset_index(drop=True)
    return out


def published_per_image():

    return pd.DataFrame(PUBLISHED_PER_IMAGE, columns=["query", "positive_iou", "negative_iou", "negative_response_rate"])


def comparison_table(summary: dict[str, Any], grid_miou: dict[int, float] | None = None):
    """Our headline figures (``ours``: the raw masks; ``calibrated``: with the line's decision, when
    the summary has it) beside the original's published ones and the trivial baselines."""

    b = summary.get("baselines", {})
    nothing, everything = b.get("paint_nothing", {}), b.get("paint_everything", {})
    cal = summary.get("calibrated")
    rows = []
    for s, v in sorted((grid_miou or {}).items()):
        rows.append({"metric": f"mIoU, grid {s} (positive)", "ours": v, "calibrated": math.nan,
                     "original": PUBLISHED["grid_miou"].get(int(s), math.nan),
                     "paint_nothing": nothing.get("miou", math.nan), "paint_everything": everything.get("miou", math.nan)})
    for key, label in (("miou", "positive mIoU"), ("catch_rate", "catch rate"), ("negative_miou", "negative mIoU"),
                       ("yield_rate", "yield rate (negative prompts)"), ("free_yield_rate", "defect-free yield"),
                       ("pes", "PES")):
        pub = PUBLISHED.get({"miou": "positive_miou"}.get(key, key), math.nan)
        rows.append({"metric": label, "ours": summary.get(key, math.nan), "calibrated": (cal or {}).get(key, math.nan),
                     "original": pub, "paint_nothing": nothing.get(key, math.nan),
                     "paint_everything": everything.get(key, math.nan)})
    df = pd.DataFrame(rows, columns=["metric", "ours", "calibrated", "original", "paint_nothing", "paint_everything"])
    return df if cal else df.drop(columns=["calibrated"])


def example_rows(em: EvalModel, split_root: str | os.PathLike, table, mapping: dict[str, list[str]], n: int = 3,
                 worst: bool = False, grid: int = 1, top_k: int = 1, work_size: int | str = "auto",
                 tile_pairing: str = "aligned", kind: str = "positive", by: str = "iou") -> list[tuple[list[np.ndarray], str]]:
    """Five-panel rows (see :func:`seggpt_lib.experiments.viz.prediction_panel_row`) of the ``n`` best (or,
    with ``worst``, lowest) pairs of ``kind`` in ``table`` by column ``by`` (``iou``, or
    ``response_rate`` where highest is "best" = strongest response), re-predicted with the raw
    output kept. Titles give class, query, prompt, IoU and response rate."""

    t = table[table["kind"] == kind] if "kind" in table else table
    t = t.dropna(subset=[by])
    if not len(t):
        return []
    t = t.sort_values([by, "file"], ascending=[worst, True]).head(n)
    sub = {q: mapping[q] for q in t["file"]}
    _, preds = predict_mapping(em, split_root, sub, kind, grid=grid, top_k=top_k, work_size=work_size,
                               tile_pairing=tile_pairing, keep=True)
    q_root, p_root = eval_roots(split_root)
    q_idx, p_idx = scan_index(q_root), scan_index(p_root)
    rows = []
    for q, score, resp in zip(t["file"], t["iou"], t["response_rate"]):
        qi, pi = q_idx.find(q), p_idx.find(mapping[q][0])
        img, gt = read_rgb(q_idx.image_path(qi)), read_label(q_idx.label_path(qi)) != 0
        pimg, pm = read_rgb(p_idx.image_path(pi)), read_label(p_idx.label_path(pi)) != 0
        h = min(256, img.shape[0])
        size = (h, max(1, round(img.shape[1] * h / img.shape[0])))
        panels = viz.prediction_panel_row(img, gt, pimg, pm, preds[q], size=size)
        p_cls = p_idx.class_of(pi)
        rows.append((panels, f"{q_idx.class_of(qi)}: {Path(q).stem}, prompt {Path(mapping[q][0]).stem} ({p_cls})  "
                             f"IoU {score:.3f}, response {resp:.6f}"))
    return rows
