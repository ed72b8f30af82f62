"""The notebook pipeline (``seggpt reproduce``) and the helpers the notebooks share.

``seggpt reproduce --config configs/pipeline.json [--set key=value ...]`` runs the notebooks

1. ``01_data_transformation``: build or convert the dataset, split it, show it;
2. ``02_training``: train (or take given weights), curves, prediction panels;
3. ``03_split_ablation``: mIoU by split (1, 2, 4) on the positive test pairs;
4. ``04_pair_evaluation``: positive / negative prompts and defect-free queries: IoU, catch,
   yield, PES, beside the trivial baselines and the original project's published figures;
5. ``06_beyond``: beyond the original: its negatives recipe against class-aware negatives (the
   same training budget), each with an image prompt, a top-k ensemble and a learned prompt
   (prompt tuning, the model frozen) (:mod:`seggpt_lib.experiments.study`);

with papermill, in order, with one set of parameters, then renders every executed notebook to
``RESULTS/reports/<name>.html`` and writes ``RESULTS/summary.json`` (every headline figure and
the run's settings) and ``RESULTS/index.html`` (headline table, links to every report, table
and figure). The notebooks write ``RESULTS/tables/*.{csv,md}``, ``RESULTS/figures/*.png`` and a
JSON fragment each (``RESULTS/work/<notebook>.json``) that the pipeline merges. Executed
notebooks and intermediate data go to ``RESULTS/work/``.

Parameters (``configs/pipeline.json``; ``--set`` overrides any key, ``--set train.lr=1e-4``
a nested one; values are parsed as JSON where they can be): see :data:`DEFAULTS`. ``data`` is
``synthetic``, a dataset folder in our layout (split into ``train/val/test`` or not),
``magnetic_tile:<path>`` or ``coco:<path>``; ``weights`` non-empty initialises the model from
that checkpoint (official ``.pth``, HuggingFace, our ``.safetensors``) and ``steps`` 0 skips
training (evaluation only; the architecture is read from the checkpoint unless ``preset`` is
given explicitly).

Everything a notebook does is a call into this module, :mod:`seggpt_lib.experiments.viz`, or the library,
so the notebooks hold no logic of their own and the tests can call the same functions.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import html
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULTS",
    "NOTEBOOKS",
    "PUBLISHED",
    "PipelineError",
    "SMOKE",
    "add_arguments",
    "build_summary",
    "class_counts",
    "image_stats",
    "load_config",
    "load_eval_model",
    "markdown_table",
    "pair_evaluation",
    "prepare_data",
    "read_fragment",
    "render_html",
    "reproduce",
    "run",
    "save_figure",
    "split_ablation",
    "write_fragment",
    "write_index_html",
    "write_table",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS: tuple[str, ...] = ("01_data_transformation", "02_training", "03_split_ablation", "04_pair_evaluation",
                              "06_beyond")
BEYOND_NOTEBOOK = "06_beyond"
EXPLORER_NOTEBOOK = "05_explorer"

# ------------------------------------------------------------------------------------------
# the original project's published figures (BRIEF §1.5; 11 queries, one per defect type)
# ------------------------------------------------------------------------------------------
PUBLISHED: dict[str, Any] = {
    "split_miou": {1: 0.173, 2: 0.538, 4: 0.327},
    "positive_miou": 0.541,
    "catch_rate": 0.91,  # 10 of 11
    "negative_miou": 0.527,
    "yield_rate": 0.182,  # 2 of 11
    "pes": 0.546,
    "split": 2,
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
# parameters
# ------------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    # data (01)
    "data": "synthetic",  # synthetic | <folder> | magnetic_tile:<path> | coco:<path> | folder:<path>
    "synthetic": {"per_class": 40, "size": 256, "n_free": None, "seed": 0},
    "limit_per_class": None,  # magnetic_tile: first N photos of each class
    "split_seed": 0,
    "val": 0.15,
    "test": 0.15,
    "rebuild_data": False,  # False: reuse RESULTS/work/data when it was built from the same settings
    # model and training (02)
    "preset": "vit_micro",  # "auto": from the checkpoint given as weights
    "model": {},  # preset overrides (official constructor names)
    "weights": "",  # initial weights; with steps 0 the weights evaluated
    "steps": 100000,  # training steps (0: no training)
    "train_minutes": 4.5,  # wall-clock budget of the training loop (None/0: none); whichever comes first
    "device": "cpu",  # cpu | cuda | auto
    "precision": "auto",  # training: bf16 on CUDA, fp32 on CPU; inference likewise
    "seed": 0,
    "normalize": "imagenet",  # imagenet (the official weights') | dataset (the training split's own mean/std)
    "train": {  # any seggpt_lib.engine.trainer.TrainConfig keys: the recipe
        "lr": 1e-3, "batch_size": 16, "fg_weight": 30.0, "defect_color": [255, 255, 255], "query_mask_share": 0.5,
        "warmup_steps": 30, "cycle_steps": 100000, "mask_ratio": 0.75, "negative_target": "empty", "num_workers": 0,
    },
    "eval_every": 50,  # validation (and a checkpoint) every N steps
    "val_pairs": 64,
    "checkpoint": "best",  # which checkpoint the evaluation uses: best (val mIoU) | last
    "n_panels": 3,  # rows of the five-panel figures
    # evaluation (03, 04)
    "splits": [1, 2, 4],
    "top_k": 1,
    "extra_top_k": 3,  # one more row in 03 at eval_split with this many prompts (0: none)
    "eval_split": 2,  # the split of 04 (the original's best)
    "work_size": "auto",  # canvas of split >= 2 (the original: 1024); auto: the test images' median side, <= 1024
    "tile_pairing": "aligned",  # aligned: a tile with the prompts' same tile; all: with every prompt tile (the original)
    "max_batch": 64,  # pairs per forward pass
    "max_queries": None,  # at most N queries per run (spread over the classes); None: the whole test split
    "mapping_seed": 0,
    "catch_iou": 0.3,
    "yield_response": 0.000239,
    # beyond the original (06): the other negatives recipe, trained with the same budget, and prompt tuning
    "beyond_minutes": None,  # training budget of 06's model; None: train_minutes (the same as 02's)
    "beyond_tune_steps": 30,  # prompt-tuning steps per class
    "beyond_max_queries": 18,  # queries per kind (positive, negative, defect-free) in 06
    "beyond_top_k": 3,  # prompts of 06's ensemble row
    "beyond_split": 1,  # 06 scores every row at this split
    # where things go
    "results_dir": "results",
    "kernel": "python3",
    "html": True,
    "heartbeat_s": 30,  # a "still running" line every N seconds (0: none)
    "echo": True,  # show what the notebooks print, as they print it
}

# a one-minute check of the whole pipeline (seggpt reproduce --smoke; the tests use it): a tiny
# synthetic set (64 px, 7 images per class) and a 235 k-parameter model trained 3 steps
SMOKE: dict[str, Any] = {
    "data": "synthetic",
    "synthetic": {"per_class": 7, "size": 64, "n_free": None, "seed": 0},
    "val": 0.3,
    "test": 0.15,
    "preset": "vit_micro",
    "model": {"img_size": [64, 32], "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "out_indices": [2],
              "merge_index": 1, "decoder_embed_dim": 16, "pretrain_img_size": 32},
    "weights": "",
    "steps": 3,
    "train_minutes": None,
    "device": "cpu",
    "train": {"batch_size": 4, "warmup_steps": 1},
    "eval_every": 3,
    "val_pairs": 8,
    "n_panels": 2,
    "beyond_tune_steps": 2,
    "beyond_max_queries": 4,
    "beyond_top_k": 2,
}

# which parameters each notebook takes (the rest of its parameters cell keeps its defaults)
NOTEBOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01_data_transformation": ("results_dir", "source", "source_path", "synthetic", "limit_per_class", "split_seed",
                               "val", "test", "rebuild_data", "preset", "model", "weights", "seed", "train"),
    "02_training": ("results_dir", "preset", "model", "weights", "steps", "train_minutes", "device", "precision", "seed",
                    "normalize", "train", "eval_every", "val_pairs", "checkpoint", "n_panels"),
    "03_split_ablation": ("results_dir", "device", "precision", "splits", "top_k", "extra_top_k", "eval_split",
                          "work_size", "tile_pairing", "max_batch", "max_queries", "mapping_seed", "catch_iou",
                          "n_panels"),
    "04_pair_evaluation": ("results_dir", "device", "precision", "eval_split", "top_k", "work_size", "tile_pairing",
                           "max_batch", "max_queries", "mapping_seed", "catch_iou", "yield_response", "n_panels"),
    "05_explorer": ("results_dir", "device", "precision", "work_size", "tile_pairing", "max_batch"),
    "06_beyond": ("results_dir", "preset", "model", "weights", "steps", "train_minutes", "beyond_minutes", "device",
                  "precision", "seed", "normalize", "train", "eval_every", "val_pairs", "checkpoint",
                  "beyond_tune_steps", "beyond_max_queries", "beyond_top_k", "beyond_split", "work_size",
                  "tile_pairing", "max_batch", "mapping_seed", "catch_iou", "yield_response", "n_panels"),
}


class PipelineError(RuntimeError):
    """A stage failed or the configuration is wrong; the message says which and where to look."""


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings -> dict; values parsed as JSON where possible, else kept as text;
    dotted keys (``train.lr``) address nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise PipelineError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise PipelineError(f"--set {item!r}: empty key")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out[k] = val
    return out


def _apply(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    d = cfg
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | Sequence[str] | None = None,
                smoke: bool = False) -> dict[str, Any]:
    """:data:`DEFAULTS`, updated by the JSON file ``path`` (keys starting with ``_`` are
    comments), then (``smoke``) by :data:`SMOKE`, then by ``overrides`` (a dict, or
    ``key=value`` strings). Unknown top-level keys raise :class:`PipelineError` listing the
    valid ones. The result records the keys set explicitly by ``overrides`` in ``_explicit``."""
    cfg = copy.deepcopy(DEFAULTS)
    sources: list[tuple[str, dict[str, Any]]] = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise PipelineError(f"pipeline config not found: {p}")
        try:
            file_cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PipelineError(f"{p}: not valid JSON: {e}") from None
        if not isinstance(file_cfg, dict):
            raise PipelineError(f"{p}: expected a JSON object")
        sources.append((str(p), {k: v for k, v in file_cfg.items() if not k.startswith("_")}))
    if smoke:
        sources.append(("smoke", copy.deepcopy(SMOKE)))
    if overrides:
        ov = parse_set(overrides) if not isinstance(overrides, dict) else dict(overrides)
        sources.append(("--set", ov))
    explicit: list[str] = []
    for name, src in sources:
        for key, value in src.items():
            top = key.split(".")[0]
            if top not in DEFAULTS:
                raise PipelineError(f"{name}: unknown key {top!r}; valid keys: {', '.join(sorted(DEFAULTS))}")
            if "." in key:
                _apply(cfg, key, value)
            elif isinstance(DEFAULTS[top], dict) and isinstance(value, dict) and top != "model":
                cfg[top] = {**cfg[top], **value}  # train, synthetic: merged key by key
            else:
                cfg[key] = value
            if name == "--set":
                explicit.append(top)
    cfg["_explicit"] = sorted(set(explicit))
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict[str, Any]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise PipelineError(f"config: {msg}")

    need(isinstance(cfg["steps"], int) and cfg["steps"] >= 0, f"steps must be an integer >= 0, got {cfg['steps']!r}")
    tm = cfg["train_minutes"]
    need(tm is None or (isinstance(tm, (int, float)) and tm >= 0), f"train_minutes must be a number >= 0 or null, got {tm!r}")
    bm = cfg["beyond_minutes"]
    need(bm is None or (isinstance(bm, (int, float)) and bm >= 0),
         f"beyond_minutes must be a number >= 0 or null (null: train_minutes), got {bm!r}")
    need(isinstance(cfg["beyond_tune_steps"], int) and cfg["beyond_tune_steps"] >= 1,
         f"beyond_tune_steps must be an integer >= 1, got {cfg['beyond_tune_steps']!r}")
    need(isinstance(cfg["splits"], list) and cfg["splits"] and all(isinstance(s, int) and s >= 1 for s in cfg["splits"]),
         f"splits must be a list of integers >= 1, got {cfg['splits']!r}")
    need(isinstance(cfg["top_k"], int) and cfg["top_k"] >= 1, f"top_k must be an integer >= 1, got {cfg['top_k']!r}")
    need(cfg["tile_pairing"] in ("all", "aligned"), f"tile_pairing must be 'all' or 'aligned', got {cfg['tile_pairing']!r}")
    need(cfg["checkpoint"] in ("best", "last"), f"checkpoint must be 'best' or 'last', got {cfg['checkpoint']!r}")
    need(cfg["normalize"] in ("imagenet", "dataset"), f"normalize must be 'imagenet' or 'dataset', got {cfg['normalize']!r}")
    need(cfg["device"] in ("cpu", "cuda", "auto") or str(cfg["device"]).startswith("cuda:"),
         f"device must be cpu, cuda, cuda:N or auto, got {cfg['device']!r}")
    ws = cfg["work_size"]
    need(ws == "auto" or (isinstance(ws, int) and ws >= 8), f"work_size must be 'auto' or an integer >= 8, got {ws!r}")
    need(isinstance(cfg["train"], dict), "train must be an object of TrainConfig keys")
    need(isinstance(cfg["model"], dict), "model must be an object of preset overrides")


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


def _fmt_cell(v: Any, floatfmt: str, small: bool = False) -> str:
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
        lines.append("| " + " | ".join(_fmt_cell(v, floatfmt, sm) for v, sm in zip(row, small)) + " |")
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
    from seggpt_lib.experiments import viz

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


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
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
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
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


# ------------------------------------------------------------------------------------------
# 01: data
# ------------------------------------------------------------------------------------------
DATA_SOURCES = ("synthetic", "coco", "magnetic_tile", "folder")


def parse_data_spec(data: str, base: str | os.PathLike | None = None) -> tuple[str, str]:
    """``synthetic`` | ``coco:<path>`` | ``magnetic_tile:<path>`` | ``folder:<path>`` | ``<path>``
    -> ``(source, absolute path or "")``."""
    data = (data or "synthetic").strip()
    if data == "synthetic":
        return "synthetic", ""
    source, path = "folder", data
    for prefix in ("coco", "magnetic_tile", "magnetic-tile", "folder"):
        if data.startswith(prefix + ":"):
            source, path = prefix.replace("-", "_"), data[len(prefix) + 1:]
            break
    if not path:
        raise PipelineError(f"data {data!r}: no path given")
    p = Path(path).expanduser()
    if not p.is_absolute():
        rel = p
        p = Path(base or os.getcwd()) / rel
        if base is None and not p.exists() and (REPO_ROOT / rel).exists():
            p = REPO_ROOT / rel  # a path relative to the repository (configs/magnetic_tile.json)
    if not p.exists():
        raise PipelineError(f"data {data!r}: {p} not found")
    return source, str(p.resolve())


def _is_root(p: Path) -> bool:
    return (p / "images").is_dir()


def _is_split(p: Path) -> bool:
    return _is_root(p / "train") and _is_root(p / "test")


def prepare_data(work_dir: str | os.PathLike, source: str = "synthetic", source_path: str = "",
                 synthetic: dict[str, Any] | None = None, limit_per_class: int | None = None, split_seed: int = 0,
                 val: float = 0.15, test: float = 0.15, rebuild: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (synthetic) or convert (coco, magnetic_tile) the dataset into ``work_dir/data/source``
    and split it (seeded, stratified) into ``work_dir/data/split/{train,val,test}``. A ``folder``
    already split into ``train/`` and ``test/`` (``val/`` optional) is used in place; a folder in
    our layout (``images/``, ``labels/``) is split. Reuses an earlier build of the same settings
    unless ``rebuild``. Returns ``{source, source_path, root, split_root, reused, seconds}``."""
    from data_prep.split import split_dataset

    if source not in DATA_SOURCES:
        raise PipelineError(f"source must be one of {DATA_SOURCES}, got {source!r}")
    t0 = time.perf_counter()
    data_dir = Path(work_dir) / "data"
    src_dir, split_dir = data_dir / "source", data_dir / "split"
    syn = {**DEFAULTS["synthetic"], **(synthetic or {})}
    spec = {"source": source, "source_path": str(source_path), "split_seed": split_seed, "val": val, "test": test,
            "synthetic": syn if source == "synthetic" else None, "limit_per_class": limit_per_class}
    if source == "folder":
        src = Path(source_path)
        if not src.is_dir():
            raise PipelineError(f"dataset folder not found: {src}")
        if _is_split(src):
            log(f"using the split dataset in place: {src}")
            return {"source": source, "source_path": str(src), "root": str(src), "split_root": str(src),
                    "reused": True, "seconds": time.perf_counter() - t0}
        if not _is_root(src):
            raise PipelineError(f"{src}: neither a dataset (images/, labels/) nor a split one (train/, test/)")
    stamp = data_dir / "prepare.json"
    if not rebuild and stamp.is_file() and _is_split(split_dir):
        try:
            if json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
                log(f"reusing the dataset built earlier with the same settings: {split_dir}")
                root = src if source == "folder" else src_dir
                return {"source": source, "source_path": str(source_path), "root": str(root), "split_root": str(split_dir),
                        "reused": True, "seconds": time.perf_counter() - t0}
        except json.JSONDecodeError:
            pass
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    if source == "synthetic":
        from data_prep.synthetic import generate_synthetic

        log(f"generating the synthetic set: {syn}")
        root = generate_synthetic(src_dir, seed=int(syn["seed"]), per_class=int(syn["per_class"]), size=int(syn["size"]),
                                  n_free=syn.get("n_free"), overwrite=True, show_progress=False)
    elif source == "coco":
        from data_prep.vision_coco import convert_vision_coco

        log(f"converting VISION COCO files under {source_path}")
        root = convert_vision_coco(source_path, src_dir, overwrite=True, show_progress=False)
    elif source == "magnetic_tile":
        from data_prep.magnetic_tile import convert_magnetic_tile

        log(f"converting the magnetic-tile set in {source_path}")
        root = convert_magnetic_tile(source_path, src_dir, limit_per_class=limit_per_class, overwrite=True,
                                     show_progress=False)
    else:
        root = Path(source_path)
    log(f"splitting (seed {split_seed}, val {val}, test {test}, stratified by class)")
    split_dataset(root, split_dir, seed=int(split_seed), val=float(val), test=float(test), overwrite=True,
                  show_progress=False)
    stamp.write_text(json.dumps(spec, indent=2) + "\n")
    return {"source": source, "source_path": str(source_path), "root": str(root), "split_root": str(split_dir),
            "reused": False, "seconds": time.perf_counter() - t0}


