"""The run's summary: headline figures and the results index page."""
from __future__ import annotations

import datetime as _dt
import html
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seggpt_lib.eval.metrics import BASELINE_TOL, trivial_baseline
from seggpt_lib.experiments.config import REPO_ROOT
from seggpt_lib.experiments.evaluation import PUBLISHED, comparison_table, decision_table, operating_point_text
from seggpt_lib.experiments.results import (
    BeyondFragment,
    DataFragment,
    GridAblationFragment,
    PairEvaluationFragment,
    TrainingFragment,
    format_cell,
    jsonable,
    load_fragment,
    result_dirs,
)


# ------------------------------------------------------------------------------------------
# summary and index
# ------------------------------------------------------------------------------------------
def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """``HEAD``'s commit of the repository (``+dirty`` when tracked files changed), or None."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


HEADLINE_KEYS = ("positive_miou", "catch_rate", "negative_miou", "yield_rate", "free_yield_rate", "pes")


def build_summary(results_dir: str | os.PathLike, config: dict[str, Any] | None = None,
                  stage_times: dict[str, float] | None = None, wall_s: float | None = None,
                  status: str = "complete") -> dict[str, Any]:
    """Merge the notebooks' typed fragments into one summary: ``headline`` (mIoU per tiling grid,
    positive mIoU, catch rate, negative mIoU, yield rate, defect-free yield, PES), ``published``,
    ``baselines``, the run's settings (data, preset, weights, device, steps), wall time, git
    commit, and each notebook's fragment. ``collapse`` / ``collapse_steps``: notebook 02's training
    collapse ("nothing" / "everything" at its last validation, None: none; every validation step
    with one); ``trivial_baseline``: the baseline every raw test figure equals
    (:func:`seggpt_lib.eval.metrics.trivial_baseline`; None: neither)."""
    cfg = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    d01 = load_fragment(results_dir, DataFragment, required=False)
    d02 = load_fragment(results_dir, TrainingFragment, required=False)
    d03 = load_fragment(results_dir, GridAblationFragment, required=False)
    d04 = load_fragment(results_dir, PairEvaluationFragment, required=False)
    d05 = load_fragment(results_dir, BeyondFragment, required=False)
    headline: dict[str, Any] = {}
    if d03 is not None:
        headline.update({f"miou_grid_{g}": v for g, v in d03.miou_by_grid().items()})
        headline.update({f"miou_grid_{g}_top{k}": v for (g, k), v in d03.extra_rows().items()})
    s04 = d04.summary if d04 is not None else {}
    for k in HEADLINE_KEYS:
        headline[k] = s04.get("miou" if k == "positive_miou" else k)
    # the line's decision: the calibrated row beside the raw one (never in its place), the AUCs
    cal04 = s04.get("calibrated") or {}
    for k in HEADLINE_KEYS:
        headline[f"calibrated_{k}"] = cal04.get("miou" if k == "positive_miou" else k)
    curve04 = d04.curve if d04 is not None else {}
    headline["auc_negative"], headline["auc_free"] = curve04.get("auc_negative"), curve04.get("auc_free")
    published_grid = PUBLISHED["grid_miou"]  # the original's mIoU by tiling grid
    summary = {
        "status": status,
        "headline": headline,
        "published": {**{f"miou_grid_{g}": published_grid[g] for g in (1, 2, 4)},
                      **{k: PUBLISHED[k] for k in ("positive_miou", "catch_rate", "negative_miou", "yield_rate", "pes")}},
        "baselines": s04.get("baselines", {}),
        "operating_point": d04.operating_point if d04 is not None else {},
        "without_finetuning": list(getattr(d04, "without_finetuning", []) or []) if d04 is not None else [],
        "decision": {"curve": curve04, "consistency": d04.consistency if d04 is not None else {},
                     "calibrated_counts": {k: cal04.get(k) for k in ("n_positive", "n_catch", "n_negative", "n_yield",
                                                                     "n_free", "n_free_yield")} if cal04 else {}},
        "counts": {k: s04.get(k) for k in ("n_positive", "n_catch", "n_negative", "n_yield", "n_free", "n_free_yield")},
        "thresholds": {"catch_iou": s04.get("catch_iou", cfg.get("catch_iou")),
                       "yield_response": s04.get("yield_response", cfg.get("yield_response"))},
        "eval_grid": d04.grid if d04 is not None else cfg.get("eval_grid"),
        "top_k": d04.top_k if d04 is not None else cfg.get("top_k"),
        "tile_pairing": d04.tile_pairing if d04 is not None else cfg.get("tile_pairing"),
        "work_size": d04.work_size if d04 is not None else None,
        "data": cfg.get("data", d01.source if d01 is not None else None),
        "dataset": ({k: getattr(d01, k) for k in ("source", "images", "classes", "mean", "std")} if d01 is not None
                    else dict.fromkeys(("source", "images", "classes", "mean", "std"))),
        "preset": d02.preset if d02 is not None else cfg.get("preset"),
        "model": d02.model if d02 is not None else cfg.get("model"),
        "weights": d02.weights_label if d02 is not None else cfg.get("weights"),
        "init_weights": cfg.get("weights") or None,
        "trained": d02.trained if d02 is not None else None,
        "steps": d02.steps_done if d02 is not None else None,
        "train_wall_s": d02.wall_s if d02 is not None else None,
        "best_val_miou": d02.best_val_miou if d02 is not None else None,
        "collapse": (d02.collapse or None) if d02 is not None else None,
        "collapse_steps": list(d02.collapse_steps or []) if d02 is not None else [],
        "trivial_baseline": trivial_baseline(s04) if s04 else None,
        "beyond": ({k: getattr(d05, k) for k in ("rows", "decision_rows", "operating_points", "calibration_objective",
                                                 "training", "budget_minutes", "grid", "top_k", "tune_steps",
                                                 "max_queries")} if d05 is not None else {}),
        "device": d04.device if d04 is not None and d04.device else cfg.get("device"),
        "wall_time_s": wall_s,
        "stage_times_s": stage_times or {},
        "git_commit": git_commit(),
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        "parameters": cfg,
        "fragments": {f.NAME: f.to_dict() for f in (d01, d02, d03, d04, d05) if f is not None},
    }
    return jsonable(summary)


def headline_table(summary: dict[str, Any]):
    """The headline as a table: metric, ours (the raw masks), calibrated (the line's decision chosen
    on validation; empty where it does not apply), original, paint nothing, paint everything."""
    h, pub, b = summary.get("headline", {}), summary.get("published", {}), summary.get("baselines", {})
    nothing, everything = b.get("paint_nothing", {}), b.get("paint_everything", {})
    labels = {"positive_miou": "positive mIoU", "catch_rate": "catch rate", "negative_miou": "negative mIoU",
              "yield_rate": "yield rate (negative prompts)", "free_yield_rate": "defect-free yield", "pes": "PES"}
    bkey = {"positive_miou": "miou"}
    rows = []
    for k, v in h.items():
        if k.startswith("miou_grid_"):
            rest = k[len("miou_grid_"):]
            label = f"mIoU grid {rest.replace('_top', ', top-')}"
            rows.append({"metric": label, "ours": v, "calibrated": None, "original": pub.get(k),
                         "paint_nothing": nothing.get("miou"), "paint_everything": everything.get("miou")})
    for k in HEADLINE_KEYS:
        if k in h:
            rows.append({"metric": labels[k], "ours": h[k], "calibrated": h.get(f"calibrated_{k}"), "original": pub.get(k),
                         "paint_nothing": nothing.get(bkey.get(k, k)), "paint_everything": everything.get(bkey.get(k, k))})
    cols = ["metric", "ours", "calibrated", "original", "paint_nothing", "paint_everything"]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype({c: float for c in cols[1:]}, errors="ignore")


# ------------------------------------------------------------------------------------------
# figures equal to a trivial baseline's; a training collapse
# ------------------------------------------------------------------------------------------
BASELINE_LABELS = {"paint_nothing": "paint nothing", "paint_everything": "paint everything"}


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def baseline_marks(table, columns: tuple[str, ...] = ("ours", "calibrated"),
                   tol: float = BASELINE_TOL) -> dict[tuple[int, str], str]:
    """The figures of a headline table (:func:`headline_table`, or notebook 04's
    :func:`~seggpt_lib.experiments.evaluation.comparison_table`) that equal a trivial baseline's
    on the same row, within ``tol`` (:data:`~seggpt_lib.eval.metrics.BASELINE_TOL`):
    ``{(row position, column): "= paint nothing"}`` (``"= paint nothing, paint everything"`` where
    both baselines give that figure). Only the ``columns`` present are compared."""
    marks: dict[tuple[int, str], str] = {}
    cols = [c for c in columns if c in table.columns]
    for i, row in enumerate(table.to_dict("records")):
        for col in cols:
            v = _finite(row.get(col))
            if v is None:
                continue
            same = [label for key, label in BASELINE_LABELS.items()
                    if (b := _finite(row.get(key))) is not None and abs(v - b) <= tol]
            if same:
                marks[(i, col)] = "= " + ", ".join(same)
    return marks


def baseline_column(table, columns: tuple[str, ...] = ("ours", "calibrated"), tol: float = BASELINE_TOL) -> list[str]:
    """One text per row of ``table`` naming its figures equal to a trivial baseline's
    (:func:`baseline_marks`), e.g. ``"ours = paint nothing"``; empty where none is."""
    marks = baseline_marks(table, columns, tol)
    return ["; ".join(f"{c} {marks[(i, c)]}" for c in columns if (i, c) in marks) for i in range(len(table))]


def baseline_note(summary: dict[str, Any], tol: float = BASELINE_TOL) -> str:
    """Markdown for notebook 04: the figures of :func:`seggpt_lib.eval.metrics.evaluate`'s
    ``summary`` (raw, and calibrated where it has them) that equal a trivial baseline's, and a
    warning when every raw figure equals one (the model does not read its images); "" when none does."""
    comp = comparison_table(summary)
    marks = baseline_marks(comp, tol=tol)
    if not marks:
        return ""
    items = [f"{row['metric']}{' (calibrated)' if col == 'calibrated' else ''} {float(row[col]):.3f} {marks[(i, col)]}"
             for i, row in enumerate(comp.to_dict("records")) for col in ("ours", "calibrated") if (i, col) in marks]
    text = (f"**Equal to a trivial baseline** (within {tol:g}, on the same pairs): " + "; ".join(items) + ".")
    whole = trivial_baseline(summary, tol=tol)
    if whole:
        text = (f"**WARNING: every figure equals the {BASELINE_LABELS[whole]} baseline's: the model evaluated does "
                f"not read its images.** " + text)
    return text


def training_collapse(summary: dict[str, Any]) -> tuple[str | None, list[int]]:
    """Notebook 02's collapse in a summary (``collapse`` / ``collapse_steps``, else its training
    fragment's, for a summary written before those keys): ``("nothing" | "everything" | None, steps)``."""
    if "collapse" in summary:
        return summary.get("collapse") or None, list(summary.get("collapse_steps") or [])
    frag = (summary.get("training") or (summary.get("fragments") or {}).get(TrainingFragment.NAME) or {})
    return frag.get("collapse") or None, list(frag.get("collapse_steps") or [])


