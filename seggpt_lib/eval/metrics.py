"""Production-line metrics for defect segmentation: IoU, catch, yield and PES.

Evaluation protocol (every function here follows it exactly):

* Masks are compared at full resolution; any non-zero pixel is "defect".
* ``IoU = |P ∩ G| / |P ∪ G|`` per image. When both the prediction and the ground
  truth are empty the IoU is defined as **1.0** (nothing to find, nothing painted);
  an empty ground truth with a non-empty prediction gives 0.
* A positive pair (prompts of the query's own class) is a **good catch** when
  ``IoU >= catch_iou`` (default 0.3), otherwise an **escape**.
  ``catch_rate = good catches / positive pairs``.
* ``response rate = predicted defect pixels / all pixels``. A negative pair
  (prompts of other defect classes) or a free pair (defect-free query) is a
  **correct yield** when ``response < yield_response`` (default 0.000239),
  otherwise an **overkill**. ``yield_rate = correct yields / negative pairs``;
  yield on defect-free queries is reported separately as ``free_yield_rate``.
* ``mIoU`` = mean of per-image IoU; ``PES = 0.5 * catch_rate + 0.5 * yield_rate``.

PES alone rewards a model that paints nothing (catch 0, yield 1 -> PES 0.5), so
:func:`evaluate` always reports catch and yield next to it, together with the two
trivial baselines *paint nothing* and *paint everything* on the same pairs.

All mask functions accept numpy arrays, torch tensors (any dtype, any device) or
anything ``numpy.asarray`` understands; bool or numeric, non-zero = defect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

CATCH_IOU = 0.3
YIELD_RESPONSE = 0.000239
KINDS = ("positive", "negative", "free")

__all__ = [
    "CATCH_IOU",
    "YIELD_RESPONSE",
    "KINDS",
    "PairResult",
    "iou",
    "response_rate",
    "is_catch",
    "is_yield",
    "catch_rate",
    "yield_rate",
    "pes",
    "mean_iou",
    "auroc",
    "per_class_iou",
    "evaluate",
    "summary_markdown",
    "BASELINE_TOL",
    "HEADLINE_FIGURES",
    "trivial_baseline",
]


# --------------------------------------------------------------------------- masks

def _as_array(x: Any) -> np.ndarray:
    """numpy view of ``x``; torch tensors are moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        try:
            return x.numpy()
        except (TypeError, RuntimeError):  # bfloat16 and friends have no numpy dtype
            return x.float().numpy()
    return np.asarray(x)


def _as_mask(x: Any) -> np.ndarray:
    """Boolean defect mask (non-zero = defect)."""
    a = _as_array(x)
    return a if a.dtype == bool else a != 0


def _check_same_shape(p: np.ndarray, g: np.ndarray) -> None:
    if p.shape != g.shape:
        raise ValueError(
            f"prediction and ground truth differ in shape: {p.shape} vs {g.shape} "
            "(metrics are computed at full resolution; resize the prediction first)"
        )


def iou(pred: Any, gt: Any) -> float:
    """Intersection over union of two binary masks (non-zero = defect).

    Returns 1.0 when both masks are empty (nothing to find and nothing painted),
    0.0 when exactly one of them is empty. Shapes must match.
    """
    p, g = _as_mask(pred), _as_mask(gt)
    _check_same_shape(p, g)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def response_rate(pred: Any) -> float:
    """Fraction of pixels predicted as defect."""
    p = _as_mask(pred)
    if p.size == 0:
        raise ValueError("response_rate of an empty (0-pixel) mask is undefined")
    return int(np.count_nonzero(p)) / p.size


def is_catch(iou_value: float, thr: float = CATCH_IOU) -> bool:
    """Good catch when ``iou >= thr`` (NaN is never a catch)."""
    return bool(iou_value >= thr)


def is_yield(response: float, thr: float = YIELD_RESPONSE) -> bool:
    """Correct yield when ``response < thr`` (NaN is never a yield)."""
    return bool(response < thr)


def _finite_values(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values), dtype=float).ravel()
    return a[~np.isnan(a)]


def catch_rate(ious: Iterable[float], thr: float = CATCH_IOU) -> float:
    """Fraction of IoUs ``>= thr``; NaNs (missing ground truth) are excluded. NaN if none."""
    a = _finite_values(ious)
    return float(np.mean(a >= thr)) if a.size else math.nan


