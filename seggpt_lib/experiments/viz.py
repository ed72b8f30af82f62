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
    "Explorer",
    "bar_chart",
    "colorize",
    "contact_sheet",
    "dataset_samples",
    "figure_png",
    "five_panel_figure",
    "model_panel_rows",
    "overlay",
    "overlay_pred_gt",
    "pair_samples_figure",
    "prediction_panel_row",
    "rate_figure",
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
# the explorer
# ------------------------------------------------------------------------------------------
class Explorer:
    """Callback logic of the explorer notebook: pick a query, its prompts, top-k and tiling grid, get
    the prediction, the overlay and the metrics.

    >>> ex = Explorer(predictor, "data/split/test", "data/split/train")
    >>> out = ex.update(query=ex.queries[0], top_k=1, grid=2)
    >>> out["iou"], out["response_rate"], out["figure"]

    ``prompts`` default to the query's own class (positive prompts, sorted, the query itself
    excluded); pass any prompt files of ``prompt_root`` to try negative prompts.
    """

    def __init__(self, predictor, query_root: str | Path, prompt_root: str | Path, work_size: int | None = None,
                 tile_pairing: str = "all", catch_iou: float = CATCH_IOU, yield_response: float = YIELD_RESPONSE) -> None:

        self.predictor = predictor
        self.query_index = DefectIndex.scan(query_root, verify=False)
        self.prompt_index = DefectIndex.scan(prompt_root, verify=False)
        self.work_size = work_size
        self.tile_pairing = tile_pairing
        self.catch_iou = float(catch_iou)
        self.yield_response = float(yield_response)
        self.last: dict[str, Any] | None = None
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

    def default_prompts(self, query: str, n: int = 3) -> list[str]:
        """Up to ``n`` prompts of the query's own class (another class's when it is defect-free)."""
        cls = self.query_class(query)
        idx = self.prompt_index
        same = [f for i, f in enumerate(idx.files) if not idx.is_free[i] and idx.class_of(i) == cls and f != query]
        if not same:
            same = [f for f in self.prompt_files if f != query]
        return same[:n]

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

    # -- the callback ---------------------------------------------------------------------
    def update(self, query: str | None = None, prompts: Sequence[str] | None = None, top_k: int = 1,
               grid: int = 1, figure: bool = True) -> dict[str, Any]:
        """Predict ``query`` from the first ``top_k`` of ``prompts`` on an n×n ``grid``; return the
        metrics (``kind``, ``iou``, ``catch``, ``response_rate``, ``yield``, ``pred_pixels``,
        ``gt_pixels``, ``n_pairs``, ``seconds``, ``prompts`` used) and ``figure`` (query with the
        prediction overlaid, prediction vs ground truth, and the first prompt with its mask)."""

        query = query or self.queries[0]
        prompts = list(prompts) if prompts else self.default_prompts(query, max(1, int(top_k)))
        top_k = max(1, int(top_k))
        used = prompts[:top_k]
        if not used:
            raise ValueError("no prompt chosen")
        q_img, q_gt = self._load("query", query)
        p = [self._load("prompt", f) for f in used]
        ws = self.work_size or max(q_img.shape[:2])
        t0 = time.perf_counter()
        pred = self.predictor.predict(q_img, [a for a, _ in p], [b for _, b in p], grid=int(grid),
                                      tile_pairing=self.tile_pairing, work_size=int(ws))
        seconds = time.perf_counter() - t0
        q_cls = self.query_class(query)
        p_cls = [self.prompt_index.class_of(self.prompt_index.find(f)) for f in used]
        gt = q_gt != 0
        if not gt.any():
            kind = "free"
        elif all(c != q_cls for c in p_cls):
            kind = "negative"
        else:
            kind = "positive"
        score = iou_fn(pred.mask, gt)
        resp = response_rate(pred.mask)
        out: dict[str, Any] = {
            "query": query, "query_class": q_cls, "prompts": used, "prompt_classes": p_cls, "kind": kind,
            "top_k": top_k, "grid": int(grid), "iou": score, "catch": is_catch(score, self.catch_iou) if kind == "positive" else None,
            "response_rate": resp, "yield": is_yield(resp, self.yield_response) if kind != "positive" else None,
            "pred_pixels": int(pred.mask.sum()), "gt_pixels": int(gt.sum()), "n_pairs": int(pred.n_pairs),
            "seconds": seconds,
        }
        if figure:
            panels = [overlay(q_img, pred.mask), overlay_pred_gt(q_img, pred.mask, gt),
                      to_rgb_uint8(pred.color), overlay(p[0][0], p[0][1], GT_RGB)]
            titles = [f"{query} + prediction", "green missed / red false / yellow hit", "snapped prediction",
                      f"prompt {used[0]}"]
            fig = contact_sheet(panels, titles, ncols=4, cell=2.6,
                                suptitle=f"{kind}: IoU {score:.3f}, response {resp:.6f}, grid {grid}, top-{top_k}")
            out["figure"] = fig
        self.last = out
        return out

    def metrics_text(self, out: dict[str, Any] | None = None) -> str:
        """One line of the metrics of an :meth:`update` result."""
        o = out or self.last or {}
        if not o:
            return ""
        verdict = ""
        if o["kind"] == "positive":
            verdict = "good catch" if o["catch"] else "escape"
        else:
            verdict = "correct yield" if o["yield"] else "overkill"
        return (f"{o['kind']} | IoU {o['iou']:.3f} | response {o['response_rate']:.6f} | {verdict} | "
                f"{o['n_pairs']} pairs in {o['seconds']:.2f} s")

    def widget(self, grid_choices: Sequence[int] = (1, 2, 4), max_top_k: int = 5):
        """The ipywidgets UI (query, prompts, top-k, grid) calling :meth:`update` on change."""
        import ipywidgets as W
        from IPython.display import Image, display

        q = W.Dropdown(options=self.queries, description="query")
        pr = W.SelectMultiple(options=self.prompt_files, rows=6, description="prompts")
        k = W.IntSlider(value=1, min=1, max=max_top_k, description="top-k")
        s = W.Dropdown(options=list(grid_choices), value=grid_choices[0], description="grid")
        text = W.HTML()
        out = W.Output()

        def set_default_prompts(*_):
            pr.value = tuple(self.default_prompts(q.value, max_top_k))

        def refresh(*_):
            with out:
                out.clear_output(wait=True)
                try:
                    res = self.update(query=q.value, prompts=list(pr.value) or None, top_k=k.value, grid=s.value)
                except ValueError as e:
                    text.value = f"<b>error:</b> {e}"
                    return
                text.value = f"<code>{self.metrics_text(res)}</code>"
                display(Image(data=figure_png(res["figure"])))

        q.observe(set_default_prompts, names="value")
        for w in (pr, k, s):
            w.observe(refresh, names="value")
        set_default_prompts()
        refresh()
        return W.VBox([W.HBox([q, s, k]), pr, text, out])