def split_roots(split_root: str | os.PathLike) -> dict[str, Path]:
    """The existing ``train``/``val``/``test`` dataset roots of a split folder."""
    sr = Path(split_root)
    return {sp: sr / sp for sp in ("train", "val", "test") if _is_root(sr / sp)}


def _scan(root: Path):
    from seggpt_lib.data.dataset import DefectIndex

    return DefectIndex.scan(root, verify=False)


def class_counts(split_root: str | os.PathLike):
    """Images per class and split (defect-free images under ``free``), with a total row."""
    import pandas as pd

    counts: dict[str, dict[str, int]] = {}
    splits = list(split_roots(split_root))
    for sp, root in split_roots(split_root).items():
        idx = _scan(root)
        for i in range(len(idx)):
            cls = "free" if idx.is_free[i] else idx.class_of(i)
            counts.setdefault(cls, {s: 0 for s in splits})[sp] += 1
    rows = [{"class": c, **v, "total": sum(v.values())} for c, v in sorted(counts.items(), key=lambda t: (t[0] == "free", t[0]))]
    df = pd.DataFrame(rows, columns=["class", *splits, "total"])
    total = {"class": "all", **{s: int(df[s].sum()) for s in splits}, "total": int(df["total"].sum())}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def image_stats(split_root: str | os.PathLike):
    """Per split: images, per-channel mean / std (0..1), image sizes, mean defect fraction."""
    import pandas as pd

    from data_prep.stats import dataset_stats

    st = dataset_stats(split_root, show_progress=False)["splits"]
    rows = []
    for sp, s in st.items():
        if not s.get("images"):
            continue
        fr = [v for c, v in s["defect_fraction"].items() if c != "free"]
        rows.append({
            "split": sp, "images": s["images"],
            "mean_r": s["mean"][0], "mean_g": s["mean"][1], "mean_b": s["mean"][2],
            "std_r": s["std"][0], "std_g": s["std"][1], "std_b": s["std"][2],
            "width": f"{s['width'][0]}–{s['width'][1]}", "height": f"{s['height'][0]}–{s['height'][1]}",
            "defect_fraction": float(np.mean(fr)) if fr else math.nan,
        })
    return pd.DataFrame(rows)