def yield_rate(responses: Iterable[float], thr: float = YIELD_RESPONSE) -> float:
    """Fraction of response rates ``< thr``; NaNs are excluded. NaN if none."""
    a = _finite_values(responses)
    return float(np.mean(a < thr)) if a.size else math.nan


def pes(catch_rate_value: float, yield_rate_value: float) -> float:
    """Production evaluation score: ``0.5 * catch_rate + 0.5 * yield_rate``."""
    return 0.5 * float(catch_rate_value) + 0.5 * float(yield_rate_value)


def auroc(positive: Iterable[float], negative: Iterable[float]) -> float:
    """The chance that a value of ``positive`` exceeds one of ``negative`` (ties count half;
    0.5 = no separation, 1 = complete); NaNs left out; NaN when either side is empty."""
    pos, neg = _finite_values(positive), np.sort(_finite_values(negative))
    if not pos.size or not neg.size:
        return math.nan
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def mean_iou(ious: Iterable[float]) -> float:
    """Mean of per-image IoUs, NaNs excluded; NaN if there are none."""
    a = _finite_values(ious)
    return float(a.mean()) if a.size else math.nan


def per_class_iou(pred_idx: Any, gt_idx: Any, n_classes: int) -> np.ndarray:
    """IoU of every class of two integer label maps, shape ``(n_classes,)``.

    Classes absent from both maps get NaN, so ``numpy.nanmean`` (or
    :func:`mean_iou`) excludes them from the mean. Labels must lie in
    ``[0, n_classes)``.
    """
    p = _as_array(pred_idx)
    g = _as_array(gt_idx)
    _check_same_shape(p, g)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    p = p.astype(np.int64, copy=False).ravel()
    g = g.astype(np.int64, copy=False).ravel()
    for name, a in (("prediction", p), ("ground truth", g)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {n_classes}); found [{a.min()}, {a.max()}]"
            )
    inter = np.bincount(g[p == g], minlength=n_classes).astype(float)
    area_p = np.bincount(p, minlength=n_classes).astype(float)
    area_g = np.bincount(g, minlength=n_classes).astype(float)
    union = area_p + area_g - inter
    out = np.full(n_classes, np.nan)
    present = union > 0
    out[present] = inter[present] / union[present]
    return out


# --------------------------------------------------------------------------- evaluate

@dataclass
class PairResult:
    """One evaluated (query, prompts) pair.

    ``gt`` is ``None`` when the query has no ground truth: the pair is then kept
    in the table (``gt_missing`` True, IoU / catch / yield empty) but excluded
    from every rate and counted in ``n_missing_gt``. Defect-free queries should
    carry an all-zero ``gt``, not ``None``.
    """

    query: str
    prompts: Sequence[str]
    kind: str  # "positive" | "negative" | "free"
    query_class: str
    pred: Any
    gt: Any = None
    extra: dict = field(default_factory=dict)  # copied into the table as extra columns

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r} for {self.query}")
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]


TABLE_COLUMNS = [
    "file", "class", "kind", "prompts", "iou", "catch", "response_rate", "yield",
    "pred_pixels", "gt_pixels", "n_pixels", "gt_missing",
]


def _row(r: PairResult, catch_iou: float, yield_response: float) -> dict:
    p = _as_mask(r.pred)
    n = int(p.size)
    pred_px = int(np.count_nonzero(p))
    resp = pred_px / n if n else math.nan
    row = {
        "file": r.query,
        "class": r.query_class,
        "kind": r.kind,
        "prompts": ";".join(r.prompts),
        "iou": math.nan,
        "catch": None,
        "response_rate": resp,
        "yield": None,
        "pred_pixels": pred_px,
        "gt_pixels": math.nan,
        "n_pixels": n,
        "gt_missing": r.gt is None,
    }
    if r.gt is not None:
        g = _as_mask(r.gt)
        if g.shape != p.shape:
            raise ValueError(
                f"{r.query}: prediction shape {p.shape} differs from ground truth {g.shape}"
            )
        row["gt_pixels"] = int(np.count_nonzero(g))
        row["iou"] = iou(p, g)
        if r.kind == "positive":
            row["catch"] = is_catch(row["iou"], catch_iou)
        else:
            row["yield"] = is_yield(resp, yield_response)
    row.update(r.extra)
    return row


