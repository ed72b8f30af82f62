"""Calibrate the line's decision (:mod:`seggpt_lib.eval.decision`) on the validation split.

::

    pairs = collect_pairs(predictor, "data/split/val", ScoringConfig(grid=2, top_k=1, work_size=256,
                                                                    tile_pairing="aligned"))
    point = calibrate(pairs, objective="max_catch_at_yield", yield_target=0.6)
    save_operating_point(point, operating_point_beside(weights))
    curve = catch_yield_curve(pairs, point.default, by_class=True)

:func:`collect_pairs` predicts positive, negative and defect-free pairs of ONE dataset folder
(queries and prompts both from it, never a query as its own prompt) once, keeping each pair's
score map, ground truth and prompt consistency. :func:`calibrate` then sweeps pixel threshold x
min area x image score x image threshold (x consistency threshold) in numpy and picks the
operating point for the objective:

* ``max_pes``: the highest PES (``0.5 catch + 0.5 yield``, yield on negative prompts, or on
  defect-free queries when there are no negative pairs);
* ``max_catch_at_yield``: the highest catch with negative yield >= ``yield_target`` and
  defect-free yield >= ``free_yield_target`` (default: ``yield_target``); when no point
  reaches them, the point closest to them (largest worst shortfall), marked ``feasible: false``.

Ties go to PES, then defect-free yield, then catch, then the simplest point (pixel threshold
nearest 0.5, smallest min area, lowest image threshold, no consistency check): deterministic.
A class of prompts with at least ``min_class_pairs`` positive and ``min_class_pairs`` negative
+ defect-free pairs gets its own point; the others use the global one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from seggpt_lib.eval.decision import (
    IMAGE_SCORES,
    DecisionConfig,
    OperatingPoint,
    decide,
    image_scores,
    keep_components,
)
from seggpt_lib.eval.mapping import build_mapping
from seggpt_lib.eval.metrics import CATCH_IOU, YIELD_RESPONSE
from seggpt_lib.eval.scoring import Folder, ScoringConfig, score_mapping

__all__ = [
    "OBJECTIVES",
    "CalibrationGrid",
    "PairScore",
    "calibrate",
    "catch_yield_curve",
    "collect_pairs",
    "decision_figures",
    "pairs_summary",
]

OBJECTIVES = ("max_pes", "max_catch_at_yield")


@dataclass
class PairScore:
    """One validation pair, predicted once: what every sweep point needs."""

    query: str
    kind: str  # positive | negative | free
    query_class: str
    prompt_class: str | None
    score: np.ndarray  # (H, W) float32 on 0..1
    gt: np.ndarray | None  # (H, W) bool
    consistency: float | None = None


@dataclass(frozen=True)
class CalibrationGrid:
    """The sweep: every combination of these (image thresholds: ``n_image_thresholds``
    quantiles of the observed image scores, plus 0; consistency thresholds: these quantiles
    of the positive pairs' consistency, plus none; ``()`` disables the consistency check)."""

    pixel_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    min_areas: tuple[int, ...] = (0, 16, 64, 256)
    image_scores: tuple[str, ...] = ("max_area", "mean_score")
    n_image_thresholds: int = 24
    consistency_quantiles: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)

    def __post_init__(self) -> None:
        bad = [s for s in self.image_scores if s not in IMAGE_SCORES]
        if bad:
            raise ValueError(f"unknown image scores {bad}; choose from {IMAGE_SCORES}")
        if not self.pixel_thresholds or not self.min_areas or not self.image_scores:
            raise ValueError("the calibration grid needs at least one pixel threshold, min area and image score")


# ------------------------------------------------------------------------------------------
# collecting
# ------------------------------------------------------------------------------------------
def collect_pairs(
    predictor: Any,
    root: str | Path,
    config: ScoringConfig | None = None,
    *,
    k: int = 1,
    seed: int = 0,
    kinds: Sequence[str] = ("positive", "negative", "free"),
    progress: bool | Callable[[int, int], None] = False,
) -> list[PairScore]:
    """Predict the positive, negative and defect-free pairs of the dataset folder ``root``
    (queries and prompts from it alone; mappings of :func:`~seggpt_lib.eval.mapping.build_mapping`
    with ``k`` prompts, ``seed``). A kind without queries (e.g. no defect-free images) is skipped."""
    root = Path(root)
    folder = Folder.of_dataset(root)
    cfg = replace(config or ScoringConfig(), consistency=True, operating_point=None, keep_raw=False)
    out: list[PairScore] = []
    for kind in kinds:
        try:
            mapping = build_mapping(root, root, kind, k=k, seed=seed)
        except ValueError as e:
            if "no " in str(e) and "query images" in str(e):
                continue
            raise
        for sp in score_mapping(predictor, folder, mapping, kind, cfg, prompts=folder, progress=progress,
                                desc=f"calibrate {kind}"):
            r = sp.result
            gt = None if r.gt is None else np.asarray(r.gt).astype(bool)
            out.append(PairScore(r.query, r.kind, r.query_class, sp.prompt_class,
                                 np.asarray(sp.prediction.score, dtype=np.float32), gt, sp.prediction.consistency))
    return out


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    """Per pair, for one (pixel threshold, min area): kept pixels, IoU, pixels, image scores."""

    area: np.ndarray
    iou: np.ndarray
    n_px: np.ndarray
    scores: dict[str, np.ndarray]