def has_positive_pairs(root: str | os.PathLike) -> bool:
    """Whether some defect class of ``root`` has two images with defects (what pairs need)."""
    idx = _scan(Path(root))
    ids = idx.class_ids[~idx.is_free]
    return bool(len(ids)) and int(np.bincount(ids).max()) >= 2


def display_dataset(split_root: str | os.PathLike, preset: str = "vit_micro", model: dict | None = None,
                    weights: str = "", seed: int = 0, train: dict[str, Any] | None = None, n: int = 4):
    """A few training samples as the trainer builds them (for the pair-colouring figure)."""
    from seggpt_lib.data.dataset import PairDataset

    mcfg = model_config(preset, model, weights)
    t = {**DEFAULTS["train"], **(train or {})}
    idx = _scan(Path(split_root) / "train")
    ds = PairDataset(idx, cfg=mcfg, train=True, mask_ratio=float(t.get("mask_ratio", 0.75)),
                     query_mask_share=float(t.get("query_mask_share", 0.0)), defect_color=t.get("defect_color"),
                     negative_target=t.get("negative_target", "query_mask"), seed=seed, length=max(n, 1),
                     fg_weight=float(t.get("fg_weight", 1.0)), negative_share=float(t.get("negative_share", 0.25)))
    return ds


# ------------------------------------------------------------------------------------------
# 02: model and training
# ------------------------------------------------------------------------------------------
def _match_preset(cfg) -> tuple[str, dict[str, Any]]:
    from seggpt_lib.model.seggpt import PRESETS, preset_config

    mine = cfg.to_dict()

    def diff(name: str) -> dict[str, Any]:
        ref = preset_config(name).to_dict()
        return {k: v for k, v in mine.items() if ref.get(k) != v}

    best = min(PRESETS, key=lambda name: len(diff(name)))  # the closest preset, plus overrides
    return best, diff(best)


