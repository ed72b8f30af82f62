"""Where results go and how they are written: tables (CSV + Markdown), figures, and each
notebook's one typed JSON fragment (:class:`DataFragment` ... :class:`BeyondFragment`, written with
:func:`write_fragment`, read back by :func:`load_fragment` and merged by
:func:`seggpt_lib.experiments.report.build_summary`)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from seggpt_lib.experiments import viz

try:  # shown inline only inside IPython (a notebook); plain Python runs without it
    from IPython import get_ipython
    from IPython.display import Image, display
except ImportError:  # pragma: no cover
    get_ipython = None
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
    if show and get_ipython is not None and get_ipython() is not None:
        display(Image(data=data))
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


# ------------------------------------------------------------------------------------------
# the notebooks' fragments: one typed record per notebook (every field has a default, so a
# partial run's summary still reads)
# ------------------------------------------------------------------------------------------
@dataclass
class Fragment:
    """A notebook's results for the pipeline's summary (``work/<NAME>.json``)."""

    NAME: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The fragment of a JSON object; keys it does not know (an older run's) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class DataFragment(Fragment):
    """Notebook 01: the dataset built and split."""

    NAME: ClassVar[str] = "01_data_transformation"
    source: str | None = None
    source_path: str = ""
    root: str | None = None
    split_root: str | None = None
    reused: bool = False
    seconds: float | None = None
    classes: list[str] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # per split and total
    mean: list[float] | None = None  # the training split's per-channel mean (0..1)
    std: list[float] | None = None

    @classmethod
    def build(cls, info: dict[str, Any], counts, stats) -> "DataFragment":
        """From :func:`~seggpt_lib.experiments.dataset.prepare_data`'s result, the class counts and
        the image statistics tables."""
        train = stats[stats["split"] == "train"].iloc[0]
        return cls(**{k: info[k] for k in ("source", "source_path", "root", "split_root", "reused", "seconds")},
                   classes=[c for c in counts["class"] if c != "all"],
                   images={c: int(counts[c].iloc[-1]) for c in counts.columns if c != "class"},
                   mean=[float(train[f"mean_{c}"]) for c in "rgb"], std=[float(train[f"std_{c}"]) for c in "rgb"])

    def mean_std(self) -> tuple[list[float], list[float]] | None:
        return (self.mean, self.std) if self.mean is not None and self.std is not None else None


@dataclass
class TrainingFragment(Fragment):
    """Notebook 02: the weights the evaluation notebooks use and how they came about."""

    NAME: ClassVar[str] = "02_training"
    weights: str | None = None  # absolute path
    weights_label: str | None = None  # relative to the results folder where it lies there
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    defect_color: list[int] | None = None
    trained: bool = False
    steps_done: int = 0
    wall_s: float = 0.0
    best_val_miou: float | None = None
    device: str | None = None
    n_parameters: int | None = None
    # the kept checkpoint's validation (scored as the test is) and how it was chosen; a collapse:
    # "nothing" / "everything" at the last validation (None: none), collapse_steps every one
    best_val_pes: float | None = None
    best_val_catch: float | None = None
    best_val_yield: float | None = None
    best_val_prompt_auroc: float | None = None  # 0.5: the prompt changes nothing painted; 1: everything
    best_step: int | None = None
    select_by: str | None = None
    collapse: str | None = None
    collapse_steps: list[int] = field(default_factory=list)
    fg_weight: float | None = None  # the defect weight used (fg_weight "auto" resolved)
    defect_share: float | None = None  # the training set's defect share (defect pixels of its defect images)

    @classmethod
    def build(cls, results_dir: str | os.PathLike, cfg, run: dict[str, Any], weights: str | os.PathLike, trained: bool,
              n_parameters: int) -> "TrainingFragment":
        """From the run's TrainConfig ``cfg``, :func:`~seggpt_lib.experiments.training.run_training`'s
        result ``run`` and the weights evaluated."""
        w = Path(weights).resolve()
        try:
            label = str(w.relative_to(Path(results_dir).resolve()))
        except ValueError:
            label = str(weights)
        return cls(weights=str(w), weights_label=label, preset=cfg.preset, model=dict(cfg.model),
                   mean=list(cfg.image_mean), std=list(cfg.image_std), defect_color=cfg.defect_color, trained=trained,
                   steps_done=int(run["steps_done"]), wall_s=float(run["wall_s"]), best_val_miou=run["best_val_miou"],
                   device=cfg.device, n_parameters=int(n_parameters),
                   **{k: run.get(k) for k in ("best_val_pes", "best_val_catch", "best_val_yield",
                                              "best_val_prompt_auroc", "best_step",
                                              "select_by", "collapse", "fg_weight", "defect_share")},
                   collapse_steps=list(run.get("collapse_steps") or []))


@dataclass
class GridAblationFragment(Fragment):
    """Notebook 03: mIoU by tiling grid."""

    NAME: ClassVar[str] = "03_grid_ablation"
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per (grid, top_k)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    top_k: int = 1
    best_grid: int | None = None
    work_size: int | None = None
    tile_pairing: str | None = None
    queries: int = 0
    weights: str | None = None
    device: str | None = None

    @classmethod
    def build(cls, abl: dict[str, Any], em, top_k: int, tile_pairing: str) -> "GridAblationFragment":
        """From :func:`~seggpt_lib.experiments.evaluation.grid_ablation`'s result and the
        :class:`~seggpt_lib.experiments.evaluation.EvalModel` scored; ``best_grid``: the grid of the
        highest mIoU at ``top_k`` (the smaller grid on a tie)."""
        table = abl["table"]
        col = "grid"
        t1 = table[table["top_k"] == top_k]
        best = int(t1.sort_values(["mIoU", col], ascending=[False, True])[col].iloc[0])
        return cls(table=table.to_dict("records"), per_class=abl["per_class"].to_dict("records"), top_k=top_k,
                   best_grid=best, work_size=abl["work_size"], tile_pairing=tile_pairing, queries=len(abl["mapping"]),
                   weights=em.weights, device=em.device)

    def miou_by_grid(self) -> dict[int, float]:
        """``{grid: mIoU}`` of the rows at ``top_k`` (the table's tiling column is ``grid``, or
        ``split`` in an older run's)."""
        return {int(r["grid"]): r.get("mIoU") for r in self.table if r.get("top_k") == self.top_k}

    def extra_rows(self) -> dict[tuple[int, int], float]:
        """``{(grid, k): mIoU}`` of the rows with another ``top_k``."""
        return {(int(r["grid"]), int(r["top_k"])): r.get("mIoU") for r in self.table
                if r.get("top_k") != self.top_k}


@dataclass
class PairEvaluationFragment(Fragment):
    """Notebook 04: catch, yield and PES (``summary``: :func:`seggpt_lib.eval.metrics.evaluate`'s,
    the raw masks' figures with ``calibrated`` beside them: the line's decision chosen on the
    validation split, ``operating_point``), the AUCs of the catch / yield curve (``curve``) and
    whether the prompt consistency separates positive from negative pairs (``consistency``)."""

    NAME: ClassVar[str] = "04_pair_evaluation"
    summary: dict[str, Any] = field(default_factory=dict)
    grid: int | None = None
    top_k: int | None = None
    work_size: int | None = None
    tile_pairing: str | None = None
    weights: str | None = None
    device: str | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)
    operating_point: dict[str, Any] = field(default_factory=dict)  # evaluation.operating_point_record
    curve: dict[str, Any] = field(default_factory=dict)  # evaluation.curve_record
    consistency: dict[str, Any] = field(default_factory=dict)  # auroc, separates, counts, sentence
    # the shipped pretrained checkpoint without fine-tuning on the same pairs beside the fine-tuned
    # model (evaluation.pretrained_without_finetuning's table rows; empty: not run)
    without_finetuning: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(cls, ev: dict[str, Any], em, results_dir: str | os.PathLike, grid: int, top_k: int,
              comparison, without_finetuning=None) -> "PairEvaluationFragment":
        """From :func:`~seggpt_lib.experiments.evaluation.pair_evaluation`'s result ``ev``, the
        :class:`~seggpt_lib.experiments.evaluation.EvalModel` scored and the comparison table."""
        from seggpt_lib.experiments import evaluation as EV

        sep = EV.consistency_separation(ev["table"])
        return cls(summary=ev["summary"], grid=grid, top_k=top_k, work_size=ev["work_size"],
                   tile_pairing=ev["tile_pairing"], weights=em.weights, device=em.device,
                   comparison=comparison.to_dict("records"),
                   operating_point=EV.operating_point_record(ev["operating_point"], ev["operating_point_path"],
                                                             results_dir),
                   curve=EV.curve_record(ev["curve"], ev.get("raw_curve")),
                   consistency={k: v for k, v in sep.items() if k not in ("positive", "negative", "free")},
                   without_finetuning=(without_finetuning["table"].to_dict("records")
                                       if without_finetuning is not None else []))