def _stats(pairs: Sequence[PairScore], pixel_threshold: float, min_area: int) -> _Stats:
    area, ious, n_px = [], [], []
    scores: dict[str, list[float]] = {s: [] for s in IMAGE_SCORES}
    for p in pairs:
        kept = keep_components(p.score >= pixel_threshold, min_area)
        a = int(kept.sum())
        area.append(a)
        n_px.append(kept.size)
        if p.gt is None:
            ious.append(math.nan)
        else:
            union = int((kept | p.gt).sum())
            ious.append(1.0 if union == 0 else int((kept & p.gt).sum()) / union)
        for name, v in image_scores(p.score, kept).items():
            scores[name].append(v)
    return _Stats(np.asarray(area, float), np.asarray(ious, float), np.asarray(n_px, float),
                  {k: np.asarray(v, float) for k, v in scores.items()})


def _mean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    return x.mean(axis=axis) if x.shape[axis] else np.full(x.shape[1:], np.nan)


def _rates(kinds: np.ndarray, st: _Stats, kept: np.ndarray, catch_iou: float, yield_response: float) -> dict[str, np.ndarray]:
    """Rates for every sweep column: ``kept`` is ``(P, M)`` (pair kept as defect at point m)."""
    has_gt = ~np.isnan(st.iou)
    pos = (kinds == "positive") & has_gt
    neg = (kinds == "negative") & has_gt
    free = (kinds == "free") & has_gt
    catch = kept & (np.nan_to_num(st.iou)[:, None] >= catch_iou)
    yields = ~kept | ((st.area / np.maximum(st.n_px, 1))[:, None] < yield_response)
    c, yn, yf = _mean(catch[pos]), _mean(yields[neg]), _mean(yields[free])
    y = yn if neg.any() else yf
    return {"catch_rate": c, "yield_rate": yn, "free_yield_rate": yf, "pes": 0.5 * c + 0.5 * y}


def _thresholds(values: np.ndarray, n: int) -> np.ndarray:
    v = values[values > 0]
    if not v.size or n <= 0:
        return np.zeros(1)
    q = np.quantile(v, np.linspace(0.0, 1.0, n)) if v.size > n else np.unique(v)
    return np.unique(np.concatenate([[0.0], q]))


