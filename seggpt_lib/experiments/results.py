"""Where results go and how they are written: tables (CSV + Markdown), figures, per-notebook JSON fragments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
import json
import math
import numpy as np
import os

from seggpt_lib.experiments import viz
from seggpt_lib.experiments.config import PipelineError


# ------------------------------------------------------------------------------------------
# results folders, tables, figures, fragments
# ------------------------------------------------------------------------------------------
def result_dirs(results_dir: str | os.PathLike) -> dict[str, Path]:
    """``root``, ``tables``, ``figures``, ``reports``, ``work`` of a results folder (created)."""
    root = Path(results_dir)
    out = {"root": root}
    for name in ("tables", "figures", "reports", "work"):
        out[name] = root / name
        out[name].mkdir(parents=True, exist_ok=True)
    return out


def format_cell(v: Any, floatfmt: str, small: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "–"
        if small and 0 < abs(f) < 0.01:  # response rates: keep the digits that matter
            return f"{f:.6f}"
        return format(f, floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df, floatfmt: str = ".4f", index: bool = False) -> str:
    """A DataFrame as a GitHub Markdown table (NaN and None as an en dash)."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    small = ["response" in c for c in cols]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v, floatfmt, sm) for v, sm in zip(row, small)) + " |")
    return "\n".join(lines) + "\n"


def write_table(df, results_dir: str | os.PathLike, name: str, title: str | None = None, floatfmt: str = ".4f",
                note: str | None = None):
    """Write ``tables/<name>.csv`` and ``tables/<name>.md`` (with ``title`` and ``note``);
    returns ``df`` so a notebook cell can end with it and show the table."""
    dirs = result_dirs(results_dir)
    df.to_csv(dirs["tables"] / f"{name}.csv", index=False)
    md = (f"### {title}\n\n" if title else "") + markdown_table(df, floatfmt) + (f"\n{note}\n" if note else "")
    (dirs["tables"] / f"{name}.md").write_text(md, encoding="utf-8")
    return df


def save_figure(fig, results_dir: str | os.PathLike, name: str, dpi: int = 110, show: bool = True) -> Path:
    """Write ``figures/<name>.png``; in a notebook also display it (the same PNG)."""

    dirs = result_dirs(results_dir)
    path = dirs["figures"] / f"{name}.png"
    data = viz.figure_png(fig, dpi)
    path.write_bytes(data)
    if show:
        try:
            from IPython import get_ipython
            from IPython.display import Image, display

            if get_ipython() is not None:
                display(Image(data=data))
        except ImportError:  # pragma: no cover
            pass
    return path


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return None if math.isnan(f) or math.isinf(f) else f
    return x


def write_fragment(results_dir: str | os.PathLike, name: str, data: dict[str, Any]) -> Path:
    """``work/<name>.json``: a notebook's results for the pipeline's summary (NaN -> null)."""
    path = result_dirs(results_dir)["work"] / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_fragment(results_dir: str | os.PathLike, name: str, required: bool = True) -> dict[str, Any] | None:
    """A notebook's fragment; with ``required`` a missing one raises naming the notebook to run."""
    path = Path(results_dir) / "work" / f"{name}.json"
    if not path.is_file():
        if required:
            raise PipelineError(f"{path} not found: run notebook {name} first (or give its results as parameters)")
        return None
    return json.loads(path.read_text())
