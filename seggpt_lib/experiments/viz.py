"""Plotting helpers for the notebooks and reports.

* mask overlays (:func:`overlay`, :func:`overlay_pred_gt`), label colouring;
* the original's five-panel row ``[input | masked label | label | raw prediction | prediction
  snapped to the palette]``, either from a model run on :class:`seggpt_lib.data.pairs.PairDataset`
  samples (:func:`model_panel_rows`) or from a predictor's output on a full-resolution query
  (:func:`prediction_panel_row`), drawn by :func:`five_panel_figure`;
* training curves from a run's ``metrics.csv`` (:func:`training_curves`), per-class bar charts
  (:func:`bar_chart`), contact sheets (:func:`contact_sheet`, :func:`dataset_samples`), the
  pair colouring of training samples (:func:`pair_samples_figure`);
* :class:`Explorer`: the callback logic of the interactive explorer notebook, usable from
  plain Python (``update(query=..., prompts=..., top_k=..., grid=...)``).

Every figure function returns a :class:`matplotlib.figure.Figure` (never shows it); images
are ``(H, W, 3)`` uint8 arrays.
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from seggpt_lib import data as D
from seggpt_lib.data.layout import DefectIndex, read_label, read_rgb, resize_image
from seggpt_lib.eval.metrics import CATCH_IOU, YIELD_RESPONSE
from seggpt_lib.eval.metrics import iou
from seggpt_lib.eval.metrics import iou as iou_fn
from seggpt_lib.eval.metrics import is_catch, is_yield, response_rate
from seggpt_lib.predict.predictor import load_rgb
from seggpt_lib.utils.colors import cmap_to_lbl, denormalize
from seggpt_lib.utils.masking import patch_mask_to_pixels

__all__ = [
    "PANEL_TITLES",
    "EXPLORER_LEGEND",
    "Explorer",
    "bar_chart",
    "colorize",
    "contact_sheet",
    "dataset_samples",
    "figure_png",
    "find_results_dir",
    "results_operating_point",
    "five_panel_figure",
    "model_panel_rows",
    "overlay",
    "overlay_pred_gt",
    "pair_samples_figure",
    "prediction_panel_row",
    "rate_figure",
    "catch_yield_by_class",
    "catch_yield_figure",
    "consistency_histograms",
    "resize_image",
    "show",
    "stack_pair",
    "training_curves",
]

PANEL_TITLES = ("input", "masked label", "label", "raw prediction", "snapped prediction")
DEFECT_RGB = (255, 255, 255)
PRED_RGB = (230, 40, 40)
GT_RGB = (40, 200, 60)
BOTH_RGB = (250, 220, 40)


def _new_figure(figsize: tuple[float, float]):
    """A plain :class:`~matplotlib.figure.Figure`: no pyplot state, no GUI backend, nothing
    leaks between calls; show it with :func:`show` (or save it)."""

    return Figure(figsize=figsize)


def figure_png(fig, dpi: int = 110) -> bytes:
    """A figure as PNG bytes."""

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def show(fig, dpi: int = 110) -> None:
    """Display a figure in a notebook (as a PNG); does nothing outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # pragma: no cover
        return
    if get_ipython() is None:
        return
    display(Image(data=figure_png(fig, dpi)))


# ------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------
def to_rgb_uint8(image: Any) -> np.ndarray:
    """Any image (numpy HxW / HxWx3 / HxWx4, float 0..1 or 0..255, torch CHW, PIL, a path) as
    HxWx3 uint8: :func:`seggpt_lib.predict.predictor.load_rgb`."""

    return load_rgb(image)


def colorize(mask: Any, color: Sequence[int] = DEFECT_RGB) -> np.ndarray:
    """A binary mask (non-zero = defect) painted ``color`` on black, HxWx3 uint8."""
    m = np.asarray(mask) != 0
    out = np.zeros((*m.shape, 3), dtype=np.uint8)
    out[m] = np.asarray(color, dtype=np.uint8)
    return out


def overlay(image: Any, mask: Any, color: Sequence[int] = PRED_RGB, alpha: float = 0.55) -> np.ndarray:
    """``image`` with the pixels of ``mask`` blended towards ``color``."""
    img = to_rgb_uint8(image).astype(np.float32)
    m = np.asarray(mask) != 0
    if m.shape != img.shape[:2]:
        m = resize_image(m.astype(np.uint8) * 255, img.shape[:2], nearest=True) > 127
    img[m] = (1 - alpha) * img[m] + alpha * np.asarray(color, dtype=np.float32)
    return img.round().astype(np.uint8)


def overlay_pred_gt(image: Any, pred: Any, gt: Any | None, alpha: float = 0.55) -> np.ndarray:
    """Prediction vs ground truth on the image: green = missed (ground truth only), red = false
    alarm (prediction only), yellow = both."""
    img = to_rgb_uint8(image)
    p = np.asarray(pred) != 0
    g = np.zeros_like(p) if gt is None else np.asarray(gt) != 0
    out = overlay(img, g & ~p, GT_RGB, alpha)
    out = overlay(out, p & ~g, PRED_RGB, alpha)
    return overlay(out, p & g, BOTH_RGB, alpha)