def resolve_preset(weights: str = "", preset: str | None = "auto", model: dict | None = None) -> tuple[str, dict[str, Any]]:
    """``(preset, overrides)`` of the model: the given preset, or (``auto``) the architecture the
    checkpoint ``weights`` records (our safetensors, HF folders) or its tensor shapes imply
    (the official pickle)."""
    model = dict(model or {})
    if preset and preset != "auto":
        return preset, model
    if not weights:
        raise PipelineError("preset 'auto' needs weights to read the architecture from; give a preset (e.g. vit_micro)")
    from seggpt_lib.model.checkpoint import read_state_dict
    from seggpt_lib.model.seggpt import PRESETS, preset_config

    sd, cfg = read_state_dict(weights)
    if cfg is not None:
        name, ov = _match_preset(cfg)
        return name, {**ov, **model}
    dim = int(sd["pos_embed"].shape[-1]) if "pos_embed" in sd else None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for name in PRESETS:
        p = preset_config(name)
        if (p.embed_dim, p.depth) == (dim, depth):
            return name, model
    raise PipelineError(f"{weights}: embed_dim {dim}, depth {depth} match no preset ({', '.join(PRESETS)}); give preset=...")


def model_config(preset: str = "vit_micro", model: dict | None = None, weights: str = ""):
    """The :class:`~seggpt_lib.model.seggpt.SegGPTConfig` of a preset (``auto``: from ``weights``)."""
    from seggpt_lib.model.seggpt import preset_config

    name, ov = resolve_preset(weights, preset, model)
    return preset_config(name, **ov)


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def training_config(split_root: str | os.PathLike, run_dir: str | os.PathLike, *, preset: str = "vit_micro",
                    model: dict | None = None, weights: str = "", steps: int = 100, train_minutes: float | None = None,
                    device: str = "cpu", precision: str = "auto", seed: int = 0, normalize: str = "imagenet",
                    mean_std: tuple[Sequence[float], Sequence[float]] | None = None, train: dict[str, Any] | None = None,
                    eval_every: int = 50, val_pairs: int = 64, log: Callable[[str], None] = print):
    """The :class:`~seggpt_lib.engine.trainer.TrainConfig` of a pipeline run.

    ``train`` is the recipe (any TrainConfig keys); the pipeline sets the data folders, the model,
    the device, ``max_steps = steps``, ``max_minutes = train_minutes``, and sizes an epoch to
    ``eval_every`` steps so that validation (and the ``last``/``best`` checkpoints) come every
    ``eval_every`` steps. Without a class holding two defect images in ``val`` there is no
    validation (said in the log)."""
    from seggpt_lib.engine.trainer import TrainConfig

    roots = split_roots(split_root)
    if "train" not in roots:
        raise PipelineError(f"{split_root}: no train/ split")
    name, ov = resolve_preset(weights, preset, model)
    d = {**DEFAULTS["train"], **(train or {})}
    bs = int(d.get("batch_size", 4)) * int(d.get("grad_accum_steps", 1))
    eval_every = max(1, int(eval_every))
    steps = int(steps)
    val_dir = ""
    if "val" in roots and has_positive_pairs(roots["val"]):
        val_dir = str(roots["val"])
    else:
        log("no validation: the val split has no class with two defect images")
    if normalize == "dataset":
        if mean_std is None:
            from seggpt_lib.data.dataset import compute_stats

            mean_std = compute_stats(roots["train"], size=256)
        d["image_mean"], d["image_std"] = [float(v) for v in mean_std[0]], [float(v) for v in mean_std[1]]
    d.update(
        preset=name, model=ov, init_weights=weights or None, train_dataset_dir=str(roots["train"]),
        val_dataset_dir=val_dir, device=device, precision=precision, seed=int(seed), max_steps=steps,
        max_minutes=float(train_minutes) if train_minutes else None, log_dir=str(Path(run_dir).parent),
        run_id=Path(run_dir).name, val_pairs=int(val_pairs), data_count=eval_every * bs,
        epoch=max(1, math.ceil(steps / eval_every)), eval_per_epoch=1 if val_dir else 0,
    )
    d.setdefault("log_interval", min(10, eval_every))
    return TrainConfig.from_dict(d, source="pipeline training config")


def initial_model(cfg):
    """The model exactly as the trainer initialises it (same seed, same weights)."""
    import torch

    from seggpt_lib.engine.trainer import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg)


def panel_dataset(cfg, split_root: str | os.PathLike, n: int = 4, mcfg=None):
    """Fixed evaluation pairs (query half hidden) for the five-panel rows: val, else test."""
    from seggpt_lib.data.dataset import PairDataset

    roots = split_roots(split_root)
    root = next((roots[s] for s in ("val", "test") if s in roots and has_positive_pairs(roots[s])), roots["train"])
    return PairDataset(_scan(root), cfg=mcfg, train=False, negative_target=cfg.negative_target, mean=cfg.image_mean,
                       std=cfg.image_std, seed=cfg.seed, length=max(1, n), negative_share=cfg.negative_share,
                       defect_color=getattr(cfg, "defect_color", None))