def _rates(df, catch_iou: float, yield_response: float) -> dict:
    """Rates from a table with columns kind, iou, response_rate (missing-gt rows dropped)."""
    pos = df[df["kind"] == "positive"]
    neg = df[df["kind"] == "negative"]
    free = df[df["kind"] == "free"]
    c = catch_rate(pos["iou"], catch_iou)
    y_neg = yield_rate(neg["response_rate"], yield_response)
    y_free = yield_rate(free["response_rate"], yield_response)
    if len(neg):
        y, source = y_neg, "negative"
    elif len(free):
        y, source = y_free, "free"
    else:
        y, source = math.nan, "none"
    return {
        "miou": mean_iou(pos["iou"]),
        "catch_rate": c,
        "negative_miou": mean_iou(neg["iou"]),
        "yield_rate": y_neg,
        "free_yield_rate": y_free,
        "pes": pes(c, y) if not (math.isnan(c) or math.isnan(y)) else math.nan,
        "pes_yield_source": source,
    }


def evaluate(
    records: Iterable[PairResult],
    catch_iou: float = CATCH_IOU,
    yield_response: float = YIELD_RESPONSE,
    calibrated: Iterable[PairResult] | None = None,
):
    """Score a list of :class:`PairResult` records.

    Returns ``(table, summary)``. ``table`` is a pandas DataFrame with one row per
    record (columns ``file, class, kind, prompts, iou, catch, response_rate,
    yield, pred_pixels, gt_pixels, n_pixels, gt_missing`` plus any ``extra``).
    ``catch`` is filled on positive rows, ``yield`` on negative and free rows.

    ``summary`` keys: ``miou`` / ``catch_rate`` / ``n_positive`` / ``n_catch``
    (positive pairs), ``negative_miou`` / ``yield_rate`` / ``n_negative`` /
    ``n_yield`` (negative pairs), ``free_yield_rate`` / ``n_free`` /
    ``n_free_yield`` (defect-free queries), ``pes`` with ``pes_yield_source``
    (``"negative"``; ``"free"`` when there are no negative pairs; ``"none"``),
    ``n_pairs``, ``n_missing_gt``, the thresholds ``catch_iou`` and
    ``yield_response``, and ``baselines`` = ``{"paint_nothing": {...},
    "paint_everything": {...}}`` each with ``miou, catch_rate, negative_miou,
    yield_rate, free_yield_rate, pes``, computed on the same pairs.

    ``calibrated``: the same pairs, in the same order, with the masks of the line's decision
    (:mod:`seggpt_lib.eval.decision`). The raw rows and rates stay as they are; the summary
    gains ``calibrated`` (``miou, catch_rate, negative_miou, yield_rate, free_yield_rate, pes``
    and the counts) and the table ``calibrated_iou``, ``calibrated_catch``,
    ``calibrated_response_rate``, ``calibrated_yield``, ``calibrated_pred_pixels``.
    """
    rows = [_row(r, catch_iou, yield_response) for r in records]
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=TABLE_COLUMNS)
    scored = table[~table["gt_missing"].astype(bool)]

    summary: dict[str, Any] = {}
    summary.update(_rates(scored, catch_iou, yield_response))
    kind = scored["kind"]
    summary.update({
        "n_pairs": int(len(table)),
        "n_missing_gt": int(table["gt_missing"].astype(bool).sum()),
        "n_positive": int((kind == "positive").sum()),
        "n_catch": int(scored.loc[kind == "positive", "catch"].astype(bool).sum()),
        "n_negative": int((kind == "negative").sum()),
        "n_yield": int(scored.loc[kind == "negative", "yield"].astype(bool).sum()),
        "n_free": int((kind == "free").sum()),
        "n_free_yield": int(scored.loc[kind == "free", "yield"].astype(bool).sum()),
        "catch_iou": float(catch_iou),
        "yield_response": float(yield_response),
    })

    # Trivial baselines on the same ground truths, from pixel counts:
    # paint nothing -> IoU 1 on an empty gt else 0, response 0;
    # paint everything -> IoU |G| / N (1 only if G is the whole image), response 1.
    gt_px = scored["gt_pixels"].astype(float)
    n_px = scored["n_pixels"].astype(float)
    nothing = scored[["kind"]].copy()
    nothing["iou"] = (gt_px == 0).astype(float)
    nothing["response_rate"] = 0.0
    everything = scored[["kind"]].copy()
    everything["iou"] = np.where(n_px > 0, gt_px / n_px.where(n_px > 0, 1.0), math.nan)
    everything["response_rate"] = 1.0
    summary["baselines"] = {
        name: {k: v for k, v in _rates(df, catch_iou, yield_response).items() if k != "pes_yield_source"}
        for name, df in (("paint_nothing", nothing), ("paint_everything", everything))
    }
    if calibrated is not None:
        cal_table, cal = evaluate(calibrated, catch_iou, yield_response)
        if len(cal_table) != len(table) or list(cal_table["file"]) != list(table["file"]):
            raise ValueError("calibrated records must be the same pairs as the records, in the same order")
        for col in ("iou", "catch", "response_rate", "yield", "pred_pixels"):
            table[f"calibrated_{col}"] = cal_table[col].to_numpy()
        summary["calibrated"] = {k: v for k, v in cal.items() if k not in ("baselines", "catch_iou", "yield_response")}
    return table, summary


