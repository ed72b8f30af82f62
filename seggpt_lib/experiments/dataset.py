"""Notebook 01's calls: build or convert the dataset, split it, describe it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
import json
import math
import numpy as np
import os
import shutil
import time
import pandas as pd

from data_prep.magnetic_tile import convert_magnetic_tile
from data_prep.split import split_dataset
from data_prep.stats import dataset_stats
from data_prep.synthetic import generate_synthetic
from data_prep.vision_coco import convert_vision_coco
from seggpt_lib.data.layout import DefectIndex
from seggpt_lib.data.pairs import PairConfig, PairDataset
from seggpt_lib.experiments.config import DATA_SOURCES, PIPELINE_RECIPE, SYNTHETIC, PipelineError, model_config


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
    if source not in DATA_SOURCES:
        raise PipelineError(f"source must be one of {DATA_SOURCES}, got {source!r}")
    t0 = time.perf_counter()
    data_dir = Path(work_dir) / "data"
    src_dir, split_dir = data_dir / "source", data_dir / "split"
    syn = {**SYNTHETIC, **(synthetic or {})}
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
        log(f"generating the synthetic set: {syn}")
        root = generate_synthetic(src_dir, seed=int(syn["seed"]), per_class=int(syn["per_class"]), size=int(syn["size"]),
                                  n_free=syn.get("n_free"), overwrite=True, show_progress=False)
    elif source == "coco":
        log(f"converting VISION COCO files under {source_path}")
        root = convert_vision_coco(source_path, src_dir, overwrite=True, show_progress=False)
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


def split_roots(split_root: str | os.PathLike) -> dict[str, Path]:
    """The existing ``train``/``val``/``test`` dataset roots of a split folder."""
    sr = Path(split_root)
    return {sp: sr / sp for sp in ("train", "val", "test") if _is_root(sr / sp)}


def scan_index(root: Path):

    return DefectIndex.scan(root, verify=False)


def class_counts(split_root: str | os.PathLike):
    """Images per class and split (defect-free images under ``free``), with a total row."""
    counts: dict[str, dict[str, int]] = {}
    splits = list(split_roots(split_root))
    for sp, root in split_roots(split_root).items():
        idx = scan_index(root)
        for i in range(len(idx)):
            cls = "free" if idx.is_free[i] else idx.class_of(i)
            counts.setdefault(cls, {s: 0 for s in splits})[sp] += 1
    rows = [{"class": c, **v, "total": sum(v.values())} for c, v in sorted(counts.items(), key=lambda t: (t[0] == "free", t[0]))]
    df = pd.DataFrame(rows, columns=["class", *splits, "total"])
    total = {"class": "all", **{s: int(df[s].sum()) for s in splits}, "total": int(df["total"].sum())}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def image_stats(split_root: str | os.PathLike):
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


def has_positive_pairs(root: str | os.PathLike) -> bool:
    """Whether some defect class of ``root`` has two images with defects (what pairs need)."""
    idx = scan_index(Path(root))
    ids = idx.class_ids[~idx.is_free]
    return bool(len(ids)) and int(np.bincount(ids).max()) >= 2


def display_dataset(split_root: str | os.PathLike, preset: str = "vit_micro", model: dict | None = None,
                    weights: str = "", seed: int = 0, train: dict[str, Any] | None = None, n: int = 4):
    """A few training samples as the trainer builds them (for the pair-colouring figure)."""
    mcfg = model_config(preset, model, weights)
    t = {**PIPELINE_RECIPE, **(train or {})}
    idx = scan_index(Path(split_root) / "train")
    ds = PairDataset(idx, PairConfig.for_model(
        mcfg, train=True, mask_ratio=float(t.get("mask_ratio", 0.75)),
        query_mask_share=float(t.get("query_mask_share", 0.0)), defect_color=t.get("defect_color"),
        negative_target=t.get("negative_target", "query_mask"), seed=seed, length=max(n, 1),
        fg_weight=float(t.get("fg_weight", 1.0)), negative_share=float(t.get("negative_share", 0.25))))
    return ds