@dataclass
class BeyondFragment(Fragment):
    """Notebook 05: the recipes and prompts compared (``rows``: the raw masks' figures, one per
    (recipe, prompt), then paint nothing). ``decision_rows``: the line's decision, a ``raw`` and a
    ``calibrated`` row per (recipe, prompt) (``decision``; catch, yield, defect-free yield, PES,
    ``PES_over_floor`` = PES - 0.5, ``operating_point``), then paint nothing; each calibrated
    on the validation split ``val_dir`` only (``calibration_objective``), the points in
    ``operating_points`` (``"<negative_target>/<method>"``:
    :func:`~seggpt_lib.experiments.evaluation.operating_point_record`). Empty in an older run's."""

    NAME: ClassVar[str] = "05_beyond"
    rows: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    budget_minutes: float | None = None
    grid: int | None = None
    top_k: int | None = None
    tune_steps: int | None = None
    max_queries: int | None = None
    device: str | None = None
    seconds: float | None = None
    decision_rows: list[dict[str, Any]] = field(default_factory=list)
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration_objective: str | None = None
    calibration_yield_target: float | None = None
    val_dir: str | None = None


FRAGMENTS: tuple[type[Fragment], ...] = (DataFragment, TrainingFragment, GridAblationFragment, PairEvaluationFragment,
                                         BeyondFragment)