# the figures a results page headlines, compared by trivial_baseline
HEADLINE_FIGURES = ("miou", "catch_rate", "yield_rate", "free_yield_rate", "pes")
BASELINE_TOL = 0.005  # below one pair in 200: a figure this close to the baseline's equals it


def trivial_baseline(summary: dict, baselines: dict | None = None, tol: float = BASELINE_TOL,
                     figures: Sequence[str] = HEADLINE_FIGURES) -> str | None:
    """Which trivial baseline a model's headline figures equal: ``"paint_nothing"``,
    ``"paint_everything"`` or None (neither).

    ``summary``: :func:`evaluate`'s summary (or any dict of the ``figures``); ``baselines``:
    ``{"paint_nothing": {...}, "paint_everything": {...}}``, by default ``summary["baselines"]``.
    A baseline is matched when every figure that both give (not NaN, not missing) lies within
    ``tol`` of the baseline's, and at least one does. A model that equals *paint everything*
    (or *paint nothing*) on every figure does not read its images, whatever the figures are;
    a results page marks it so. Pure: reads the dicts only."""
    baselines = summary.get("baselines", {}) if baselines is None else baselines
    for name in ("paint_nothing", "paint_everything"):
        base = baselines.get(name)
        if not base:
            continue
        compared = 0
        for k in figures:
            a, b = summary.get(k), base.get(k)
            if a is None or b is None:
                continue
            a, b = float(a), float(b)
            if math.isnan(a) or math.isnan(b):
                continue
            if abs(a - b) > tol:
                break
            compared += 1
        else:
            if compared:
                return name
    return None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """Markdown table of a summary from :func:`evaluate`, with its baselines."""
    src = summary.get("pes_yield_source", "negative")
    pes_label = "PES" if src == "negative" else f"PES (yield from {src})"
    header = f"| | mIoU | catch | yield | free yield | {pes_label} |"
    lines = [header, "|---|---|---|---|---|---|"]

    def line(name: str, s: dict) -> str:
        return (f"| {name} | {_fmt(s.get('miou'))} | {_fmt(s.get('catch_rate'))} | "
                f"{_fmt(s.get('yield_rate'))} | {_fmt(s.get('free_yield_rate'))} | "
                f"{_fmt(s.get('pes'), 4)} |")

    lines.append(line("model", summary))
    if "calibrated" in summary:
        lines.append(line("model, calibrated", summary["calibrated"]))
    for name, label in (("paint_nothing", "paint nothing"), ("paint_everything", "paint everything")):
        if name in summary.get("baselines", {}):
            lines.append(line(label, summary["baselines"][name]))
    counts = (
        f"catches {summary.get('n_catch', 0)}/{summary.get('n_positive', 0)} "
        f"(IoU ≥ {summary.get('catch_iou', CATCH_IOU):g}), "
        f"yields {summary.get('n_yield', 0)}/{summary.get('n_negative', 0)} negative, "
        f"{summary.get('n_free_yield', 0)}/{summary.get('n_free', 0)} free "
        f"(response < {summary.get('yield_response', YIELD_RESPONSE):g})"
    )
    if summary.get("n_missing_gt"):
        counts += f"; {summary['n_missing_gt']} pair(s) without ground truth excluded"
    if "negative_miou" in summary and not _is_nan(summary["negative_miou"]):
        counts += f"; negative-pair mIoU {_fmt(summary['negative_miou'])}"
    lines += ["", counts + ".",
              "PES alone rewards a silent model (paint nothing scores 0.5): read it with catch and yield."]
    return "\n".join(lines) + "\n"


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)
