"""Prepare the pipeline's dataset in one call (notebook 01): build (synthetic) or convert (COCO,
magnetic tile) it, split it into train/val/test, and describe it per split."""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from seggpt_lib.data.layout import DATA_SOURCES, is_dataset_root, is_split_root

from .common import DataPrepError
from .magnetic_tile import convert_magnetic_tile
from .split import split_dataset
from .stats import dataset_stats
from .synthetic import generate_synthetic
from .vision_coco import convert_vision_coco, find_coco_files, has_export_splits

# the synthetic set's settings and their defaults: generate_synthetic's own
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    k: inspect.signature(generate_synthetic).parameters[k].default for k in ("per_class", "size", "n_free", "seed")}


def prepare_data(work_dir: str | os.PathLike, source: str = "synthetic", source_path: str = "",
                 synthetic: dict[str, Any] | None = None, limit_per_class: int | None = None, split_seed: int = 0,
                 val: float = 0.15, test: float = 0.15, rebuild: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (synthetic) or convert (coco, magnetic_tile) the dataset into ``work_dir/data/source``
    and split it (seeded, stratified) into ``work_dir/data/split/{train,val,test}``. A COCO
    export with its own train and test (``valid`` optional) keeps them: converted straight into
    ``work_dir/data/split`` and never re-split. A ``folder``
    already split into ``train/`` and ``test/`` (``val/`` optional) is used in place; a folder in
    our layout (``images/``, ``labels/``) is split. Reuses an earlier build of the same settings
    unless ``rebuild``. Returns ``{source, source_path, root, split_root, reused, seconds}``."""
    if source not in DATA_SOURCES:
        raise DataPrepError(f"source must be one of {DATA_SOURCES}, got {source!r}")
    t0 = time.perf_counter()
    data_dir = Path(work_dir) / "data"
    src_dir, split_dir = data_dir / "source", data_dir / "split"
    syn = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}
    spec = {"source": source, "source_path": str(source_path), "split_seed": split_seed, "val": val, "test": test,
            "synthetic": syn if source == "synthetic" else None, "limit_per_class": limit_per_class}
    if source == "folder":
        src = Path(source_path)
        if not src.is_dir():
            raise DataPrepError(f"dataset folder not found: {src}")
        if is_split_root(src):
            log(f"using the split dataset in place: {src}")
            return {"source": source, "source_path": str(src), "root": str(src), "split_root": str(src),
                    "reused": True, "seconds": time.perf_counter() - t0}
        if not is_dataset_root(src):
            raise DataPrepError(f"{src}: neither a dataset (images/, labels/) nor a split one (train/, test/)")
    stamp = data_dir / "prepare.json"
    if not rebuild and stamp.is_file() and is_split_root(split_dir):
        try:
            if json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
                log(f"reusing the dataset built earlier with the same settings: {split_dir}")
                root = src if source == "folder" else src_dir if src_dir.is_dir() else split_dir
                return {"source": source, "source_path": str(source_path), "root": str(root), "split_root": str(split_dir),
                        "reused": True, "seconds": time.perf_counter() - t0}
        except json.JSONDecodeError:
            pass
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    if source == "synthetic":
        log(f"generating the synthetic set: {syn}")
        root = generate_synthetic(src_dir, seed=int(syn["seed"]), per_class=int(syn["per_class"]), size=int(syn["size"]),
                                  n_free=syn.get("n_free"), overwrite=True, show_progress=False)
    elif source == "coco":
        files = find_coco_files(source_path)
        if has_export_splits(files) and {"train", "test"} <= {f.our_split for f in files}:
            # the export's own train/val/test: kept, never re-split (a photo stays where the export put it)
            log(f"converting the COCO export under {source_path}, keeping its own train/val/test split")
            convert_vision_coco(source_path, split_dir, keep_splits=True, overwrite=True, show_progress=False)
            stamp.write_text(json.dumps(spec, indent=2) + "\n")
            return {"source": source, "source_path": str(source_path), "root": str(split_dir),
                    "split_root": str(split_dir), "reused": False, "seconds": time.perf_counter() - t0}
        log(f"converting the COCO files under {source_path}")
        root = convert_vision_coco(source_path, src_dir, keep_splits=False, overwrite=True, show_progress=False)
    elif source == "magnetic_tile":
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


def stats_table(split_root: str | os.PathLike):
    """Per split: images, per-channel mean / std (0..1), image sizes, mean defect fraction."""
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