def run_training(cfg, run_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (a fresh run in ``run_dir``, an older one there is removed); returns the run's
    ``run_dir``, ``steps_done``, ``best_val_miou``, ``wall_s``."""
    from seggpt_lib.engine.trainer import train

    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else ""
    log(f"training {cfg.preset} on {cfg.device}: up to {cfg.max_steps} steps{budget}, batch {cfg.batch_size}, lr {cfg.lr:g}")
    t0 = time.perf_counter()
    res = train(cfg, run_dir=run_dir, progress=False)
    wall = time.perf_counter() - t0
    best = res.best_miou if res.best_miou >= 0 else math.nan
    log(f"trained {res.step} steps in {wall / 60:.1f} min; best val mIoU {best:.4f}")
    return {"run_dir": str(run_dir), "steps_done": int(res.step), "best_val_miou": best, "wall_s": wall}


def trained_weights(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """``checkpoints/<which>/model.safetensors`` of a run (``best`` falls back to ``last``)."""
    ck = Path(run_dir) / "checkpoints"
    for name in ((which, "last") if which == "best" else (which,)):
        p = ck / name / "model.safetensors"
        if p.is_file():
            return p
    raise PipelineError(f"{ck}: no {which} checkpoint")


def read_metrics(run_dir: str | os.PathLike):
    """A run's ``metrics.csv`` as a DataFrame (empty when there is none)."""
    import pandas as pd

    p = Path(run_dir) / "metrics.csv"
    return pd.read_csv(p) if p.is_file() else pd.DataFrame(columns=["step", "loss", "lr", "fg_frac", "val_miou"])


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
    it was trained with). The prompt masks are painted in ``defect_color`` (default white)."""
    from seggpt_lib.model.checkpoint import build_from_checkpoint
    from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD
    from seggpt_lib.predict.predictor import SegGPTPredictor

    if not weights:
        frag = read_fragment(results_dir, "02_training")
        weights, preset, model = frag["weights"], frag["preset"], frag.get("model") or {}
        mean, std = mean or frag.get("mean"), std or frag.get("std")
        defect_color = defect_color or frag.get("defect_color")
    mean = list(mean or IMAGENET_MEAN)
    std = list(std or IMAGENET_STD)
    name, ov = resolve_preset(weights, preset, model)
    net = build_from_checkpoint(weights, preset=name, **ov)
    dev = _device(device)
    prec = precision if precision != "auto" else ("bf16" if dev.startswith("cuda") else "fp32")
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
    from PIL import Image

    idx = _scan(Path(query_root))
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
    from seggpt_lib.eval.mapping import build_mapping

    q_root, p_root = eval_roots(split_root)
    try:
        m = build_mapping(q_root, p_root, kind, k=k, seed=seed)
    except ValueError:
        if kind == "positive":
            raise
        return {}
    idx = _scan(q_root)
    classes = {f: idx.class_of(i) for i, f in enumerate(idx.files)}
    return _limit(m, classes, max_queries)


def predict_mapping(em: EvalModel, split_root: str | os.PathLike, mapping: dict[str, list[str]], kind: str,
                    split: int = 1, top_k: int = 1, work_size: int | str = "auto", tile_pairing: str = "aligned",
                    keep: bool = False, log: Callable[[str], None] | None = None):
    """Predict every query of ``mapping`` from its first ``top_k`` prompts; returns a list of
    :class:`seggpt_lib.eval.metrics.PairResult` (extra columns ``split``, ``top_k``, ``seconds``) and,
    with ``keep``, the :class:`~seggpt_lib.predict.predictor.Prediction` of each query (raw kept)."""
    from seggpt_lib.data.dataset import read_label, read_rgb
    from seggpt_lib.eval.metrics import PairResult

    q_root, p_root = eval_roots(split_root)
    q_idx, p_idx = _scan(q_root), _scan(p_root)
    ws = work_size_of(work_size, q_root, em)
    pred = em.predictor
    per_q = pred.pairs_per_query(top_k, split, tile_pairing)
    chunk = max(1, min(16, pred.max_batch // max(1, per_q)))
    queries = sorted(mapping)
    records, kept = [], {}
    prompt_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def prompt(f: str):
        if f not in prompt_cache:
            i = p_idx.find(f)
            prompt_cache[f] = (read_rgb(p_idx.image_path(i)), read_label(p_idx.label_path(i)) != 0)
        return prompt_cache[f]

    t_all = time.perf_counter()
    for c0 in range(0, len(queries), chunk):
        names = queries[c0 : c0 + chunk]
        imgs, gts, ps, ms = [], [], [], []
        for q in names:
            i = q_idx.find(q)
            imgs.append(read_rgb(q_idx.image_path(i)))
            gts.append(read_label(q_idx.label_path(i)) != 0)
            pp = [prompt(f) for f in mapping[q][:top_k]]
            ps.append([a for a, _ in pp])
            ms.append([b for _, b in pp])
        t0 = time.perf_counter()
        outs = pred.predict_batch(imgs, ps, ms, split=split, top_k=top_k, tile_pairing=tile_pairing, work_size=ws,
                                  keep_raw=keep)
        sec = (time.perf_counter() - t0) / len(names)
        for q, o, g in zip(names, outs, gts):
            i = q_idx.find(q)
            records.append(PairResult(query=q, prompts=list(mapping[q][:top_k]), kind=kind, query_class=q_idx.class_of(i),
                                      pred=o.mask, gt=g, extra={"split": split, "top_k": top_k, "seconds": sec}))
            if keep:
                kept[q] = o
    if log:
        log(f"{kind} split {split} top-{top_k}: {len(queries)} queries in {time.perf_counter() - t_all:.1f} s")
    return (records, kept) if keep else records


def split_ablation(em: EvalModel, split_root: str | os.PathLike, splits: Sequence[int] = (1, 2, 4), top_k: int = 1,
                   extra_top_k: int = 0, eval_split: int = 2, work_size: int | str = "auto", tile_pairing: str = "aligned",
                   catch_iou: float = 0.3, seed: int = 0, max_queries: int | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """mIoU by split on the positive pairs of the test split.

    Returns ``table`` (one row per (split, top_k): queries, mIoU, catch rate, the original's
    mIoU at that split, seconds per query), ``per_class`` (class x split mean IoU), ``per_image``
    (every scored pair), ``mapping`` and ``work_size``."""
    import pandas as pd

    from seggpt_lib.eval.metrics import evaluate

    k_max = max(top_k, extra_top_k or 0)
    try:
        mapping = prompt_mapping(split_root, "positive", k=k_max, seed=seed, max_queries=max_queries)
    except ValueError as e:
        if k_max == top_k:
            raise
        log(f"no top-{extra_top_k} row: {e}")
        extra_top_k, k_max = 0, top_k
        mapping = prompt_mapping(split_root, "positive", k=top_k, seed=seed, max_queries=max_queries)
    runs = [(int(s), int(top_k)) for s in splits]
    if extra_top_k and extra_top_k != top_k:
        runs.append((int(eval_split), int(extra_top_k)))
    rows, per_image = [], []
    q_root, _ = eval_roots(split_root)
    ws = work_size_of(work_size, q_root, em)
    for s, k in runs:
        recs = predict_mapping(em, split_root, mapping, "positive", split=s, top_k=k, work_size=ws,
                               tile_pairing=tile_pairing, log=log)
        table, summ = evaluate(recs, catch_iou=catch_iou)
        per_image.append(table)
        rows.append({
            "split": s, "top_k": k, "queries": summ["n_positive"], "mIoU": summ["miou"], "catch_rate": summ["catch_rate"],
            "catches": summ["n_catch"], "original_mIoU": PUBLISHED["split_miou"].get(s, math.nan) if k == 1 else math.nan,
            "s_per_query": float(table["seconds"].mean()) if len(table) else math.nan,
        })
    per_image_df = pd.concat(per_image, ignore_index=True)
    top = per_image_df[per_image_df["top_k"] == top_k]
    per_class = top.pivot_table(index="class", columns="split", values="iou", aggfunc="mean")
    per_class.columns = [f"split_{c}" for c in per_class.columns]
    per_class = per_class.reset_index()
    return {"table": pd.DataFrame(rows), "per_class": per_class, "per_image": per_image_df, "mapping": mapping,
            "work_size": ws, "tile_pairing": tile_pairing}


def pair_evaluation(em: EvalModel, split_root: str | os.PathLike, split: int = 2, top_k: int = 1,
                    work_size: int | str = "auto", tile_pairing: str = "aligned", catch_iou: float = 0.3,
                    yield_response: float = 0.000239, seed: int = 0, max_queries: int | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Positive prompts, negative prompts and defect-free queries of the test split at ``split``.

    Returns ``table`` (every pair, :func:`seggpt_lib.eval.metrics.evaluate`'s columns), ``summary``
    (its summary, with the paint-nothing / paint-everything baselines), ``mappings``,
    ``work_size``."""
    from seggpt_lib.eval.metrics import evaluate

    q_root, _ = eval_roots(split_root)
    ws = work_size_of(work_size, q_root, em)
    records, mappings = [], {}
    for kind in ("positive", "negative", "free"):
        m = prompt_mapping(split_root, kind, k=top_k, seed=seed, max_queries=max_queries)
        mappings[kind] = m
        if not m:
            log(f"no {kind} pairs in the test split")
            continue
        records += predict_mapping(em, split_root, m, kind, split=split, top_k=top_k, work_size=ws,
                                   tile_pairing=tile_pairing, log=log)
    table, summary = evaluate(records, catch_iou=catch_iou, yield_response=yield_response)
    return {"table": table, "summary": summary, "mappings": mappings, "work_size": ws, "tile_pairing": tile_pairing}


