"""Notebook 01's calls on the prepared dataset (built by :mod:`data_prep.prepare`): class counts and
the training pairs as the trainer builds them."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from seggpt_lib.data.layout import SPLITS, DefectIndex, is_dataset_root
from seggpt_lib.data.pairs import PairConfig, PairDataset
from seggpt_lib.engine.trainer import auto_fg_weight, defect_share
from seggpt_lib.experiments.config import PIPELINE_RECIPE, model_config


def split_roots(split_root: str | os.PathLike) -> dict[str, Path]:
    """The existing ``train``/``val``/``test`` dataset roots of a split folder."""
    sr = Path(split_root)
    return {sp: sr / sp for sp in SPLITS if is_dataset_root(sr / sp)}


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
        fg_weight=1.0 if t.get("fg_weight") == "auto" else float(t.get("fg_weight", 1.0)),
        weight_query_defects=t.get("weight_query_defects", False),
        negative_share=float(t.get("negative_share", 0.25))))
    if t.get("fg_weight") == "auto":  # as the trainer resolves it: from the training set's defect share
        ds.fg_weight = auto_fg_weight(defect_share(ds.cache))
    return ds