def _headline_baseline(summary: dict[str, Any]) -> str | None:
    """:func:`~seggpt_lib.eval.metrics.trivial_baseline` of a summary's raw headline (a summary
    written before its ``trivial_baseline`` key)."""
    h = summary.get("headline") or {}
    figures = {"miou": h.get("positive_miou"), **{k: h.get(k) for k in ("catch_rate", "yield_rate", "free_yield_rate", "pes")}}
    return trivial_baseline(figures, summary.get("baselines") or {})


def collapse_html(summary: dict[str, Any]) -> list[str]:
    """The results page's warning boxes: the training collapsed (notebook 02), and every raw test
    figure equals a trivial baseline's; [] when neither."""
    from seggpt_lib.experiments.training import collapse_banner

    out = []
    collapse, steps = training_collapse(summary)
    if collapse:
        text = collapse_banner(collapse, steps).removeprefix("WARNING: COLLAPSE: ")
        out.append(f"<div class=warn role=alert><strong>WARNING: TRAINING COLLAPSED: the model paints "
                   f"{html.escape(collapse.upper())}.</strong><br>{html.escape(text[:1].upper() + text[1:])} "
                   f"(notebook 02; <code>metrics.csv</code>, column <code>collapse</code>).</div>")
    whole = summary["trivial_baseline"] if "trivial_baseline" in summary else _headline_baseline(summary)
    if whole in BASELINE_LABELS:
        out.append(f"<div class=warn role=alert><strong>WARNING: every headline figure on the test pairs equals the "
                   f"{BASELINE_LABELS[whole]} baseline's</strong>: the model evaluated does not read its images "
                   f"(figures marked below).</div>")
    return out