def per_image_tables(table) -> dict[str, Any]:
    """The per-image tables of 04: ``positive`` (IoU, catch), ``negative`` (IoU, response, yield),
    ``free`` (response, yield) and ``side_by_side`` (the original's layout: query, positive IoU,
    negative IoU, negative response rate)."""
    import pandas as pd

    cols = {"positive": ["file", "class", "prompts", "iou", "catch", "pred_pixels", "gt_pixels"],
            "negative": ["file", "class", "prompts", "iou", "response_rate", "yield", "pred_pixels"],
            "free": ["file", "class", "prompts", "response_rate", "yield", "pred_pixels"]}
    out = {k: table[table["kind"] == k][c].reset_index(drop=True) for k, c in cols.items()}
    pos = out["positive"][["file", "class", "iou"]].rename(columns={"iou": "positive_iou"})
    neg = out["negative"][["file", "iou", "response_rate"]].rename(
        columns={"iou": "negative_iou", "response_rate": "negative_response_rate"})
    out["side_by_side"] = pd.merge(pos, neg, on="file", how="outer").sort_values("file").reset_index(drop=True)
    return out


def published_per_image():
    import pandas as pd

    return pd.DataFrame(PUBLISHED_PER_IMAGE, columns=["query", "positive_iou", "negative_iou", "negative_response_rate"])


def comparison_table(summary: dict[str, Any], split_miou: dict[int, float] | None = None):
    """Our headline figures beside the original's published ones and the trivial baselines."""
    import pandas as pd

    b = summary.get("baselines", {})
    nothing, everything = b.get("paint_nothing", {}), b.get("paint_everything", {})
    rows = []
    for s, v in sorted((split_miou or {}).items()):
        rows.append({"metric": f"mIoU, split {s} (positive)", "ours": v, "original": PUBLISHED["split_miou"].get(int(s), math.nan),
                     "paint_nothing": nothing.get("miou", math.nan), "paint_everything": everything.get("miou", math.nan)})
    for key, label in (("miou", "positive mIoU"), ("catch_rate", "catch rate"), ("negative_miou", "negative mIoU"),
                       ("yield_rate", "yield rate (negative prompts)"), ("free_yield_rate", "defect-free yield"),
                       ("pes", "PES")):
        pub = PUBLISHED.get({"miou": "positive_miou"}.get(key, key), math.nan)
        rows.append({"metric": label, "ours": summary.get(key, math.nan), "original": pub,
                     "paint_nothing": nothing.get(key, math.nan), "paint_everything": everything.get(key, math.nan)})
    return pd.DataFrame(rows)


def example_rows(em: EvalModel, split_root: str | os.PathLike, table, mapping: dict[str, list[str]], n: int = 3,
                 worst: bool = False, split: int = 1, top_k: int = 1, work_size: int | str = "auto",
                 tile_pairing: str = "aligned", kind: str = "positive", by: str = "iou") -> list[tuple[list[np.ndarray], str]]:
    """Five-panel rows (see :func:`seggpt_lib.experiments.viz.prediction_panel_row`) of the ``n`` best (or,
    with ``worst``, lowest) pairs of ``kind`` in ``table`` by column ``by`` (``iou``, or
    ``response_rate`` where highest is "best" = strongest response), re-predicted with the raw
    output kept. Titles give class, query, prompt, IoU and response rate."""
    from seggpt_lib.experiments import viz
    from seggpt_lib.data.dataset import read_label, read_rgb

    t = table[table["kind"] == kind] if "kind" in table else table
    t = t.dropna(subset=[by])
    if not len(t):
        return []
    t = t.sort_values([by, "file"], ascending=[worst, True]).head(n)
    sub = {q: mapping[q] for q in t["file"]}
    _, preds = predict_mapping(em, split_root, sub, kind, split=split, top_k=top_k, work_size=work_size,
                               tile_pairing=tile_pairing, keep=True)
    q_root, p_root = eval_roots(split_root)
    q_idx, p_idx = _scan(q_root), _scan(p_root)
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
    """Merge the notebooks' fragments into one summary: ``headline`` (mIoU per split, positive
    mIoU, catch rate, negative mIoU, yield rate, defect-free yield, PES), ``published``,
    ``baselines``, the run's settings (data, preset, weights, device, steps), wall time, git
    commit, and each notebook's fragment."""
    cfg = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    frags = {n: read_fragment(results_dir, n, required=False) for n in NOTEBOOKS}
    d01, d02, d03, d04 = (frags.get(n) or {} for n in NOTEBOOKS[:4])
    d06 = frags.get(BEYOND_NOTEBOOK) or {}
    headline: dict[str, Any] = {}
    for row in d03.get("table", []):
        if row.get("top_k") == d03.get("top_k", 1):
            headline[f"miou_split_{row['split']}"] = row.get("mIoU")
    for row in d03.get("table", []):
        if row.get("top_k") != d03.get("top_k", 1):
            headline[f"miou_split_{row['split']}_top{row['top_k']}"] = row.get("mIoU")
    s04 = d04.get("summary", {})
    for k in HEADLINE_KEYS:
        headline[k] = s04.get("miou" if k == "positive_miou" else k)
    summary = {
        "status": status,
        "headline": headline,
        "published": {"miou_split_1": PUBLISHED["split_miou"][1], "miou_split_2": PUBLISHED["split_miou"][2],
                      "miou_split_4": PUBLISHED["split_miou"][4],
                      **{k: PUBLISHED[k] for k in ("positive_miou", "catch_rate", "negative_miou", "yield_rate", "pes")}},
        "baselines": s04.get("baselines", {}),
        "counts": {k: s04.get(k) for k in ("n_positive", "n_catch", "n_negative", "n_yield", "n_free", "n_free_yield")},
        "thresholds": {"catch_iou": s04.get("catch_iou", cfg.get("catch_iou")),
                       "yield_response": s04.get("yield_response", cfg.get("yield_response"))},
        "eval_split": d04.get("split", cfg.get("eval_split")),
        "top_k": d04.get("top_k", cfg.get("top_k")),
        "tile_pairing": d04.get("tile_pairing", cfg.get("tile_pairing")),
        "work_size": d04.get("work_size"),
        "data": cfg.get("data", d01.get("source")),
        "dataset": {k: d01.get(k) for k in ("source", "images", "classes", "mean", "std")},
        "preset": d02.get("preset", cfg.get("preset")),
        "model": d02.get("model", cfg.get("model")),
        "weights": d02.get("weights_label", cfg.get("weights")),
        "init_weights": cfg.get("weights") or None,
        "trained": d02.get("trained"),
        "steps": d02.get("steps_done"),
        "train_wall_s": d02.get("wall_s"),
        "best_val_miou": d02.get("best_val_miou"),
        "beyond": {k: d06.get(k) for k in ("rows", "training", "budget_minutes", "split", "top_k", "tune_steps",
                                           "max_queries")} if d06 else {},
        "device": d04.get("device", cfg.get("device")),
        "wall_time_s": wall_s,
        "stage_times_s": stage_times or {},
        "git_commit": git_commit(),
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        "parameters": cfg,
        "fragments": frags,
    }
    return _jsonable(summary)


