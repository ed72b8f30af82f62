"""The aggregate of an ablation (:mod:`seggpt_lib.experiments.ablate`): ``index.html``, tables and figures.

Every finished cell's metrics (``summary.json``'s headline, else its top-level keys) are grouped by
grid point (the cells of one group differ by their seed only) into mean ± standard deviation over
the seeds. Per metric the best group is marked the winner only when its lead over the runner-up
exceeds the spread (the larger of the two standard deviations), with at least two seeds each.

Written to the ablation's folder: ``tables/ablation.csv`` / ``.md`` (one row per group: the
varied values, seeds, ``<metric>_mean``, ``<metric>_std``, ``<metric>_winner``),
``tables/cells.csv`` / ``.md`` (one row per cell), ``figures/<key>.png`` (each metric against
each varied key, error bars: the standard deviation), and ``index.html`` (no script), linked from
the results index.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from seggpt_lib.experiments.ablate import Ablation, Outcome, _lookup, is_finished, read_summary
from seggpt_lib.experiments.report import _CSS, _html_table, refresh_results_index
from seggpt_lib.experiments.results import format_cell, result_dirs, save_figure


def metric_value(summary: Mapping[str, Any], key: str) -> float:
    """A metric of a cell's summary: ``headline[key]``, else the (dotted) key in the summary; NaN
    where it is missing or not a number."""
    v = (summary.get("headline") or {}).get(key)
    if v is None:
        v = _lookup(summary, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def show_value(v: Any) -> str:
    """A config value as a table shows it (JSON: null, [255, 255, 255], 0.75)."""
    if isinstance(v, str):
        return v
    return json.dumps(v)


def cell_table(ab: Ablation) -> pd.DataFrame:
    """One row per cell: name, group, seed, status (complete / failed / not run), minutes, the
    varied values and the metrics (NaN where the cell did not complete)."""
    rows = []
    for c in ab.cells:
        s = read_summary(c.dir)
        status = "complete" if is_finished(c) else ("failed" if s and s.get("status") == "failed" else
                                                    "failed" if (c.dir / "cell.log").is_file() else "not run")
        row: dict[str, Any] = {"cell": c.name, "group": c.group, "seed": c.seed, "status": status}
        if c.variant is not None:
            row["variant"] = c.variant
        for k in ab.varied:
            row[k] = show_value(_lookup(c.config, k))
        row["minutes"] = (s.get("wall_time_s") or math.nan) / 60 if s else math.nan
        for m in ab.spec.metrics:
            row[m] = metric_value(s, m) if status == "complete" else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def group_table(ab: Ablation, cells: pd.DataFrame) -> pd.DataFrame:
    """One row per group (in the grid's order): the varied values, ``seeds`` (cells complete of
    the group's cells), ``<metric>_mean``, ``<metric>_std`` (over seeds; NaN with one)."""
    rows = []
    done = cells[cells["status"] == "complete"]
    for group in dict.fromkeys(cells["group"]):
        mine, ok = cells[cells["group"] == group], done[done["group"] == group]
        first = mine.iloc[0]
        row: dict[str, Any] = {"group": group}
        if "variant" in cells:
            row["variant"] = first["variant"]
        for k in ab.varied:
            row[k] = first[k]
        row["seeds"] = f"{len(ok)}/{len(mine)}"
        row["n"] = len(ok)
        for m in ab.spec.metrics:
            vals = pd.to_numeric(ok[m], errors="coerce").dropna().to_numpy(dtype=float)
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def winners(ab: Ablation, groups: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per metric: ``winner`` (a group, or None), ``best``, ``runner_up``, ``lead``, ``spread`` and
    ``why``: the best group by mean wins only when its lead over the runner-up exceeds the larger
    of their standard deviations (both over at least two seeds)."""
    out: dict[str, dict[str, Any]] = {}
    for m in ab.spec.metrics:
        lower = m in ab.spec.lower_is_better
        g = groups[np.isfinite(groups[f"{m}_mean"].astype(float))]
        rec: dict[str, Any] = {"winner": None, "best": None, "runner_up": None, "lead": None, "spread": None,
                               "lower_is_better": lower}
        if len(g) < 2:
            rec["why"] = "fewer than two groups with a value"
            out[m] = rec
            continue
        g = g.sort_values(f"{m}_mean", ascending=lower)
        best, second = g.iloc[0], g.iloc[1]
        lead = abs(float(best[f"{m}_mean"]) - float(second[f"{m}_mean"]))
        spread = max(float(best[f"{m}_std"]), float(second[f"{m}_std"]))
        rec.update(best=best["group"], runner_up=second["group"], lead=lead,
                   spread=None if math.isnan(spread) else spread)
        if best["n"] < 2 or second["n"] < 2 or math.isnan(spread):
            rec["why"] = "fewer than two seeds: no spread to compare the lead with"
        elif lead > spread:
            rec["winner"] = best["group"]
            rec["why"] = f"lead {lead:.4f} > spread {spread:.4f}"
        else:
            rec["why"] = f"lead {lead:.4f} <= spread {spread:.4f}: within the seeds' spread"
        out[m] = rec
    return out


def _pm(mean: float, std: float, fmt: str = ".3f") -> str:
    if math.isnan(mean):
        return "–"
    return format(mean, fmt) + ("" if math.isnan(std) else " ± " + format(std, fmt))


def mean_std_table(ab: Ablation, groups: pd.DataFrame, wins: Mapping[str, Mapping[str, Any]],
                   mark: str = "**") -> pd.DataFrame:
    """The groups with each metric as text ``mean ± std``; the winner's wrapped in ``mark``."""
    cols = ["group", *(["variant"] if "variant" in groups else []), *ab.varied, "seeds"]
    df = groups[cols].copy()
    if "variant" in df:  # the variant names the group
        df = df.drop(columns=["group"])
    for m in ab.spec.metrics:
        vals = []
        for _, r in groups.iterrows():
            t = _pm(float(r[f"{m}_mean"]), float(r[f"{m}_std"]))
            vals.append(f"{mark}{t}{mark}" if wins[m]["winner"] == r["group"] else t)
        df[m] = vals
    return df


def _md(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v, ".4f") for v in row) + " |")
    return "\n".join(lines) + "\n"