def _html_table(df, floatfmt: str = ".3f", marks: dict[tuple[int, str], str] | None = None) -> str:
    """``df`` as an HTML table; ``marks`` (:func:`baseline_marks`): a text set beside a cell's figure."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for col, v in zip(df.columns, row):
            is_num = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            mark = (marks or {}).get((i, col))
            extra = f" <span class=baseline>({html.escape(mark)})</span>" if mark else ""
            cells.append(f"<td{' class=num' if is_num else ''}>{html.escape(format_cell(v, floatfmt))}{extra}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.meta td:first-child{font-weight:600}.status-failed{color:#b00;font-weight:700}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs a{display:block;width:250px;font-size:.8em;text-decoration:none;color:#333}
.figs img{width:250px;border:1px solid #ccc}small{color:#666}
.warn{border:3px solid #b00;background:#fff0f0;color:#600;padding:.8em 1em;margin:1em 0;font-size:1.05em}
.baseline{color:#b00;font-weight:600;white-space:nowrap}
"""


def beyond_table(summary: dict[str, Any]):
    """Notebook 05's rows from a summary: recipe, prompt, training steps, mIoU, catch, yield,
    defect-free yield, PES (empty when 05 did not run)."""
    cols = ["recipe", "prompt", "steps", "mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES"]
    rows = (summary.get("beyond") or {}).get("rows") or []
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)


