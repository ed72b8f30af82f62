"""The magnetic-tile study's data (``seggpt study``): the photos converted once, then split per
protocol: **seen classes** (a seeded split of every class) and **held-out classes** (defect
classes never in training; their test images split into a support half, the prompt pool and the
prompt-tuning data, and a query half)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from seggpt_lib.data.layout import FREE_CLASS, read_classes_csv

from .common import check_not_inside, copy_file, write_classes_csv
from .magnetic_tile import convert_magnetic_tile
from .split import split_dataset

PROTOCOLS = ("seen", "holdout")
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data() -> Path:
    """``$SEGGPT_SHARED_DATASETS/magnetic_tile``, else ``../shared/datasets/magnetic_tile`` beside the repo."""
    base = Path(os.environ.get("SEGGPT_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
    return base / "magnetic_tile"


def _copy_root(out: Path, entries: Sequence[tuple[Path, str]]) -> Path:
    """A dataset root at ``out`` holding ``entries`` ((source root, image file)), files copied,
    ``classes.csv`` rows taken from the sources'."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows, manifests = [], {}
    for src, f in entries:
        if src not in manifests:
            manifests[src] = {r["file"]: r for r in (read_classes_csv(src) or [])}
        copy_file(src / "images" / f, out / "images" / f)
        copy_file(src / "labels" / f"{Path(f).stem}.png", out / "labels" / f"{Path(f).stem}.png")
        rows.append(manifests[src].get(f) or {"file": f})
    write_classes_csv(out, rows)
    return out


def make_holdout_eval(split_root: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                      support_share: float = 0.5) -> dict[str, Any]:
    """The evaluation folder of the held-out-class protocol from a split made with held-out
    classes (``split.json``'s ``holdout_classes``): ``out/train`` = the training split plus a
    seeded ``support_share`` of each held-out class's images (the prompts and the prompt-tuning
    data of classes the model never saw), ``out/test`` = the rest of the held-out classes'
    images (the queries) and the defect-free test images. Returns ``root``, ``holdout_classes``,
    ``support`` and ``queries`` (files per class)."""
    sr, out = Path(split_root), Path(out)
    meta = json.loads((sr / "split.json").read_text())
    held = list(meta.get("holdout_classes") or [])
    if not held:
        raise ValueError(f"{sr}: no held-out classes in split.json")
    test_rows = read_classes_csv(sr / "test") or []
    by_cls: dict[str, list[str]] = {}
    for r in test_rows:
        by_cls.setdefault(r["class"], []).append(r["file"])
    if out.exists():
        shutil.rmtree(out)
    support, queries = {}, {}
    rng = np.random.default_rng([int(seed), 0x5EED])
    for c in held:
        files = sorted(by_cls.get(c, []))
        if len(files) < 3:
            raise ValueError(f"held-out class {c!r} has {len(files)} image(s); at least 3 are needed "
                             "(two support images for a positive prompt, one query)")
        order = rng.permutation(len(files))
        n_sup = min(len(files) - 1, max(2, int(round(len(files) * support_share))))
        support[c] = sorted(files[i] for i in order[:n_sup])
        queries[c] = sorted(files[i] for i in order[n_sup:])
    train_files = [r["file"] for r in (read_classes_csv(sr / "train") or [])]
    _copy_root(out / "train", [(sr / "train", f) for f in train_files]
               + [(sr / "test", f) for c in held for f in support[c]])
    _copy_root(out / "test", [(sr / "test", f) for c in held for f in queries[c]]
               + [(sr / "test", f) for f in sorted(by_cls.get(FREE_CLASS, []))])
    return {"root": str(out), "holdout_classes": held, "support": support, "queries": queries}


def prepare_study_data(src: str | os.PathLike, work: str | os.PathLike, *, limit_per_class: int | None = None,
                       val: float = 0.1, test: float = 0.3, protocols: Sequence[str] = PROTOCOLS, seed: int = 0,
                       holdout_classes: Sequence[str] | None = None, holdout_n: int = 2,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Convert the magnetic-tile photos under ``src`` into ``work/source`` and split them per
    protocol into ``work/split_<protocol>`` (held-out: ``holdout_classes``, or ``holdout_n`` drawn
    with ``seed``; its evaluation folder ``work/eval_holdout`` from :func:`make_holdout_eval`).
    Returns ``{source, work, convert_s, protocols: {name: {split_root, eval_root, holdout_classes, split_s}}}``."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"protocol must be 'seen' or 'holdout', got {p!r}")
    src, work = Path(src), Path(work)
    if not src.is_dir():
        raise FileNotFoundError(f"magnetic-tile dataset not found: {src} (give --data)")
    check_not_inside(work, {"--data": src}, what="work folder")  # before anything below is removed or written
    t0 = time.perf_counter()
    root = work / "source"
    if root.exists():
        shutil.rmtree(root)
    convert_magnetic_tile(src, root, limit_per_class=limit_per_class, overwrite=True, show_progress=False)
    out: dict[str, Any] = {"source": str(src), "work": str(work), "convert_s": time.perf_counter() - t0, "protocols": {}}
    for proto in protocols:
        t0 = time.perf_counter()
        split_dir = work / f"split_{proto}"
        if split_dir.exists():
            shutil.rmtree(split_dir)
        if proto == "seen":
            split_dataset(root, split_dir, seed=seed, val=val, test=test, overwrite=True, show_progress=False)
            eval_root, held = split_dir, []
        else:
            split_dataset(root, split_dir, seed=seed, val=val, test=test,
                          holdout_classes=list(holdout_classes) if holdout_classes else None,
                          holdout_n=None if holdout_classes else int(holdout_n), overwrite=True, show_progress=False)
            ho = make_holdout_eval(split_dir, work / "eval_holdout", seed=seed)
            eval_root, held = Path(ho["root"]), ho["holdout_classes"]
        out["protocols"][proto] = {"split_root": str(split_dir), "eval_root": str(eval_root), "holdout_classes": held,
                                   "split_s": time.perf_counter() - t0}
    return out