def stack_pair(top: np.ndarray, bottom: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Prompt on top of query, both resized to ``size`` (default: the bottom's size)."""
    size = tuple(size or bottom.shape[:2])
    return np.concatenate([resize_image(to_rgb_uint8(top), size), resize_image(to_rgb_uint8(bottom), size)], axis=0)


# ------------------------------------------------------------------------------------------
# five-panel rows
# ------------------------------------------------------------------------------------------
def model_panel_rows(model, dataset, indices: Sequence[int], device: str = "cpu") -> list[tuple[list[np.ndarray], str]]:
    """The original's image row for evaluation samples of a :class:`~seggpt_lib.data.pairs.PairDataset`
    (``train=False``: the query half of the label pair is hidden), run through ``model``.

    Returns ``[(five images (2H, W, 3) uint8, title), ...]``: input pair, label pair with the
    hidden patches blacked out, label pair, raw prediction, prediction snapped to the sample's
    palette. The title names prompt and query and gives the query IoU.
    """


    if not len(indices):
        return []
    items = [dataset[int(i)] for i in indices]
    batch = D.collate(items)
    mean, std = dataset.mean, dataset.std
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    try:
        with torch.no_grad():
            _, pred, _ = model(**D.model_inputs(batch, dev))
            pred_img = model.unpatchify(pred.float()).cpu()
    finally:
        model.train(was_training)
    cfg = model.cfg
    rows = []
    for i in range(len(items)):
        img = denormalize(batch["imgs"][i : i + 1].float(), mean, std)
        tgt = denormalize(batch["tgts"][i : i + 1].float(), mean, std)
        m = patch_mask_to_pixels(batch["bool_masked_pos"][i : i + 1], cfg.grid, cfg.patch_size)
        masked = tgt * (1 - m)
        raw = denormalize(pred_img[i : i + 1], mean, std).clamp(0, 255)
        pal = batch["palette"][i]
        idx = cmap_to_lbl(raw, pal)
        snapped = pal[idx].permute(0, 3, 1, 2).float()
        h = cfg.image_size[0]
        q_pred = idx[0, h:] > 0
        q_gt = batch["labels"][i, h:] > 0
        score = iou(q_pred, q_gt)
        panels = [to_rgb_uint8(t[0].permute(1, 2, 0).numpy().astype(np.uint8)) for t in (img, masked, tgt, raw, snapped)]
        title = (f"{batch['kind'][i]}: prompt {Path(batch['prompt_file'][i]).stem} -> "
                 f"query {Path(batch['query_file'][i]).stem}  (IoU {score:.2f})")
        rows.append((panels, title))
    return rows


def prediction_panel_row(query: Any, gt: Any | None, prompt: Any, prompt_mask: Any, prediction: Any,
                         size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The five-panel row for a full-resolution prediction of a
    :class:`~seggpt_lib.predict.predictor.SegGPTPredictor` (``prediction`` has ``mask``, ``color`` and
    ``raw``; ``raw`` may be None, then the snapped colours are shown).

    Each panel stacks the (first) prompt on top of the query, both at ``size`` (default: the
    query's size): input, prompt mask over a hidden (black) query half, prompt mask over the
    ground truth, prompt mask over the raw output, prompt mask over the snapped output.
    """
    q = to_rgb_uint8(query)
    size = tuple(size or q.shape[:2])
    p_lbl = colorize(prompt_mask)
    g_lbl = colorize(np.zeros(q.shape[:2], bool) if gt is None else gt)
    raw = prediction.raw if getattr(prediction, "raw", None) is not None else prediction.color
    black = np.zeros_like(g_lbl)
    return [
        stack_pair(prompt, q, size),
        stack_pair(p_lbl, black, size),
        stack_pair(p_lbl, g_lbl, size),
        stack_pair(p_lbl, to_rgb_uint8(np.clip(np.asarray(raw, dtype=np.float32), 0, 255).astype(np.uint8)), size),
        stack_pair(p_lbl, to_rgb_uint8(prediction.color), size),
    ]


def five_panel_figure(rows: Sequence[tuple[Sequence[np.ndarray], str] | Sequence[np.ndarray]],
                      titles: Sequence[str] = PANEL_TITLES, width: float = 9.0, suptitle: str | None = None):
    """A grid: one row per sample, five columns (see :data:`PANEL_TITLES`). ``rows`` are lists of
    five images, or ``(images, row_title)`` pairs."""
    norm = [(r[0], r[1]) if len(r) == 2 and isinstance(r[1], str) else (r, "") for r in rows]
    n = max(1, len(norm))
    ncol = len(titles)
    aspect = 2.0
    if norm:
        h, w = norm[0][0][0].shape[:2]
        aspect = h / max(w, 1)
    cell = width / ncol
    row_h = min(cell * aspect, 6.0) + 0.5
    fig = _new_figure((width, row_h * n + (0.5 if suptitle else 0)))
    fig.set_layout_engine("constrained")
    subs = fig.subfigures(n, 1, squeeze=False)[:, 0] if n > 1 else [fig.subfigures(1, 1)]
    for r in range(n):
        panels, title = norm[r] if norm else ([], "")
        axes = subs[r].subplots(1, ncol, squeeze=False)[0]
        for c in range(ncol):
            ax = axes[c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(panels):
                ax.imshow(panels[c], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        if title:
            subs[r].suptitle(title, fontsize=8, x=0.01, ha="left")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------
# data figures
# ------------------------------------------------------------------------------------------
def contact_sheet(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 6,
                  cell: float = 1.8, suptitle: str | None = None):
    """A grid of images with small titles."""
    n = len(images)
    ncols = max(1, min(ncols, n or 1))
    nrows = max(1, math.ceil(n / ncols))
    fig = _new_figure((cell * ncols, (cell + 0.25) * nrows + (0.4 if suptitle else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return fig


def dataset_samples(root: str | Path, per_class: int = 2, max_classes: int | None = None, size: int = 128,
                    seed: int = 0):
    """Contact sheet of a dataset ROOT: per class ``per_class`` images, each plain and with its
    mask overlaid in red. Returns the figure."""

    index = DefectIndex.scan(root, verify=False)
    rng = np.random.default_rng(seed)
    images, titles = [], []
    classes = list(index.class_names)[: max_classes or None]
    for cls in classes:
        ids = np.flatnonzero(index.class_ids == index.class_names.index(cls))
        pick = np.sort(rng.choice(ids, size=min(per_class, len(ids)), replace=False)) if len(ids) else []
        for i in pick:
            img = read_rgb(index.image_path(int(i)))
            lbl = read_label(index.label_path(int(i)))
            scale = size / max(img.shape[:2])
            hw = (max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale)))
            images += [resize_image(img, hw), resize_image(overlay(img, lbl), hw)]
            titles += [f"{cls}", f"{cls} + mask"]
    return contact_sheet(images, titles, ncols=2 * max(1, per_class) * (2 if per_class == 1 else 1))


def pair_samples_figure(dataset, indices: Sequence[int]):
    """Training samples as the model sees them: image pair (prompt on top), coloured label pair
    (one random defect colour per sample, black background), the random patch mask (white =
    hidden, to be predicted) and the label pair as given to the model (hidden patches black)."""

    cfg_grid = dataset.grid
    p = dataset.patch_size
    rows = []
    for i in indices:
        s = dataset[int(i)]
        img = denormalize(s["imgs"][None].float(), dataset.mean, dataset.std)[0]
        tgt = denormalize(s["tgts"][None].float(), dataset.mean, dataset.std)[0]
        m = patch_mask_to_pixels(s["bool_masked_pos"][None], cfg_grid, p)[0]
        panels = [to_rgb_uint8(img.permute(1, 2, 0).numpy().astype(np.uint8)),
                  to_rgb_uint8(tgt.permute(1, 2, 0).numpy().astype(np.uint8)),
                  to_rgb_uint8((m[0].numpy() * 255).astype(np.uint8)),
                  to_rgb_uint8((tgt * (1 - m)).permute(1, 2, 0).numpy().astype(np.uint8))]
        title = f"{s['kind']}: {s['prompt_class']} -> {s['query_class']}"
        rows.append((panels, title))
    return five_panel_figure(rows, titles=("image pair", "coloured label pair", "patch mask", "model's label input"),
                             width=8.0)


# ------------------------------------------------------------------------------------------
# curves and charts
# ------------------------------------------------------------------------------------------
def training_curves(metrics, title: str | None = None):
    """Loss, learning rate, predicted-defect fraction and validation mIoU against the step,
    from a run's ``metrics.csv`` (path or DataFrame)."""

    df = metrics if isinstance(metrics, pd.DataFrame) else pd.read_csv(metrics)
    fig = _new_figure((10, 6))
    axes = fig.subplots(2, 2, squeeze=False)
    specs = [
        (axes[0][0], [("loss", "train loss"), ("val_loss", "val loss")], "loss", True),
        (axes[0][1], [("lr", "learning rate")], "lr", True),
        (axes[1][0], [("fg_frac", "train (predicted defect share)"), ("val_fg_frac", "val")], "predicted defect fraction", False),
        (axes[1][1], [("val_miou", "val mIoU")], "validation mIoU", False),
    ]
    for ax, cols, name, log in specs:
        drawn = False
        for col, label in cols:
            if col in df and df[col].notna().any():
                d = df[["step", col]].dropna()
                ax.plot(d["step"], d[col], marker="o" if len(d) < 30 else None, ms=3, label=label)
                drawn = True
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if drawn and log and (df[cols[0][0]].dropna() > 0).all():
            ax.set_yscale("log")
        if drawn and len(cols) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def bar_chart(df, x: str, ys: Sequence[str], title: str = "", ylabel: str = "", ylim: tuple[float, float] | None = (0, 1),
              hline: float | None = None, hline_label: str | None = None, rotate: int = 30):
    """Grouped bars: one group per value of column ``x``, one bar per column in ``ys``."""
    n, k = len(df), max(1, len(ys))
    fig = _new_figure((min(13.0, max(5.0, 0.28 * n * k + 2.5)), 3.8))
    ax = fig.subplots()
    width = 0.8 / k
    pos = np.arange(n)
    for j, col in enumerate(ys):
        vals = np.asarray(df[col], dtype=float)
        ax.bar(pos + (j - (k - 1) / 2) * width, np.nan_to_num(vals), width, label=str(col))
    ax.set_xticks(pos)
    ax.set_xticklabels([str(v) for v in df[x]], rotation=rotate, ha="right" if rotate else "center", fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label=hline_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if k > 1 or hline is not None:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def rate_figure(table, catch_iou: float = CATCH_IOU, yield_response: float = YIELD_RESPONSE):
    """Left: IoU of every positive pair, sorted, with the catch threshold. Right: response rate
    of every negative and defect-free pair (log scale), with the yield threshold."""
    fig = _new_figure((11, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    pos = table[table["kind"] == "positive"].sort_values("iou", ascending=False)
    if len(pos):
        ax1.bar(np.arange(len(pos)), pos["iou"].fillna(0), color=["#2a9d4b" if v >= catch_iou else "#d1495b" for v in pos["iou"].fillna(0)])
    ax1.axhline(catch_iou, color="k", ls="--", lw=1)
    ax1.set_ylim(0, 1)
    ax1.set_xlabel("positive pairs, sorted")
    ax1.set_ylabel("IoU")
    n_c = int((pos["iou"] >= catch_iou).sum()) if len(pos) else 0
    ax1.set_title(f"positive prompts: {n_c}/{len(pos)} catches (IoU >= {catch_iou:g})", fontsize=10)
    floor = yield_response / 100
    for j, (kind, colour) in enumerate((("negative", "#3d5a80"), ("free", "#ee964b"))):
        t = table[table["kind"] == kind]
        if len(t):
            y = np.maximum(t["response_rate"].to_numpy(dtype=float), floor)
            x = j + 0.6 * (np.random.default_rng(0).random(len(t)) - 0.5)
            ok = int((t["response_rate"] < yield_response).sum())
            ax2.scatter(x, y, s=14, color=colour, label=f"{kind}: {ok}/{len(t)} yields")
    ax2.axhline(yield_response, color="k", ls="--", lw=1)
    ax2.set_yscale("log")
    ax2.set_xticks([0, 1])
    ax2.set_xticklabels(["negative prompts", "defect-free queries"])
    ax2.set_ylabel(f"response rate (floor {floor:.0e})")
    ax2.set_title(f"yield: response < {yield_response:g}", fontsize=10)
    if ax2.has_data():
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------
# the line's decision (notebook 04): catch against yield, prompt consistency
# ------------------------------------------------------------------------------------------
_NEG_RGB, _FREE_RGB = "#3d5a80", "#ee964b"
# name -> (label, marker, size, face colour or None = the yield kind's colour)
_DECISION_MARKERS: dict[str, tuple[str, str, float, str | None]] = {
    "raw": ("raw (snapped mask)", "o", 60, None),
    "calibrated": ("calibrated on val", "*", 200, None),
    "original": ("original (published)", "D", 55, "#222222"),
    "paint_nothing": ("paint nothing", "s", 55, "#9a9a9a"),
    "paint_everything": ("paint everything", "^", 60, "#9a9a9a"),
}


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _auc_text(v: Any) -> str:
    return f"AUC {v:.3f}" if _finite(v) else "AUC –"


def _catch_yield_axes(ax, curve: dict[str, Any], points: dict[str, dict[str, Any]] | None, legend: bool,
                      raw_curve: dict[str, Any] | None = None) -> None:
    from matplotlib.lines import Line2D

    for key, auc_key, colour, label in (("yield_negative", "auc_negative", _NEG_RGB, "negative prompts"),
                                        ("yield_free", "auc_free", _FREE_RGB, "defect-free queries")):
        y = np.asarray(curve.get(key) or [], dtype=float)
        c = np.asarray(curve.get("catch") or [], dtype=float)
        if y.size and np.isfinite(y).any():
            ax.step(y, c, where="post", color=colour, lw=1.8, label=f"{label} ({_auc_text(curve.get(auc_key))})")
        if raw_curve is not None:
            yr = np.asarray(raw_curve.get(key) or [], dtype=float)
            cr = np.asarray(raw_curve.get("catch") or [], dtype=float)
            if yr.size and np.isfinite(yr).any():
                ax.step(yr, cr, where="post", color=colour, lw=1.0, ls=":",
                        label=f"{label}, raw decision ({_auc_text(raw_curve.get(auc_key))})")
    handles = []
    for name, p in (points or {}).items():
        label, marker, size, face = _DECISION_MARKERS.get(name, (name, "P", 60, "#555555"))
        shown = False
        for ykey, colour in (("yield_rate", _NEG_RGB), ("free_yield_rate", _FREE_RGB)):
            x, yv = p.get(ykey), p.get("catch_rate")
            if _finite(x) and _finite(yv):
                ax.scatter([x], [yv], marker=marker, s=size, color=face or colour, edgecolors="k", linewidths=0.7,
                           zorder=5)
                shown = True
        if shown:
            handles.append(Line2D([], [], ls="", marker=marker, markersize=math.sqrt(size), markerfacecolor="white",
                                  markeredgecolor="k", label=label))
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if legend:
        h, _ = ax.get_legend_handles_labels()
        ax.legend(handles=h + handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def catch_yield_figure(curve: dict[str, Any], points: dict[str, dict[str, Any]] | None = None,
                       raw_curve: dict[str, Any] | None = None, title: str = ""):
    """Catch rate against yield rate as the decision's image threshold sweeps
    (:func:`seggpt_lib.eval.calibration.catch_yield_curve`'s ``curve``): one curve with the yield on
    negative prompts, one on defect-free queries, their AUC in the legend; ``raw_curve`` (the raw
    decision's) dotted. ``points``: ``{name: {catch_rate, yield_rate, free_yield_rate}}``, named
    ``raw``, ``calibrated``, ``original``, ``paint_nothing``, ``paint_everything`` (see
    :func:`seggpt_lib.experiments.evaluation.decision_points`), each drawn at its negative-prompt
    yield (blue) and defect-free yield (orange); the marker says which point it is."""
    fig = _new_figure((9.6, 5.4))
    ax = fig.subplots()
    _catch_yield_axes(ax, curve, points, legend=True, raw_curve=raw_curve)
    ax.set_xlabel("yield rate (correct yields / pairs without the prompted defect)")
    ax.set_ylabel("catch rate (IoU ≥ catch threshold)")
    ax.set_title(title or "Catch against yield as the decision threshold sweeps", fontsize=10)
    fig.tight_layout()
    return fig


def catch_yield_by_class(per_class: dict[str, dict[str, Any]], max_panels: int = 16, ncols: int = 4,
                         title: str = ""):
    """Small multiples of :func:`catch_yield_figure`'s curves, one per prompt class (the first
    ``max_panels`` classes by name), AUCs in each title."""
    names = sorted(per_class)[:max_panels]
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = _new_figure((2.7 * ncols, 2.5 * nrows + 0.4))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True)).ravel()
    for ax, name in zip(axes, names):
        c = per_class[name]
        _catch_yield_axes(ax, c, None, legend=False)
        ax.set_title(f"{name}\nAUC neg {_fmt_auc(c.get('auc_negative'))} · free {_fmt_auc(c.get('auc_free'))}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title or "Catch (y) against yield (x) per prompt class: negative prompts blue, defect-free orange",
                 fontsize=9)
    fig.tight_layout()
    return fig


def _fmt_auc(v: Any) -> str:
    return f"{v:.2f}" if _finite(v) else "–"


def consistency_histograms(positive: Sequence[float], negative: Sequence[float], free: Sequence[float] = (),
                           threshold: float | None = None, auroc: float | None = None, bins: int = 24, title: str = ""):
    """Distributions of the prompt consistency of positive vs negative pairs (and defect-free
    queries, outlined), with the calibrated consistency threshold dashed when there is one and
    the AUROC (positive above negative) in the title."""
    fig = _new_figure((6.4, 3.6))
    ax = fig.subplots()
    groups = [("positive prompts", np.asarray(positive, float), "#2a9d4b"),
              ("negative prompts", np.asarray(negative, float), _NEG_RGB),
              ("defect-free queries", np.asarray(free, float), _FREE_RGB)]
    allv = np.concatenate([v[np.isfinite(v)] for _, v, _ in groups] + [np.zeros(0)])
    edges = np.linspace(allv.min(), allv.max(), bins + 1) if allv.size and allv.min() < allv.max() else bins
    for i, (label, v, colour) in enumerate(groups):
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        if i < 2:
            ax.hist(v, bins=edges, alpha=0.55, color=colour, label=f"{label} (n={v.size})")
        else:
            ax.hist(v, bins=edges, histtype="step", lw=1.5, color=colour, label=f"{label} (n={v.size})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"calibrated threshold {threshold:.3f}")
    ax.set_xlabel("prompt consistency (cos to the prompt's defect − cos to its background)")
    ax.set_ylabel("pairs")
    sub = f" · AUROC {auroc:.2f} (0.5 = chance)" if _finite(auroc) else ""
    ax.set_title((title or "Prompt consistency: positive vs negative pairs") + sub, fontsize=10)
    if ax.has_data():
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------
# the explorer
# ------------------------------------------------------------------------------------------
PROMPT_RGB = (40, 120, 255)

# the explorer's one colour legend, used by every one of its panels and by its widget
EXPLORER_LEGEND: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red: predicted, no true defect (false alarm)", PRED_RGB),
    ("green: true defect, not predicted (missed)", GT_RGB),
    ("yellow: predicted true defect (hit)", BOTH_RGB),
    ("blue: a prompt's defect mask", PROMPT_RGB),
)


def find_results_dir(results_dir: str | Path) -> Path:
    """``results_dir`` as given when it is absolute or exists relative to the working directory,
    else relative to the repository root: the notebooks run from ``notebooks/`` find the
    repository's ``results/`` with the default ``results_dir = "results"``."""
    p = Path(results_dir).expanduser()
    if p.is_absolute() or p.exists():
        return p
    from seggpt_lib.experiments.config import REPO_ROOT

    return REPO_ROOT / p


def results_operating_point(results_dir: str | Path, weights: str | Path = ""):
    """The line's decision the results hold, as an
    :class:`~seggpt_lib.eval.decision.OperatingPoint` (None when there is none): for given
    ``weights``, ``operating_point.json`` beside them; else notebook 04's (its fragment names the
    file it wrote, relative to ``results_dir``; the record it keeps when the file is gone), else
    the file beside notebook 02's weights. A malformed file raises
    :class:`~seggpt_lib.eval.decision.OperatingPointError` naming it."""
    import json

    from seggpt_lib.eval.decision import OperatingPoint, load_operating_point, operating_point_beside

    R = Path(results_dir)
    if weights:
        beside = operating_point_beside(weights)
        return load_operating_point(beside) if beside.is_file() else None

    def fragment(name: str) -> dict[str, Any]:
        f = R / "work" / f"{name}.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    rec = fragment("04_pair_evaluation").get("operating_point") or {}
    if rec.get("path"):
        path = Path(rec["path"])
        path = path if path.is_absolute() else R / path
        if path.is_file():
            return load_operating_point(path)
    if rec.get("default"):
        return OperatingPoint.from_dict(rec)
    w = fragment("02_training").get("weights")
    if w and operating_point_beside(w).is_file():
        return load_operating_point(operating_point_beside(w))
    return None


def _legend_html() -> str:
    """The explorer's colour legend as HTML swatches (for the widget)."""
    items = "".join(
        f"<span style='display:inline-block;width:0.9em;height:0.9em;margin:0 0.3em 0 0.9em;vertical-align:middle;"
        f"background:rgb{tuple(rgb)}'></span>{text}" for text, rgb in EXPLORER_LEGEND)
    return f"<div style='font-size:0.9em'>{items}</div>"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class Explorer:
    """Callback logic of the explorer notebook: pick a query, its prompts, top-k and tiling grid, get
    the prediction, the overlay and the metrics.

    >>> ex = Explorer(predictor, "data/split/test", "data/split/train")
    >>> out = ex.update(query=ex.queries[0], top_k=1, grid=2)
    >>> out["iou"], out["response_rate"], out["figure"], out["title"]

    ``prompts`` default to the query's own class (positive prompts, sorted, the query itself
    excluded); pass any prompt files of ``prompt_root`` to try negative prompts. The first ``top_k``
    of ``prompts`` are used, in the order given. A positive pair is scored by its IoU (catch or
    escape); a negative pair and a defect-free query by the response rate (yield or overkill):
    their ``iou`` is None.

    Every panel of the figure uses one colour legend (:data:`EXPLORER_LEGEND`): on the query red is
    predicted without a true defect, green a true defect not predicted, yellow both; a prompt's
    mask is blue.

    Decision threshold: the mask shown and scored is the line's decision
    (:func:`seggpt_lib.eval.decision.decide`) on the prediction's per-pixel defect score at pixel
    ``threshold``; :meth:`redraw` decides the last prediction again at another threshold without
    running the model (the widget's threshold slider). Without an operating point the decision is
    the pixel threshold alone (0.5: the predictor's own snapped mask). With ``operating_point``
    (an :class:`~seggpt_lib.eval.decision.OperatingPoint`, e.g. notebook 04's calibration:
    :func:`results_operating_point`) the verdict is its full decision for the first prompt's class
    (pixel threshold, min area, image score against its threshold, prompt consistency), the
    threshold starts at its calibrated pixel threshold (unless ``threshold`` is given) and the
    slider moves only the pixel threshold; :meth:`calibrated_threshold` is the one to go back
    to. A prediction without a score keeps its mask (and the widget no slider).
    """

    def __init__(self, predictor, query_root: str | Path, prompt_root: str | Path, work_size: int | None = None,
                 tile_pairing: str = "all", catch_iou: float = CATCH_IOU, yield_response: float = YIELD_RESPONSE,
                 threshold: float | None = None, operating_point=None) -> None:

        self.predictor = predictor
        self.query_index = DefectIndex.scan(query_root, verify=False)
        self.prompt_index = DefectIndex.scan(prompt_root, verify=False)
        self.work_size = work_size
        self.tile_pairing = tile_pairing
        self.catch_iou = float(catch_iou)
        self.yield_response = float(yield_response)
        self.last: dict[str, Any] | None = None
        self.operating_point = operating_point
        if threshold is None:
            threshold = operating_point.default.pixel_threshold if operating_point is not None else 0.5
        self.threshold = float(threshold)
        self.prediction = None  # the last update's Prediction
        self._state: dict[str, Any] | None = None  # what redraw needs of the last update
        self._cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    # -- choices --------------------------------------------------------------------------
    @property
    def queries(self) -> list[str]:
        return list(self.query_index.files)

    @property
    def prompt_files(self) -> list[str]:
        """Prompt candidates: every image of the prompt set with a defect."""
        idx = self.prompt_index
        return [f for i, f in enumerate(idx.files) if not idx.is_free[i]]

    def query_class(self, query: str) -> str:
        return self.query_index.class_of(self.query_index.find(query))

    def prompt_class(self, prompt: str) -> str:
        return self.prompt_index.class_of(self.prompt_index.find(prompt))

    def default_prompts(self, query: str, n: int = 3, exclude: Sequence[str] = ()) -> list[str]:
        """Up to ``n`` prompts of the query's own class (another class's when it is defect-free),
        none of ``exclude``."""
        cls = self.query_class(query)
        idx = self.prompt_index
        skip = set(exclude) | {query}
        same = [f for i, f in enumerate(idx.files) if not idx.is_free[i] and idx.class_of(i) == cls and f not in skip]
        if not same:
            same = [f for f in self.prompt_files if f not in skip]
        return same[: max(0, int(n))]

    def prompt_options(self, query: str, first: Sequence[str] = ()) -> list[str]:
        """The prompt candidates in display order: ``first`` (in that order), then the query's class,
        then the others by class."""
        cls = self.query_class(query)
        rest = [f for f in self.prompt_files if f not in set(first)]
        rest.sort(key=lambda f: (self.prompt_class(f) != cls, self.prompt_class(f), f))
        return [f for f in first if f in set(self.prompt_files)] + rest

    # -- data -----------------------------------------------------------------------------
    def _load(self, which: str, file: str) -> tuple[np.ndarray, np.ndarray]:

        key = (which, file)
        if key not in self._cache:
            idx = self.query_index if which == "query" else self.prompt_index
            try:
                i = idx.find(file)
            except KeyError:
                raise ValueError(f"{file!r} is not a {which} image (choose from {which} set)") from None
            self._cache[key] = (read_rgb(idx.image_path(i)), read_label(idx.label_path(i)))
        return self._cache[key]

    def calibrated_threshold(self, prompt_class: str | None = None) -> float | None:
        """The operating point's pixel threshold for a prompt of ``prompt_class`` (its default
        when None or without a point of its own); None without an operating point."""
        op = self.operating_point
        return None if op is None else float(op.config_for(prompt_class).pixel_threshold)

    def decision_config(self, threshold: float | None = None, prompt_class: str | None = None):
        """The :class:`~seggpt_lib.eval.decision.DecisionConfig` applied: the operating point's for
        ``prompt_class`` (else the raw decision) at pixel ``threshold`` (default ``self.threshold``)."""
        import dataclasses

        from seggpt_lib.eval.decision import DecisionConfig

        t = self.threshold if threshold is None else float(threshold)
        base = self.operating_point.config_for(prompt_class) if self.operating_point is not None else DecisionConfig()
        return dataclasses.replace(base, pixel_threshold=t)

    def decide(self, prediction, threshold: float | None = None, prompt_class: str | None = None):
        """The full :class:`~seggpt_lib.eval.decision.Decision` on ``prediction``
        (:meth:`decision_config`); None for a prediction without a score."""
        from seggpt_lib.eval.decision import decide

        score = getattr(prediction, "score", None)
        if score is None:
            return None
        return decide(score, self.decision_config(threshold, prompt_class), getattr(prediction, "consistency", None))

    def decision(self, prediction, threshold: float | None = None, prompt_class: str | None = None):
        """The line's decision on ``prediction`` at pixel threshold ``threshold`` (default
        ``self.threshold``; 0.5 without an operating point is the predictor's own snapped mask):
        ``(mask, defect)``, from :meth:`decide` (with an operating point: its full decision for
        ``prompt_class``). A prediction without a score keeps its mask."""
        d = self.decide(prediction, threshold, prompt_class)
        if d is None:
            mask = np.asarray(prediction.mask, dtype=bool)
            return mask, bool(mask.any())
        return np.asarray(d.mask, dtype=bool), bool(d.defect)

    # -- the callback ---------------------------------------------------------------------
    def update(self, query: str | None = None, prompts: Sequence[str] | None = None, top_k: int = 1,
               grid: int = 1, figure: bool = True, threshold: float | None = None) -> dict[str, Any]:
        """Predict ``query`` from the first ``top_k`` of ``prompts`` (in the order given) on an n×n
        ``grid``; return the metrics (``kind``, ``iou`` (positive pairs only, else None), ``catch``,
        ``response_rate``, ``yield``, ``verdict``, ``defect`` (the line's pass/defect decision at
        pixel ``threshold``), ``pred_pixels``, ``gt_pixels``, ``n_pairs``, ``seconds``, ``prompts``
        used and their number ``top_k``), ``note`` (set when no prompt was given and the query's
        default prompts were used), ``title`` and ``figure`` (the query, the prediction against the
        ground truth, the defect score map (else the model's output), and every prompt used with
        its mask). :meth:`redraw` changes the threshold without running the model again."""

        query = query or self.queries[0]
        asked = max(1, int(top_k))
        note = ""
        prompts = [p for p in prompts] if prompts else []
        if not prompts:
            prompts = self.default_prompts(query, asked)
            note = (f"no prompt chosen: using the {_plural(len(prompts), 'default prompt')} of "
                    f"{'another class' if self.query_class(query) == 'free' else 'class ' + self.query_class(query)}")
        used = list(dict.fromkeys(prompts))[:asked]
        if not used:
            raise ValueError("no prompt chosen")
        q_img, q_gt = self._load("query", query)
        p = [self._load("prompt", f) for f in used]
        ws = self.work_size or max(q_img.shape[:2])
        t0 = time.perf_counter()
        op = self.operating_point
        extra = {"consistency": True} if op is not None and op.needs_consistency else {}
        pred = self.predictor.predict(q_img, [a for a, _ in p], [b for _, b in p], grid=int(grid),
                                      tile_pairing=self.tile_pairing, work_size=int(ws), **extra)
        seconds = time.perf_counter() - t0
        self.prediction = pred
        self._state = {"query": query, "used": used, "grid": int(grid), "note": note, "seconds": seconds,
                       "q_img": q_img, "gt": q_gt != 0, "prompts": p, "pred": pred}
        return self.redraw(threshold, figure=figure)

    def redraw(self, threshold: float | None = None, figure: bool = True) -> dict[str, Any]:
        """The last :meth:`update`'s prediction decided again at pixel ``threshold`` (default
        ``self.threshold``), without running the model: mask, metrics, verdicts and figure."""
        st = self._state
        if st is None:
            raise ValueError("nothing to redraw: call update first")
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
            self.threshold = float(threshold)
        pred, gt, used, query = st["pred"], st["gt"], st["used"], st["query"]
        q_cls = self.query_class(query)
        p_cls = [self.prompt_class(f) for f in used]
        if not gt.any():
            kind = "free"
        elif all(c != q_cls for c in p_cls):
            kind = "negative"
        else:
            kind = "positive"
        d = self.decide(pred, prompt_class=p_cls[0] if p_cls else None)
        if d is None:
            mask = np.asarray(pred.mask, dtype=bool)
            defect = bool(mask.any())
        else:
            mask, defect = np.asarray(d.mask, dtype=bool), bool(d.defect)
        resp = response_rate(mask)
        cal_t = self.calibrated_threshold(p_cls[0] if p_cls else None)
        has_score = getattr(pred, "score", None) is not None
        out: dict[str, Any] = {
            "query": query, "query_class": q_cls, "prompts": list(used), "prompt_classes": p_cls, "kind": kind,
            "top_k": len(used), "grid": st["grid"], "tile_pairing": self.tile_pairing,
            "iou": None, "catch": None, "response_rate": resp, "yield": None,
            "threshold": self.threshold if has_score else None,
            "calibrated_threshold": cal_t if has_score else None,
            "calibrated": bool(has_score and cal_t is not None and abs(self.threshold - cal_t) < 5e-3),
            "decision": self.decision_config(prompt_class=p_cls[0] if p_cls else None).to_dict() if has_score else None,
            "image_score": float(d.image_score) if d is not None else None,
            "defect": defect, "pred_pixels": int(mask.sum()), "gt_pixels": int(gt.sum()),
            "n_pairs": int(pred.n_pairs), "seconds": st["seconds"], "note": st["note"],
        }
        if kind == "positive":
            out["iou"] = iou_fn(mask, gt)
            out["catch"] = is_catch(out["iou"], self.catch_iou)
            out["verdict"] = "good catch" if out["catch"] else "escape"
        else:
            out["yield"] = is_yield(resp, self.yield_response)
            out["verdict"] = "correct yield" if out["yield"] else "overkill"
        out["title"] = self._title(out)
        if figure:
            out["figure"] = self._figure(out, st["q_img"], gt, mask, pred, st["prompts"])
        self.last = out
        return out

    def _score_text(self, o: dict[str, Any]) -> str:
        if o["kind"] == "positive":
            return f"IoU {o['iou']:.3f} → {o['verdict']} (catch: IoU ≥ {self.catch_iou:g})"
        return f"response rate {o['response_rate']:.6f} → {o['verdict']} (yield: response < {self.yield_response:g})"

    def _ran_text(self, o: dict[str, Any]) -> str:
        return (f"{_plural(len(o['prompts']), 'prompt')}, {_plural(o['n_pairs'], 'pair')} ran "
                f"(grid {o['grid']}, {o['tile_pairing']} tile pairing)")

    def _decision_text(self, o: dict[str, Any]) -> str:
        at = "" if o["threshold"] is None else f" at pixel threshold {o['threshold']:.2f}"
        if o.get("calibrated_threshold") is not None:
            c = o["decision"]
            which = "calibrated" if o["calibrated"] else f"manual; calibrated {o['calibrated_threshold']:.2f}"
            rest = [f"components >= {c['min_area']} px", f"{c['image_score']} {o['image_score']:.4g} vs >= "
                                                          f"{c['image_threshold']:.4g}"]
            if c.get("consistency_threshold") is not None:
                rest.append(f"consistency >= {c['consistency_threshold']:.3f}")
            at += f" ({which}; {', '.join(rest)})"
        return f"line's decision{at}: {'DEFECT' if o['defect'] else 'PASS'}"

    def _title(self, o: dict[str, Any]) -> str:
        what = {"positive": "positive pair", "negative": "negative pair", "free": "defect-free query"}[o["kind"]]
        return f"{what}: {self._score_text(o)}\n{self._decision_text(o)}; {self._ran_text(o)}"

    def _figure(self, o: dict[str, Any], q_img, gt, mask, pred, prompts):
        from matplotlib.patches import Patch

        score = getattr(pred, "score", None)
        panels = [(to_rgb_uint8(q_img), f"query {o['query']} ({o['query_class']})", None),
                  (overlay_pred_gt(q_img, mask, gt), "prediction vs truth", None)]
        if score is not None:
            panels.append((np.asarray(score, dtype=np.float32),
                           f"defect score 0 → 1 (≥ {o['threshold']:.2f}: predicted)", "gray"))
        else:
            panels.append((to_rgb_uint8(pred.color), "model output (its own colours)", None))
        for j, ((img, m), f, c) in enumerate(zip(prompts, o["prompts"], o["prompt_classes"])):
            panels.append((overlay(img, m, PROMPT_RGB), f"prompt {j + 1}: {f} ({c})", None))
        n = len(panels)
        ncols = min(n, 4)
        nrows = math.ceil(n / ncols)
        cell = 2.6
        fig = _new_figure((cell * ncols, (cell + 0.3) * nrows + 1.3))
        fig.set_layout_engine("constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for k in range(nrows * ncols):
            ax = axes[k // ncols][k % ncols]
            ax.axis("off")
            if k < n:
                img, title, cmap = panels[k]
                if cmap:
                    ax.imshow(img, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                else:
                    ax.imshow(img, interpolation="nearest")
                ax.set_title(title, fontsize=7)
        fig.suptitle(o["title"], fontsize=9)
        fig.legend(handles=[Patch(color=np.asarray(rgb) / 255, label=t) for t, rgb in EXPLORER_LEGEND],
                   loc="outside lower center", ncol=2, fontsize=7, frameon=False)
        return fig

    def metrics_text(self, out: dict[str, Any] | None = None) -> str:
        """One line of the metrics of an :meth:`update` result: the IoU for a positive pair, the
        response rate for a negative pair or a defect-free query."""
        o = out or self.last or {}
        if not o:
            return ""
        extra = " | IoU is for positive pairs only" if o["kind"] != "positive" else f" | response {o['response_rate']:.6f}"
        return (f"{o['kind']} | {self._score_text(o)}{extra} | {self._decision_text(o)} | "
                f"{_plural(len(o['prompts']), 'prompt')}, "
                f"{_plural(o['n_pairs'], 'pair')} in {o['seconds']:.2f} s")

    def widget(self, grid_choices: Sequence[int] = (1, 2, 4), max_top_k: int = 5):
        """The ipywidgets UI: query, tiling grid, top-k and the prompts; every change redraws.

        The highlighted prompts are exactly the ones used, in the order they were clicked; top-k
        is their number (moving the slider drops the last clicked, or adds the query's default
        prompts). Prompts chosen by the explorer (a new query, a top-k change) are moved to the
        top of the list so they stay in sight; an empty selection falls back to the default
        prompts and says so. The threshold slider (shown when the predictions carry a per-pixel
        defect score) decides the last prediction again (mask, score map, pass/defect verdict)
        without running the model. With an operating point it starts at the calibrated pixel
        threshold, is labelled ``calibrated`` while it stays there (``threshold`` once moved), and
        a button goes back to the calibrated threshold of the pair shown. Children:
        ``[HBox(query, grid, top-k[, threshold[, calibrated button]]), prompts, text, figure]``."""
        import html as _html

        import ipywidgets as W
        from IPython import get_ipython
        from IPython.display import Image, display

        in_ipython = get_ipython() is not None

        q = W.Dropdown(options=[(f"{f}  ({self.query_class(f)})", f) for f in self.queries], description="query",
                       layout=W.Layout(width="22em"))
        pr = W.SelectMultiple(options=[], rows=8, description="prompts", layout=W.Layout(width="36em"))
        k = W.IntSlider(value=1, min=1, max=max_top_k, description="top-k")
        s = W.Dropdown(options=list(grid_choices), value=grid_choices[0], description="grid",
                       layout=W.Layout(width="10em"))
        t = W.FloatSlider(value=self.threshold, min=0.0, max=1.0, step=0.01, description="threshold",
                          tooltip="pixel threshold on the defect score (0.5: the snapped mask)")
        cal = W.Button(description="calibrated", tooltip="back to the operating point's pixel threshold (notebook 04)",
                       layout=W.Layout(width="13em"))
        text = W.HTML()
        out = W.Output()
        row = W.HBox([q, s, k])
        state: dict[str, Any] = {"order": [], "busy": False}

        def label(f: str) -> str:
            return f"{self.prompt_class(f)}  /  {f}"

        def show_selection(order: list[str], to_top: bool) -> None:
            """Highlight exactly ``order`` (moved to the top of the list when ``to_top``)."""
            state["busy"] = True
            try:
                if to_top:
                    pr.options = [(label(f), f) for f in self.prompt_options(q.value, order)]
                pr.value = tuple(order)
                if k.value != max(1, len(order)):
                    k.value = max(1, len(order))
            finally:
                state["busy"] = False
            state["order"] = list(order)

        def refresh(note: str = "", predict: bool = True) -> None:
            with out:
                if in_ipython:
                    out.clear_output(wait=True)
                try:
                    if predict:
                        res = self.update(query=q.value, prompts=state["order"] or None,
                                          top_k=max(1, len(state["order"])), grid=s.value, threshold=t.value)
                    else:
                        res = self.redraw(threshold=t.value)
                except ValueError as e:
                    text.value = f"<b>error:</b> {_html.escape(str(e))}"
                    return
                state["last_note"] = note
                if res.get("calibrated_threshold") is not None:
                    t.description = "calibrated" if res["calibrated"] else "threshold"
                    cal.description = f"calibrated ({res['calibrated_threshold']:.2f})"
                    state["calibrated"] = res["calibrated_threshold"]
                used = " ".join(f"<b>{j + 1}.</b> {_html.escape(label(f))}" for j, f in enumerate(res["prompts"]))
                notes = [n for n in (note, res.get("note")) if n]
                text.value = ("".join(f"<div style='color:#b45309'><b>note:</b> {_html.escape(n)}</div>" for n in notes)
                              + f"<div>prompts used: {used}</div>"
                              + f"<div><code>{_html.escape(self.metrics_text(res))}</code></div>" + _legend_html())
                if in_ipython:
                    display(Image(data=figure_png(res["figure"])))

        def on_query(change=None) -> None:
            show_selection(self.default_prompts(q.value, k.value), to_top=True)
            refresh()

        def on_prompts(change) -> None:
            if state["busy"]:
                return
            chosen = list(change["new"])
            order = [f for f in state["order"] if f in chosen] + [f for f in chosen if f not in state["order"]]
            note = ""
            if not order:
                order = self.default_prompts(q.value, k.value)
                note = (f"no prompt selected: fell back to the {_plural(len(order), 'default prompt')} "
                        f"({', '.join(order)})")
                show_selection(order, to_top=True)
            else:
                if len(order) > max_top_k:
                    note = f"at most {max_top_k} prompts: kept the first {max_top_k} clicked"
                    order = order[:max_top_k]
                show_selection(order, to_top=False)
            refresh(note)

        def on_top_k(change) -> None:
            if state["busy"]:
                return
            n = int(change["new"])
            order = state["order"][:n]
            note = ""
            if len(order) < n:
                order += self.default_prompts(q.value, n - len(order), exclude=order)
                if len(order) < n:
                    order += [f for f in self.prompt_files if f not in order and f != q.value][: n - len(order)]
                if len(order) < n:
                    note = f"only {_plural(len(order), 'prompt')} available"
            show_selection(order, to_top=True)
            refresh(note)

        q.observe(on_query, names="value")
        pr.observe(on_prompts, names="value")
        k.observe(on_top_k, names="value")
        s.observe(lambda change: refresh(), names="value")
        t.observe(lambda change: refresh(state.get("last_note", ""), predict=False), names="value")

        def on_calibrated(button=None) -> None:
            target = state.get("calibrated")
            if target is None:
                return
            if abs(t.value - target) > 1e-12:
                t.value = target  # redraws through the slider
            else:
                refresh(state.get("last_note", ""), predict=False)

        cal.on_click(on_calibrated)
        on_query()
        if getattr(self.prediction, "score", None) is not None:  # a per-pixel score: the threshold slider
            row.children = (q, s, k, t, cal) if self.operating_point is not None else (q, s, k, t)
        return W.VBox([row, pr, text, out])