def headline_table(summary: dict[str, Any]):
    """The headline as a table: metric, ours, original, paint nothing, paint everything."""
    import pandas as pd

    h, pub, b = summary.get("headline", {}), summary.get("published", {}), summary.get("baselines", {})
    nothing, everything = b.get("paint_nothing", {}), b.get("paint_everything", {})
    labels = {"positive_miou": "positive mIoU", "catch_rate": "catch rate", "negative_miou": "negative mIoU",
              "yield_rate": "yield rate (negative prompts)", "free_yield_rate": "defect-free yield", "pes": "PES"}
    bkey = {"positive_miou": "miou"}
    rows = []
    for k, v in h.items():
        if k.startswith("miou_split_"):
            rest = k[len("miou_split_"):]
            label = f"mIoU split {rest.replace('_top', ', top-')}"
            rows.append({"metric": label, "ours": v, "original": pub.get(k), "paint_nothing": nothing.get("miou"),
                         "paint_everything": everything.get("miou")})
    for k in HEADLINE_KEYS:
        if k in h:
            rows.append({"metric": labels[k], "ours": h[k], "original": pub.get(k),
                         "paint_nothing": nothing.get(bkey.get(k, k)), "paint_everything": everything.get(bkey.get(k, k))})
    df = pd.DataFrame(rows, columns=["metric", "ours", "original", "paint_nothing", "paint_everything"])
    return df.astype({c: float for c in ("ours", "original", "paint_nothing", "paint_everything")}, errors="ignore")


def _html_table(df, floatfmt: str = ".3f") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            is_num = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            cells.append(f"<td{' class=num' if is_num else ''}>{html.escape(_fmt_cell(v, floatfmt))}</td>")
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
"""


def beyond_table(summary: dict[str, Any]):
    """Notebook 06's rows from a summary: recipe, prompt, training steps, mIoU, catch, yield,
    defect-free yield, PES (empty when 06 did not run)."""
    import pandas as pd

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
    return ["<h2>Beyond the original</h2>", _html_table(df),
            f"<p><small>Notebook 06: the original's negatives (a negative pair paints the query's own defect) against "
            f"class-aware negatives (it paints nothing), trained with the same budget "
            f"({b.get('budget_minutes')} min), each with one image prompt, a top-{b.get('top_k')} ensemble and a "
            f"learned prompt ({b.get('tune_steps')} tuning steps per class, the model frozen); split "
            f"{b.get('split')}, at most {b.get('max_queries')} queries per kind.</small></p>"]


def write_index_html(results_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """``index.html``: headline table, run settings, links to every report, table and figure
    (relative links; inline CSS, no script, nothing fetched)."""
    dirs = result_dirs(results_dir)
    root = dirs["root"]
    h = html.escape
    status = summary.get("status", "complete")
    meta = [("status", status), ("data", summary.get("data")), ("preset", summary.get("preset")),
            ("weights evaluated", summary.get("weights")),
            ("initial weights", summary.get("init_weights") or "none (random initialisation)"),
            ("training steps", summary.get("steps")), ("device", summary.get("device")),
            ("evaluation", f"split {summary.get('eval_split')}, top-{summary.get('top_k')}, "
                           f"{summary.get('tile_pairing')} tile pairing, work size {summary.get('work_size')}"),
            ("thresholds", f"catch IoU ≥ {summary.get('thresholds', {}).get('catch_iou')}, "
                           f"yield response < {summary.get('thresholds', {}).get('yield_response')}"),
            ("wall time", f"{(summary.get('wall_time_s') or 0) / 60:.1f} min"),
            ("git commit", summary.get("git_commit")), ("finished", summary.get("finished"))]
    meta_rows = "".join(
        f"<tr><td>{h(k)}</td><td{' class=status-failed' if k == 'status' and v != 'complete' else ''}>{h(str(v))}</td></tr>"
        for k, v in meta)
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>SegGPT defect segmentation: results</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SegGPT few-shot defect segmentation: results</h1>",
        "<h2>Headline</h2>",
        _html_table(headline_table(summary)),
        "<p><small>original: the published figures of the project this one grows from (11 VISION queries, split 2; "
        "BRIEF §1.5). Paint nothing / paint everything: trivial baselines on the same pairs. "
        "PES = 0.5·catch + 0.5·yield; a silent model scores 0.5.</small></p>",
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
    parts.append("</body></html>\n")
    path = root / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# running notebooks
# ------------------------------------------------------------------------------------------
def notebook_source(name: str, notebooks_dir: str | os.PathLike | None = None):
    """A notebook as an nbformat node, read from its percent-format ``.py`` (the source of
    truth; the paired ``.ipynb`` when there is no ``.py``)."""
    import jupytext

    d = Path(notebooks_dir or NOTEBOOK_DIR)
    py, ipynb = d / f"{name}.py", d / f"{name}.ipynb"
    if py.is_file():
        nb = jupytext.read(py)
    elif ipynb.is_file():
        nb = jupytext.read(ipynb)
    else:
        raise PipelineError(f"notebook {name} not found in {d} (.py or .ipynb)")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata.pop("jupytext", None)
    return nb


def notebook_parameters(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The papermill parameters of notebook ``name`` from a pipeline config."""
    keys = NOTEBOOK_PARAMETERS[name]
    params: dict[str, Any] = {}
    for k in keys:
        if k in ("source", "source_path"):
            continue
        params[k] = copy.deepcopy(config[k])
    if "source" in keys:
        params["source"], params["source_path"] = parse_data_spec(config["data"])
    if "weights" in params and params["weights"]:
        params["weights"] = str(Path(params["weights"]).expanduser().resolve())
    if "preset" in params and params.get("weights") and "preset" not in config.get("_explicit", []):
        params["preset"] = "auto"  # weights given, no preset asked for: the checkpoint's architecture
    params["results_dir"] = str(Path(config["results_dir"]).expanduser().resolve())
    return params


def _kernel_env() -> None:
    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")  # this environment's python3 kernel first
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    os.environ.setdefault("MPLBACKEND", "agg")
    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")


def _kernel_manager_class():
    """A kernel manager that provisions CurveZMQ keys where jupyter_client, pyzmq and the
    kernelspec support it (encrypted kernel traffic, and no "running over TCP without
    encryption" warning on every stage); None keeps nbclient's default."""
    try:
        import zmq
        from jupyter_client.manager import AsyncKernelManager
    except ImportError:  # pragma: no cover
        return None
    if "transport_encryption" not in AsyncKernelManager.class_trait_names() or not zmq.has("curve"):
        return None

    class _CurveKernelManager(AsyncKernelManager):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.transport_encryption = "auto"  # only where the kernelspec declares support

    return _CurveKernelManager