def _sort_key(text: str):
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return (2, 0.0, str(text))
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(text))


def figures(ab: Ablation, groups: pd.DataFrame, root: Path) -> list[Path]:
    """One figure per varied key: a panel per metric, mean ± std (error bars) against the key's
    values; one line per combination of the other varied keys that takes two values or more of
    this one (a one-at-a-time list of variants: the reference and the variants that change it)."""
    from matplotlib.figure import Figure

    out: list[Path] = []
    metrics = list(ab.spec.metrics)
    for key in ab.varied:
        others = [k for k in ab.varied if k != key]
        series = []
        for combo, g in groups.groupby(others, sort=False) if others else [((), groups)]:
            if g[key].nunique() >= 2:
                label = ", ".join(f"{k}={v}" for k, v in zip(others, combo if isinstance(combo, tuple) else (combo,)))
                series.append((label, g))
        if not series:
            continue
        xs = sorted(dict.fromkeys(groups[key]), key=_sort_key)
        ncol = min(3, len(metrics))
        nrow = math.ceil(len(metrics) / ncol)
        fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow))
        for i, m in enumerate(metrics):
            ax = fig.add_subplot(nrow, ncol, i + 1)
            for j, (label, g) in enumerate(series):
                g = g.assign(_x=[xs.index(v) for v in g[key]]).sort_values("_x")
                off = (j - (len(series) - 1) / 2) * 0.06
                y = g[f"{m}_mean"].astype(float).to_numpy()
                e = np.nan_to_num(g[f"{m}_std"].astype(float).to_numpy())
                ax.errorbar(g["_x"].to_numpy() + off, y, yerr=e, marker="o", capsize=4,
                            label=label if len(series) > 1 or label else None)
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(x) for x in xs], rotation=20 if max(len(str(x)) for x in xs) > 6 else 0,
                               fontsize=8)
            ax.set_title(m, fontsize=10)
            ax.set_xlabel(key, fontsize=9)
            ax.grid(alpha=0.3)
        handles, labels = fig.axes[0].get_legend_handles_labels()
        if labels and len(series) > 1:
            fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=min(3, len(labels)),
                       bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 3)))
        fig.suptitle(f"{ab.name}: metrics against {key} (mean ± std over seeds)", fontsize=11)
        fig.tight_layout()
        out.append(save_figure(fig, root, "ablation_" + key.replace(".", "_"), show=False))
    return out