def _beyond_html(summary: dict[str, Any]) -> list[str]:
    df = beyond_table(summary)
    if not len(df):
        return []
    b = summary.get("beyond") or {}
    df = df.assign(steps=[("–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v)))
                          for v in df["steps"]])
    budget = f"{b.get('budget_minutes')} min" if b.get("budget_minutes") is not None else "steps"
    out = ["<h2>Beyond the original</h2>", _html_table(df),
           f"<p><small>Notebook 05: the original's negatives (a negative pair paints the query's own defect) against "
           f"class-aware negatives (it paints nothing), trained with the same budget "
           f"({budget}), each with one image prompt, a top-{b.get('top_k')} ensemble and a "
           f"learned prompt ({b.get('tune_steps')} tuning steps per class, the model frozen); grid "
           f"{b.get('grid')}, at most {b.get('max_queries')} queries per kind.</small></p>"]
    drows = b.get("decision_rows") or []
    if drows:
        cols = ["recipe", "prompt", "decision", "catch_rate", "yield_rate", "free_yield_rate", "PES"]
        out += ["<h3>The line's decision: raw and calibrated rows</h3>",
                _html_table(pd.DataFrame([{c: r.get(c) for c in cols} for r in drows], columns=cols)),
                f"<p><small>Each (recipe, prompt) with its own operating point, calibrated on the validation split "
                f"only ({b.get('calibration_objective')}); the raw row is the snapped masks, never replaced.</small></p>"]
    return out


def _without_finetuning_html(summary: dict[str, Any]) -> list[str]:
    """The shipped pretrained checkpoint, not fine-tuned, beside the fine-tuned model (notebook 04)."""
    rows = summary.get("without_finetuning") or []
    if not rows:
        return []
    cols = ["model", "decision", "mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES"]
    return ["<h2>Without fine-tuning: the pretrained checkpoint, one-shot</h2>",
            _html_table(pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)),
            "<p><small>The shipped in-context checkpoint (pretrained on generic shapes only, "
            "<code>make pretrained</code>) prompted one-shot on the same test pairs: every defect class is one it "
            "never saw. Beside it the model notebook 02 fine-tuned from it; each calibrated on the validation split "
            "only.</small></p>"]