F = TypeVar("F", bound=Fragment)


def write_fragment(results_dir: str | os.PathLike, fragment: Fragment | str, data: dict[str, Any] | None = None) -> Path:
    """``work/<NAME>.json``: a notebook's :class:`Fragment` for the pipeline's summary (NaN -> null);
    ``write_fragment(results_dir, name, data)`` writes a plain dict under ``name``."""
    name, payload = (fragment.NAME, fragment.to_dict()) if isinstance(fragment, Fragment) else (fragment, data or {})
    path = result_dirs(results_dir)["work"] / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_fragment(results_dir: str | os.PathLike, name: str, required: bool = True) -> dict[str, Any] | None:
    """A notebook's fragment as a dict; with ``required`` a missing one raises naming the notebook to run."""
    path = Path(results_dir) / "work" / f"{name}.json"
    if not path.is_file():
        if required:
            raise PipelineError(f"{path} not found: run notebook {name} first (or give its results as parameters)")
        return None
    return json.loads(path.read_text())


def grid_miou(results_dir: str | os.PathLike) -> dict[int, float]:
    """Notebook 03's ``{grid: mIoU}`` at its ``top_k`` (empty when 03 did not run)."""
    frag = load_fragment(results_dir, GridAblationFragment, required=False)
    return frag.miou_by_grid() if frag is not None else {}


def load_fragment(results_dir: str | os.PathLike, cls: type[F], required: bool = True) -> F | None:
    """Notebook ``cls.NAME``'s fragment as a ``cls``; missing: raises (``required``) or None."""
    d = read_fragment(results_dir, cls.NAME, required=required)
    return None if d is None else cls.from_dict(d)