def write_ablation(ab: Ablation, wall_s: float | None = None, failures: Mapping[str, Outcome] | None = None) -> Path:
    """Aggregate ``ab``'s cells: the tables, the figures, ``aggregate.json`` and ``index.html``
    in its folder; the results index links to it. Returns the page."""
    root = ab.root
    dirs = result_dirs(root)
    cells = cell_table(ab)
    groups = group_table(ab, cells)
    wins = winners(ab, groups)
    num = groups.copy()
    for m in ab.spec.metrics:
        num[f"{m}_winner"] = [wins[m]["winner"] == g for g in num["group"]]
    num.to_csv(dirs["tables"] / "ablation.csv", index=False)
    cells.to_csv(dirs["tables"] / "cells.csv", index=False)
    lower = [m for m in ab.spec.metrics if m in ab.spec.lower_is_better]
    note = ("Mean ± standard deviation over the seeds (n complete / cells); **bold**: the winner of the column "
            "(its lead over the runner-up exceeds the larger standard deviation of the two). Higher is better"
            + (f" except {', '.join(lower)}" if lower else "") + ".")
    (dirs["tables"] / "ablation.md").write_text(f"### {ab.name}\n\n" + _md(mean_std_table(ab, groups, wins))
                                                + f"\n{note}\n", encoding="utf-8")
    (dirs["tables"] / "cells.md").write_text(f"### {ab.name}: every cell\n\n" + _md(cells), encoding="utf-8")
    figs = figures(ab, groups, root) if len(cells[cells["status"] == "complete"]) else []
    n_done = int((cells["status"] == "complete").sum())
    n_failed = int((cells["status"] == "failed").sum())
    (root / "aggregate.json").write_text(json.dumps({
        "name": ab.name, "cells": len(cells), "complete": n_done, "failed": n_failed, "winners": wins,
        "groups": json.loads(num.to_json(orient="records")), "wall_s": wall_s}, indent=1) + "\n")
    page = _index_html(ab, cells, groups, wins, figs, failures or {}, wall_s, note)
    path = root / "index.html"
    path.write_text(page, encoding="utf-8")
    refresh_results_index(root.parent.parent)
    return path