def _decision_html(summary: dict[str, Any]) -> list[str]:
    """The line's decision: the raw and calibrated rows of the test pairs, beside the baselines and
    the original's point; the operating point, the AUCs, the prompt consistency's verdict."""
    h = summary.get("headline", {})
    keys = ("catch_rate", "yield_rate", "free_yield_rate", "pes")
    if h.get("catch_rate") is None:
        return []
    cal = {k: h.get(f"calibrated_{k}") for k in keys}
    df = decision_table({k: h.get(k) for k in keys}, cal if cal["catch_rate"] is not None else None,
                        summary.get("baselines"))
    op = summary.get("operating_point") or {}
    d = summary.get("decision") or {}

    def auc(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    notes = [operating_point_text(op or None)]
    if op.get("path"):
        notes.append(f"Written to <code>{html.escape(str(op['path']))}</code>.")
    notes.append(f"Catch / yield curve on the test pairs (the decision's image threshold swept): AUC "
                 f"{auc(h.get('auc_negative'))} with negative prompts, {auc(h.get('auc_free'))} with defect-free "
                 f"queries (figure <a href=\"figures/04_catch_yield.png\">04_catch_yield</a>).")
    sentence = (d.get("consistency") or {}).get("sentence")
    if sentence:
        notes.append(sentence)
    return ["<h2>The line's decision: raw and calibrated</h2>", _html_table(df),
            "<p><small>" + " ".join(n if n.startswith("Written") or n.startswith("Catch") else html.escape(n)
                                    for n in notes) + "</small></p>"]


def write_index_html(results_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """``index.html``: headline table, run settings, links to every report, table and figure
    (relative links; inline CSS, no script, nothing fetched)."""
    dirs = result_dirs(results_dir)
    root = dirs["root"]
    h = html.escape
    status = summary.get("status", "complete")
    collapse, collapse_steps = training_collapse(summary)
    meta = [("status", status), ("data", summary.get("data")), ("preset", summary.get("preset")),
            ("weights evaluated", summary.get("weights")),
            ("initial weights", summary.get("init_weights") or "none (random initialisation)"),
            ("training steps", summary.get("steps")),
            ("training collapse", f"{collapse} (validation steps {', '.join(map(str, collapse_steps))})" if collapse
             else "none"),
            ("device", summary.get("device")),
            ("evaluation", f"grid {summary.get('eval_grid')}, top-{summary.get('top_k')}, "
                           f"{summary.get('tile_pairing')} tile pairing, work size {summary.get('work_size')}"),
            ("thresholds", f"catch IoU ≥ {summary.get('thresholds', {}).get('catch_iou')}, "
                           f"yield response < {summary.get('thresholds', {}).get('yield_response')}"),
            ("wall time", f"{(summary.get('wall_time_s') or 0) / 60:.1f} min"),
            ("git commit", summary.get("git_commit")), ("finished", summary.get("finished"))]
    meta_rows = "".join(
        f"<tr><td>{h(k)}</td><td{' class=status-failed' if k == 'status' and v != 'complete' else ''}>{h(str(v))}</td></tr>"
        for k, v in meta)
    table = headline_table(summary)
    marks = baseline_marks(table)
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>SegGPT defect segmentation: results</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SegGPT few-shot defect segmentation: results</h1>",
        *collapse_html(summary),
        "<h2>Headline</h2>",
        _html_table(table, marks=marks),
        "<p><small>original: the published figures of the project this one grows from (11 VISION queries, grid 2; "
        "one per defect type). Paint nothing / paint everything: trivial baselines on the same pairs. "
        "PES = 0.5·catch + 0.5·yield; a silent model scores 0.5."
        + (f" A figure marked “= paint nothing” (or everything) equals that baseline's within {BASELINE_TOL:g}."
           if marks else "") + "</small></p>",
        *_decision_html(summary),
        *_without_finetuning_html(summary),
        *_beyond_html(summary),
        "<h2>Run</h2>",
        f"<table class=meta>{meta_rows}</table>",
        "<h2>Reports</h2><ul>",
    ]
    for p in sorted(dirs["reports"].glob("*.html")):
        parts.append(f"<li><a href=\"reports/{h(p.name)}\">{h(p.stem)}</a></li>")
    parts.append("</ul><h2>Tables</h2><ul>")
    for p in sorted(dirs["tables"].glob("*.csv")):
        md = p.with_suffix(".md")
        extra = f" · <a href=\"tables/{h(md.name)}\">md</a>" if md.is_file() else ""
        parts.append(f"<li>{h(p.stem)}: <a href=\"tables/{h(p.name)}\">csv</a>{extra}</li>")
    parts.append("</ul><h2>Figures</h2><div class=figs>")
    for p in sorted(dirs["figures"].glob("*.png")):
        parts.append(f"<a href=\"figures/{h(p.name)}\"><img src=\"figures/{h(p.name)}\" alt=\"{h(p.stem)}\">{h(p.stem)}</a>")
    parts.append("</div><h2>Files</h2><ul><li><a href=\"summary.json\">summary.json</a>: every figure and setting</li></ul>")
    parts += ablation_links(root)
    parts.append("<h2>Explorer</h2><p>Try other queries, prompts, top-k and grids on this run interactively: "
                 "<code>make lab</code> in the repository opens <code>notebooks/explorer.ipynb</code> in JupyterLab "
                 "at <a href=\"http://localhost:8888/lab/tree/notebooks/explorer.ipynb\">"
                 "http://localhost:8888/lab/tree/notebooks/explorer.ipynb</a> (while it runs; "
                 "<code>make lab NO_BROWSER=1</code> on a headless machine). It reads the repository's "
                 "<code>results/</code>; for another results folder set its <code>results_dir</code> parameter.</p>")
    parts.append("</body></html>\n")
    path = root / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# ablations in the results index
# ------------------------------------------------------------------------------------------
def ablation_links(results_dir: str | os.PathLike) -> list[str]:
    """The "Ablations" section of the results index: a link to every
    ``ablations/<name>/index.html`` (``seggpt ablate``) with its cells done / total; none: []."""
    root = Path(results_dir)
    pages = sorted((root / "ablations").glob("*/index.html"))
    if not pages:
        return []
    import json

    h = html.escape
    items = []
    for p in pages:
        extra = ""
        try:
            prog = json.loads((p.parent / "progress.json").read_text())
            extra = f" ({prog.get('done')}/{prog.get('total')} cells complete" + (
                f", {prog['failed']} failed" if prog.get("failed") else "") + ")"
        except (OSError, ValueError):
            pass
        items.append(f"<li><a href=\"ablations/{h(p.parent.name)}/index.html\">{h(p.parent.name)}</a>{h(extra)}</li>")
    return ["<h2>Ablations</h2><p><small><code>seggpt ablate</code> grids (<code>make ablate NAME=...</code>): "
            "each cell's headline figures as mean ± standard deviation over seeds.</small></p><ul>", *items, "</ul>"]


def refresh_results_index(results_dir: str | os.PathLike) -> Path:
    """Rewrite ``<results_dir>/index.html`` so that it links to the ablations: from its
    ``summary.json`` where the pipeline ran, else a page with the ablations alone."""
    import json

    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        summary = json.loads((root / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and summary.get("headline") is not None:
        return write_index_html(root, summary)
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
             "<title>SegGPT defect segmentation: results</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>SegGPT few-shot defect segmentation: results</h1>",
             "<p>No pipeline run in this folder yet (<code>make reproduce</code> writes its headline here).</p>",
             *ablation_links(root), "</body></html>\n"]
    path = root / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# notebook reports: results first, code folded
# ------------------------------------------------------------------------------------------
RESULTS_TAG = "report-results"  # the cell that repeats the notebook's closing results at the top

REPORT_CSS = """
.report-bar{position:sticky;top:0;z-index:10;background:#f7f7f7;border-bottom:1px solid #ddd;padding:.35em 1em;
 font:14px system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;display:flex;gap:1.2em;align-items:center}
.report-bar a{color:#0645ad}.report-bar label{cursor:pointer;user-select:none}
#report-show-code{position:absolute;opacity:0;width:1px;height:1px;margin:0}
.report-bar label::before{content:"\\2610  "}#report-show-code:checked ~ nav label::before{content:"\\2611  "}
#report-show-code:focus-visible ~ nav label{outline:2px solid #0645ad}
#report-show-code:not(:checked) ~ main .jp-CodeCell .jp-Cell-inputWrapper{display:none}
#report-show-code:not(:checked) ~ main .jp-CodeCell.jp-mod-noOutputs{display:none}
#report-show-code:not(:checked) ~ main .jp-CodeCell .jp-OutputPrompt{visibility:hidden}
main .celltag_report-results .jp-Cell-inputWrapper{display:none}
main .celltag_report-results{border:2px solid #4a7;border-radius:6px;margin:.5em 0 1.5em;padding:.3em}
@media print{.report-bar{display:none}}
"""


def results_first(nb) -> Any:
    """A copy of an executed notebook that opens with its results: the outputs of its last code
    cell that shows or prints something (each pipeline notebook ends with its summary table or sentence)
    repeated in a framed cell after the title, or, where a cell failed, its error."""
    import copy as _copy

    import nbformat

    nb = _copy.deepcopy(nb)
    cells = nb.cells

    def shown(o) -> bool:  # what a reader reads: displays and printed lines (warnings on stderr left out)
        t = o.get("output_type")
        return t in ("display_data", "execute_result") or (t == "stream" and o.get("name") == "stdout")

    error = next(((i, o) for i, c in enumerate(cells) if c.cell_type == "code"
                  for o in c.get("outputs", []) if o.get("output_type") == "error"), None)
    if error is not None:
        i, o = error
        head = nbformat.v4.new_markdown_cell(
            f"**This run failed** in cell {i} ({o.get('ename')}: {o.get('evalue')}); its outputs up to there "
            "follow (the switch at the top shows the code).")
        new = [head]
    else:
        last = next((c for c in reversed(cells) if c.cell_type == "code"
                     and any(shown(o) for o in c.get("outputs", []))), None)
        if last is None:
            return nb
        res = nbformat.v4.new_code_cell("", metadata={"tags": [RESULTS_TAG]})
        res.outputs = [_copy.deepcopy(o) for o in last.outputs if shown(o)]
        new = [nbformat.v4.new_markdown_cell("**Results** (the notebook's closing output; how they came about "
                                             "follows)"), res]
    at = 1 if cells and cells[0].cell_type == "markdown" else 0  # after the title
    nb.cells = cells[:at] + new + cells[at:]
    return nb


def fold_code(page: str, index_href: str | None = "../index.html") -> str:
    """A notebook's nbconvert HTML page with its code cells hidden by default: a bar at the top
    with a "show code" switch (a checkbox and CSS: no script) and a link back to the results index."""
    import re

    bar = ("<input type=checkbox id=report-show-code aria-label=\"show code\">"
           "<nav class=report-bar><label for=report-show-code>show code</label>"
           + (f"<a href=\"{html.escape(index_href)}\">results index</a>" if index_href else "")
           + "<span><small>code cells are folded; the switch shows them</small></span></nav>")
    page = page.replace("</head>", f"<style>{REPORT_CSS}</style></head>", 1)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + bar, page, count=1)