class _PrefixWriter:
    """A text stream that prefixes every line (the notebooks' printed progress, indented)."""

    def __init__(self, stream, prefix: str = "    | ") -> None:
        self.stream, self.prefix, self._bol = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for ch in text.splitlines(keepends=True):
            if self._bol:
                out.append(self.prefix)
            out.append(ch)
            self._bol = ch.endswith("\n")
        self.stream.write("".join(out))
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def execute_notebook(name: str, output: str | os.PathLike, parameters: dict[str, Any], kernel: str = "python3",
                     notebooks_dir: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                     timeout: int | None = None, echo=None) -> Path:
    """Run notebook ``name`` with papermill, writing the executed copy to ``output``; what the
    notebook prints goes to ``echo`` (a text stream) too, line by line as it comes. A failing
    cell raises :class:`PipelineError` naming the notebook, the error and the partial copy."""
    import nbformat
    import papermill as pm
    from jupyter_client.kernelspec import NoSuchKernel

    _kernel_env()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    src = output.with_name(output.stem + ".input.ipynb")
    nb = notebook_source(name, notebooks_dir)
    nb.metadata["kernelspec"]["name"] = kernel
    nbformat.write(nb, src)
    try:
        declared = pm.inspect_notebook(str(src))
        unknown = sorted(set(parameters) - set(declared))
        if unknown:
            raise PipelineError(f"notebook {name} has no parameter(s) {unknown} (its parameters: {sorted(declared)})")
        extra: dict[str, Any] = {}
        if echo is not None:
            extra["stdout_file"] = _PrefixWriter(echo)
        km = _kernel_manager_class()
        if km is not None:
            extra["kernel_manager_class"] = km
        pm.execute_notebook(str(src), str(output), parameters=parameters, kernel_name=kernel, progress_bar=False,
                            cwd=str(cwd or os.getcwd()), execution_timeout=timeout, log_output=False, **extra)
    except NoSuchKernel:
        raise PipelineError(f"no Jupyter kernel named {kernel!r}: install it with "
                            f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel}` (make install does)") from None
    except pm.PapermillExecutionError as e:
        raise PipelineError(
            f"notebook {name} failed in cell {e.cell_index} (execution count {e.exec_count}): {e.ename}: {e.evalue}\n"
            f"  partially executed copy: {output}"
        ) from None
    finally:
        try:
            src.unlink()
        except OSError:
            pass
    return output


def render_html(executed: str | os.PathLike, out_html: str | os.PathLike) -> Path:
    """An executed notebook as a standalone HTML page (images embedded)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed), as_version=4)
    exporter = HTMLExporter()
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(executed).stem}})
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def _fmt_dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Heartbeat:
    """Prints ``still running`` lines (with the training's last logged step) while a stage runs."""

    def __init__(self, label: str, interval: float, t_start: float, probe: Callable[[], str] | None,
                 log: Callable[[str], None]) -> None:
        self.label, self.interval, self.t_start, self.probe, self.log = label, interval, t_start, probe, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.interval):
            extra = ""
            if self.probe is not None:
                try:
                    extra = self.probe()
                except Exception:  # a half-written file: skip this beat
                    extra = ""
            self.log(f"{self.label}: running for {_fmt_dur(time.perf_counter() - t0)} "
                     f"(total {_fmt_dur(time.perf_counter() - self.t_start)}){'; ' + extra if extra else ''}")

    def __enter__(self):
        if self.interval and self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def training_run_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "work" / "train" / "run"


def _training_probe(results_dir: Path, beyond: bool = False) -> Callable[[], str]:
    def probe() -> str:
        if beyond:  # notebook 06 trains in work/beyond/run_<negative_target>
            found = sorted((Path(results_dir) / "work" / "beyond").glob("run_*/metrics.csv"),
                           key=lambda q: q.stat().st_mtime)
            p = found[-1] if found else Path(results_dir) / "missing"
        else:
            p = training_run_dir(results_dir) / "metrics.csv"
        if not p.is_file():
            return ""
        lines = p.read_text().strip().splitlines()
        if len(lines) < 2:
            return ""
        head = lines[0].split(",")
        last = dict(zip(head, lines[-1].split(",")))
        msg = f"step {last.get('step')}, loss {float(last.get('loss', 'nan')):.4f}"
        vals = [dict(zip(head, ln.split(","))).get("val_miou", "") for ln in lines[1:]]
        vals = [v for v in vals if v not in ("", "nan")]
        if vals:
            msg += f", val mIoU {float(vals[-1]):.3f}"
        return msg

    return probe


def _clean_outputs(dirs: dict[str, Path]) -> None:
    for sub in ("tables", "figures", "reports"):
        for p in dirs[sub].iterdir():
            if p.is_file():
                p.unlink()
    for p in (dirs["root"] / "summary.json", dirs["root"] / "index.html"):
        if p.exists():
            p.unlink()
    for p in dirs["work"].glob("*.json"):
        p.unlink()
    for p in dirs["work"].glob("*.ipynb"):
        p.unlink()


def reproduce(config: dict[str, Any], stages: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the notebooks (all five, or ``stages``) with one set of parameters, render the
    reports, merge the summary, write ``summary.json`` and ``index.html``. Returns the summary.
    A failing stage raises :class:`PipelineError` (after writing a partial summary and index)."""
    stages = list(stages or NOTEBOOKS)
    for s in stages:
        if s not in NOTEBOOK_PARAMETERS:
            raise PipelineError(f"unknown stage {s!r}; stages: {', '.join(NOTEBOOK_PARAMETERS)}")
    results = Path(config["results_dir"]).expanduser().resolve()
    if any((results / marker).exists() for marker in (".git", "pyproject.toml", "setup.py")):
        raise PipelineError(f"results_dir {results} looks like a source tree; pick a folder of its own (e.g. results)")
    dirs = result_dirs(results)
    if stages == list(NOTEBOOKS):
        _clean_outputs(dirs)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    n = len(stages)
    log(f"seggpt reproduce: {n} stage(s) -> {results}")
    log(f"  data {config['data']}, preset {config['preset']}, weights {config['weights'] or '(none)'}, "
        f"steps {config['steps']}, train_minutes {config['train_minutes']}, device {config['device']}")
    failure: PipelineError | None = None
    for i, name in enumerate(stages, 1):
        label = f"[{i}/{n}] {name}"
        params = notebook_parameters(name, config)
        out = dirs["work"] / f"{name}.ipynb"
        log(f"{label}: started (total {_fmt_dur(time.perf_counter() - t_start)})")
        t0 = time.perf_counter()
        probe = (_training_probe(results) if name == "02_training" else
                 _training_probe(results, beyond=True) if name == BEYOND_NOTEBOOK else None)
        try:
            with _Heartbeat(label, float(config.get("heartbeat_s") or 0), t_start, probe, log):
                execute_notebook(name, out, params, kernel=config.get("kernel", "python3"),
                                 echo=sys.stdout if config.get("echo", True) else None)
        except PipelineError as e:
            times[name] = time.perf_counter() - t0
            failure = PipelineError(f"stage {i}/{n} failed: {e}")
            if out.is_file() and config.get("html", True):
                try:
                    render_html(out, dirs["reports"] / f"{name}.html")
                    failure = PipelineError(f"{failure}\n  its report so far: {dirs['reports'] / (name + '.html')}")
                except Exception:  # the partial copy may be unreadable: the message above still holds
                    pass
            log(f"{label}: FAILED after {_fmt_dur(times[name])}")
            break
        times[name] = time.perf_counter() - t0
        if config.get("html", True):
            render_html(out, dirs["reports"] / f"{name}.html")
        log(f"{label}: done in {_fmt_dur(times[name])} (total {_fmt_dur(time.perf_counter() - t_start)})")
    wall = time.perf_counter() - t_start
    summary = build_summary(results, config, times, wall, status="complete" if failure is None else "failed")
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failure is None:
        write_table(headline_table(summary), results, "headline", title="Headline figures",
                    note="original: the published figures (BRIEF §1.5); baselines on the same pairs.")
    write_index_html(results, summary)
    if failure is not None:
        raise failure
    log(f"done in {_fmt_dur(wall)}: {results / 'index.html'}")
    h = summary["headline"]
    show = ", ".join(f"{k} {v:.3f}" for k, v in h.items() if isinstance(v, (int, float)))
    if show:
        log(f"headline: {show}")
    return summary


# ------------------------------------------------------------------------------------------
# CLI: seggpt reproduce
# ------------------------------------------------------------------------------------------