def _index_html(ab: Ablation, cells: pd.DataFrame, groups: pd.DataFrame, wins, figs: list[Path],
                failures: Mapping[str, Outcome], wall_s: float | None, note: str) -> str:
    h = html.escape
    spec = ab.spec
    n_done = int((cells["status"] == "complete").sum())
    n_failed = int((cells["status"] == "failed").sum())
    # the winner's cell: bold with a star (an invisible marker put around its text)
    table_html = _bold_marked(_html_table(mean_std_table(ab, groups, wins, mark="\u2063")))
    win_rows = []
    for m, w in wins.items():
        win_rows.append(f"<tr><td>{h(m)}</td><td>{h(str(w['winner'] or '–'))}</td><td>{h(str(w.get('why', '')))}"
                        "</td></tr>")
    meta = [("grid file", str(ab.source)), ("cells", f"{n_done} complete, {n_failed} failed, {len(cells)} in all"),
            ("varied", ", ".join(ab.varied) or "nothing (seeds only)"),
            ("seeds", ", ".join(str(s) for s in dict.fromkeys(cells["seed"]))),
            ("notebooks", ", ".join(Path(n).name for n in ab.cells[0].notebooks) if ab.cells else ""),
            ("executor", f"{ab.executor.kind}" + (f", {ab.executor.jobs} at a time" if ab.executor.kind == "local"
                                                  else "")),
            ("quick variant", "yes" if ab.quick else "no"),
            ("wall time of the last run", f"{(wall_s or 0) / 60:.1f} min"),
            ("written", time.strftime("%Y-%m-%d %H:%M:%S"))]
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
             f"<title>Ablation {h(ab.name)}</title><style>{_CSS}.win{{font-weight:700}}</style></head><body>",
             f"<h1>Ablation: {h(ab.name)}</h1>",
             f"<p>{h(spec.description)}</p>" if spec.description else "",
             "<p><a href=\"../../index.html\">results index</a></p>",
             "<h2>Mean ± standard deviation over seeds</h2>", table_html,
             f"<p><small>{h(note).replace('**bold**', '<b>bold ★</b>')} Tables: "
             "<a href=\"tables/ablation.csv\">csv</a> · <a href=\"tables/ablation.md\">md</a>; every cell: "
             "<a href=\"tables/cells.csv\">csv</a> · <a href=\"tables/cells.md\">md</a>.</small></p>",
             "<h2>Winners</h2><table><thead><tr><th>metric</th><th>winner</th><th>why</th></tr></thead><tbody>",
             *win_rows, "</tbody></table>"]
    if figs:
        parts.append("<h2>Figures</h2><div class=figs>")
        for p in figs:
            parts.append(f"<a href=\"figures/{h(p.name)}\"><img src=\"figures/{h(p.name)}\" alt=\"{h(p.stem)}\">"
                         f"{h(p.stem)}</a>")
        parts.append("</div>")
    parts.append("<h2>Cells</h2><table><thead><tr><th>cell</th><th>seed</th><th>status</th><th>minutes</th>"
                 "<th>links</th></tr></thead><tbody>")
    for _, r in cells.iterrows():
        name = r["cell"]
        links = []
        if (ab.root / name / "index.html").is_file():
            links.append(f"<a href=\"{h(name)}/index.html\">results</a>")
        if (ab.root / name / "cell.log").is_file():
            links.append(f"<a href=\"{h(name)}/cell.log\">log</a>")
        cls = " class=status-failed" if r["status"] == "failed" else ""
        mins = "–" if math.isnan(r["minutes"]) else f"{r['minutes']:.1f}"
        parts.append(f"<tr><td>{h(name)}</td><td class=num>{r['seed']}</td><td{cls}>{h(r['status'])}</td>"
                     f"<td class=num>{mins}</td><td>{' · '.join(links)}</td></tr>")
    parts.append("</tbody></table>")
    failed = cells[cells["status"] == "failed"]
    if len(failed):
        parts.append("<h2>Failed cells</h2>")
        for name in failed["cell"]:
            o = failures.get(name)
            s = read_summary(ab.root / name) or {}
            err = (o.error if o is not None else None) or (s.get("ablation") or {}).get("error") or "see its log"
            parts.append(f"<h3>{h(name)}</h3><pre>{h(str(err)[-4000:])}</pre>"
                         f"<p><a href=\"{h(name)}/cell.log\">cell.log</a></p>")
    parts.append("<h2>Run</h2><table class=meta>" + "".join(f"<tr><td>{h(k)}</td><td>{h(str(v))}</td></tr>"
                                                           for k, v in meta) + "</table>")
    parts.append("<p><small>Rerun the same command to run the cells not finished (finished ones are skipped); a "
                 "cell's folder name is its varied values, seed and a hash of its resolved config.</small></p>")
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def _bold_marked(table_html: str) -> str:
    """Cells whose text was wrapped in the invisible marker U+2063: bold with a star."""
    import re

    return re.sub("<td([^>]*)>\u2063(.*?)\u2063</td>", r"<td\1 class=win>★ \2</td>", table_html)