def _objective(r: dict[str, np.ndarray], objective: str, yield_target: float | None,
               free_yield_target: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(feasible, primary value) per sweep column."""
    pes = np.nan_to_num(r["pes"], nan=-1.0)
    if objective == "max_pes":
        return np.ones(pes.shape, bool), pes
    shortfall = np.zeros(pes.shape)
    for key, target in (("yield_rate", yield_target), ("free_yield_rate", free_yield_target)):
        if target is not None and not np.all(np.isnan(r[key])):
            shortfall = np.minimum(shortfall, np.nan_to_num(r[key], nan=1.0) - target)
    feasible = shortfall >= 0
    return feasible, np.where(feasible, np.nan_to_num(r["catch_rate"], nan=0.0), shortfall)


def _sweep(pairs: Sequence[PairScore], grid: CalibrationGrid, objective: str, yield_target: float | None,
           free_yield_target: float | None, catch_iou: float, yield_response: float,
           cache: dict) -> tuple[DecisionConfig, dict[str, Any]]:
    kinds = np.asarray([p.kind for p in pairs])
    cons = np.asarray([math.nan if p.consistency is None else float(p.consistency) for p in pairs])
    finite = cons[(kinds == "positive") & np.isfinite(cons)]
    c_thr: list[float | None] = [None]
    if grid.consistency_quantiles and finite.size:
        c_thr += [float(v) for v in np.unique(np.quantile(finite, grid.consistency_quantiles))]
    cons_ok = np.stack([np.ones(len(pairs), bool) if t is None else ~(cons < t) for t in c_thr], axis=1)  # NaN: kept
    best_key, best = None, None
    for pt in grid.pixel_thresholds:
        for ma in grid.min_areas:
            key = (float(pt), int(ma))
            if key not in cache:
                cache[key] = _stats(pairs, *key)
            st = cache[key]
            for mode in grid.image_scores:
                img = st.scores[mode]
                thr = _thresholds(img, grid.n_image_thresholds)
                # kept[p, t, c]
                kept = (st.area > 0)[:, None, None] & (img[:, None, None] >= thr[None, :, None]) \
                    & cons_ok[:, None, :]
                flat = kept.reshape(len(pairs), -1)
                r = _rates(kinds, st, flat, catch_iou, yield_response)
                feasible, primary = _objective(r, objective, yield_target, free_yield_target)
                ti, ci = np.divmod(np.arange(flat.shape[1]), len(c_thr))
                for m in range(flat.shape[1]):
                    k = (bool(feasible[m]), round(float(primary[m]), 12), round(float(np.nan_to_num(r["pes"][m], nan=-1)), 12),
                         round(float(np.nan_to_num(r["free_yield_rate"][m], nan=0)), 12),
                         round(float(np.nan_to_num(r["catch_rate"][m], nan=0)), 12),
                         -abs(float(pt) - 0.5), -int(ma), -float(thr[ti[m]]), -int(ci[m]))
                    if best_key is None or k > best_key:
                        best_key = k
                        best = (DecisionConfig(float(pt), int(ma), mode, float(thr[ti[m]]), c_thr[ci[m]]),
                                {name: float(v[m]) for name, v in r.items()} | {"feasible": bool(feasible[m])})
    assert best is not None
    return best


def decision_figures(pairs: Sequence[PairScore], config: DecisionConfig = DecisionConfig(),
                     catch_iou: float = CATCH_IOU, yield_response: float = YIELD_RESPONSE) -> dict[str, Any]:
    """Catch, yield (negative), defect-free yield and PES of the pairs decided with ``config``
    (:func:`~seggpt_lib.eval.decision.decide`, pair by pair; ``DecisionConfig()``: the raw masks)."""
    catches, yn, yf = [], [], []
    for p in pairs:
        if p.gt is None:
            continue
        m = decide(p.score, config, p.consistency).mask
        if p.kind == "positive":
            union = int((m | p.gt).sum())
            catches.append((1.0 if union == 0 else int((m & p.gt).sum()) / union) >= catch_iou)
        else:
            (yn if p.kind == "negative" else yf).append(m.sum() / m.size < yield_response)
    c = float(np.mean(catches)) if catches else math.nan
    y_neg = float(np.mean(yn)) if yn else math.nan
    y_free = float(np.mean(yf)) if yf else math.nan
    y = y_neg if yn else y_free
    return {"catch_rate": c, "yield_rate": y_neg, "free_yield_rate": y_free, "pes": 0.5 * c + 0.5 * y,
            "n_positive": len(catches), "n_negative": len(yn), "n_free": len(yf)}


def _by_class(pairs: Sequence[PairScore]) -> dict[str, list[PairScore]]:
    out: dict[str, list[PairScore]] = {}
    for p in pairs:
        if p.prompt_class is not None:
            out.setdefault(p.prompt_class, []).append(p)
    return dict(sorted(out.items()))


def calibrate(
    pairs: Sequence[PairScore],
    objective: str = "max_pes",
    yield_target: float | None = 0.6,
    free_yield_target: float | None = None,
    grid: CalibrationGrid = CalibrationGrid(),
    min_class_pairs: int = 20,
    catch_iou: float = CATCH_IOU,
    yield_response: float = YIELD_RESPONSE,
    settings: dict[str, Any] | None = None,
) -> OperatingPoint:
    """Choose the operating point on validation ``pairs`` (see the module docstring).

    ``validation`` holds the raw and calibrated figures, globally and per prompt class, and the
    sweep's figures at the chosen points."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "max_catch_at_yield" and yield_target is None:
        raise ValueError("max_catch_at_yield needs a yield target")
    if not any(p.kind == "positive" for p in pairs):
        raise ValueError("calibration needs positive validation pairs")
    if free_yield_target is None and objective == "max_catch_at_yield":
        free_yield_target = yield_target
    args = (grid, objective, yield_target, free_yield_target, catch_iou, yield_response)
    default, sweep = _sweep(pairs, *args, cache={})
    per_class: dict[str, DecisionConfig] = {}
    validation: dict[str, Any] = {
        "n_pairs": len(pairs),
        "raw": decision_figures(pairs, DecisionConfig(), catch_iou, yield_response),
        "calibrated": decision_figures(pairs, default, catch_iou, yield_response),
        "sweep": sweep,
        "per_class": {},
    }
    for cls, group in _by_class(pairs).items():
        n_pos = sum(p.kind == "positive" for p in group)
        n_other = len(group) - n_pos
        cfg = default
        entry: dict[str, Any] = {"n_positive": n_pos, "n_negative_free": n_other, "own_point": False}
        if n_pos >= min_class_pairs and n_other >= min_class_pairs:
            cfg, entry["sweep"] = _sweep(group, *args, cache={})
            per_class[cls] = cfg
            entry["own_point"] = True
        entry["raw"] = decision_figures(group, DecisionConfig(), catch_iou, yield_response)
        entry["calibrated"] = decision_figures(group, cfg, catch_iou, yield_response)
        validation["per_class"][cls] = entry
    return OperatingPoint(default=default, per_class=per_class, objective=objective,
                          yield_target=yield_target if objective == "max_catch_at_yield" else None,
                          settings={"min_class_pairs": min_class_pairs, "free_yield_target": free_yield_target,
                                    **(settings or {})},
                          validation=validation)


# ------------------------------------------------------------------------------------------
# the threshold-free figure
# ------------------------------------------------------------------------------------------
def _curve(pairs: Sequence[PairScore], config: DecisionConfig, catch_iou: float, yield_response: float) -> dict[str, Any]:
    kinds = np.asarray([p.kind for p in pairs])
    t = config.consistency_threshold
    cons_ok = np.asarray([t is None or p.consistency is None or not p.consistency < t for p in pairs], bool)
    st = _stats(pairs, config.pixel_threshold, config.min_area)
    img = st.scores[config.image_score]
    thr = np.unique(np.concatenate([[0.0], img[st.area > 0]]))
    kept = (st.area > 0)[:, None] & (img[:, None] >= thr[None, :]) & cons_ok[:, None]
    r = _rates(kinds, st, kept, catch_iou, yield_response)
    out: dict[str, Any] = {"thresholds": thr.tolist(), "catch": r["catch_rate"].tolist(),
                           "yield_negative": r["yield_rate"].tolist(), "yield_free": r["free_yield_rate"].tolist()}
    for name, key in (("auc_negative", "yield_rate"), ("auc_free", "free_yield_rate")):
        y, c = r[key], r["catch_rate"]
        if np.all(np.isnan(y)) or np.all(np.isnan(c)):
            out[name] = math.nan
            continue
        # from the highest threshold down: overkill (1 - yield) and catch grow; close at overkill 1
        x = np.concatenate([[0.0], (1.0 - y)[::-1], [1.0]])
        cc = np.concatenate([[0.0], c[::-1], [c[0]]])
        order = np.argsort(x, kind="stable")
        xs, cs = x[order], cc[order]
        out[name] = float(np.sum(np.diff(xs) * (cs[1:] + cs[:-1]) / 2.0))
    return out


def catch_yield_curve(
    pairs: Sequence[PairScore],
    config: DecisionConfig = DecisionConfig(),
    by_class: bool = False,
    catch_iou: float = CATCH_IOU,
    yield_response: float = YIELD_RESPONSE,
) -> dict[str, Any]:
    """Catch rate against yield rate as the image threshold sweeps (``config``'s pixel
    threshold, min area, image score and consistency threshold fixed): ``thresholds``, ``catch``,
    ``yield_negative`` (negative prompts), ``yield_free`` (defect-free queries), and the areas
    ``auc_negative`` / ``auc_free`` under catch vs overkill (``1 - yield``), the curve closed at
    overkill 1 with its last catch: 1 = every defect caught before any overkill.
    ``by_class``: also ``per_class`` (by prompt class), each the same figures."""
    out = _curve(pairs, config, catch_iou, yield_response)
    if by_class:
        out["per_class"] = {c: _curve(g, config, catch_iou, yield_response) for c, g in _by_class(pairs).items()
                            if any(p.kind == "positive" for p in g)}
    return out


def pairs_summary(pairs: Iterable[PairScore]) -> dict[str, int]:
    """How many pairs of each kind."""
    out = {"positive": 0, "negative": 0, "free": 0}
    for p in pairs:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out
