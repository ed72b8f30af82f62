"""Seeded train/val/test splits of a dataset ROOT.

Protocols:

* ``stratified``: every class is split on its own with the given fractions, so every class
  with at least three images appears in train, val and test (when both fractions are > 0).
* ``holdout-classes``: the named (or K randomly chosen) defect classes go only to test, to
  measure generalisation to defect types never seen in training; every other class,
  ``free`` included, is split as above.

Output: ``OUT/{train,val,test}/`` (each a dataset ROOT; files copied, never moved) and
``OUT/split.json`` with the seed, protocol, fractions, per-class counts, the class -> split
assignment and the file lists. The shuffle of a class depends only on the seed and the class
name, so adding a class does not reshuffle the others.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import (
    FREE_CLASS,
    DataPrepError,
    Sample,
    check_output,
    copy_file,
    output_dir,
    progress,
    scan_dataset,
    write_classes_csv,
)

SPLITS = ("train", "val", "test")


def allocate(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for a class of ``n`` images: rounded fractions, at least one
    image in each split with a positive fraction when ``n >= 3``, and at least one in train."""
    n_val, n_test = int(round(n * val)), int(round(n * test))
    if n >= 3:
        if val > 0:
            n_val = max(1, n_val)
        if test > 0:
            n_test = max(1, n_test)
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _class_rng(seed: int, cls: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(cls.encode("utf-8"))])


def _check_parameters(seed, val, test, holdout_classes, holdout_n) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataPrepError(f"seed must be a non-negative integer, got {seed!r}")
    for name, f in (("val", val), ("test", test)):
        if not 0 <= f < 1:
            raise DataPrepError(f"--{name} must be in [0, 1), got {f}")
    if val + test >= 1:
        raise DataPrepError(f"--val + --test must be below 1 (got {val} + {test})")
    if holdout_classes and holdout_n:
        raise DataPrepError("give either --holdout-classes or --holdout-n, not both")
    if holdout_n is not None and holdout_n < 0:
        raise DataPrepError(f"--holdout-n must not be negative, got {holdout_n}")


def plan_split(samples: Sequence[Sample], seed: int = 0, val: float = 0.15, test: float = 0.15,
               holdout_classes: Sequence[str] | None = None, holdout_n: int | None = None) -> dict:
    """Decide the split of ``samples`` without touching files. Returns the split.json dict
    (``files`` maps each split to its sorted file names)."""
    _check_parameters(seed, val, test, holdout_classes, holdout_n)
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.cls, []).append(s)
    defect_classes = sorted(c for c in by_class if c != FREE_CLASS)

    held: list[str] = []
    if holdout_classes:
        held = sorted(set(holdout_classes))
        for c in held:
            if c == FREE_CLASS:
                raise DataPrepError(f"'{FREE_CLASS}' cannot be held out (defect-free images are split normally)")
            if c not in by_class:
                raise DataPrepError(f"hold-out class {c!r} is not in the dataset (classes: {', '.join(defect_classes)})")
    elif holdout_n:
        if holdout_n >= len(defect_classes):
            raise DataPrepError(f"--holdout-n must be between 1 and {len(defect_classes) - 1} "
                                f"(the dataset has {len(defect_classes)} defect classes), got {holdout_n}")
        rng = np.random.default_rng([int(seed), 0x401D])
        held = sorted(rng.choice(defect_classes, size=holdout_n, replace=False).tolist())
    if held and len(held) >= len(defect_classes):
        raise DataPrepError("every defect class is held out: nothing is left to train on")

    files = {s: [] for s in SPLITS}
    counts, assignment = {}, {}
    for cls in sorted(by_class):
        names = sorted(s.file for s in by_class[cls])
        if cls in held:
            parts = {"train": [], "val": [], "test": names}
        else:
            order = _class_rng(seed, cls).permutation(len(names))
            shuffled = [names[i] for i in order]
            n_tr, n_va, _ = allocate(len(names), val, test)
            parts = {"train": shuffled[:n_tr], "val": shuffled[n_tr:n_tr + n_va], "test": shuffled[n_tr + n_va:]}
        for sp in SPLITS:
            files[sp].extend(parts[sp])
        counts[cls] = {sp: len(parts[sp]) for sp in SPLITS}
        assignment[cls] = [sp for sp in SPLITS if parts[sp]]
    return {
        "seed": int(seed),
        "protocol": "holdout-classes" if held else "stratified",
        "fractions": {"val": val, "test": test},
        "holdout_classes": held,
        "classes": counts,
        "assignment": assignment,
        "files": {sp: sorted(v) for sp, v in files.items()},
    }


def split_dataset(src, out, seed: int = 0, val: float = 0.15, test: float = 0.15,
                  holdout_classes: Sequence[str] | None = None, holdout_n: int | None = None,
                  skip_bad: bool = False, overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Split the dataset ROOT ``src`` into ``out/{train,val,test}`` (copies) + ``out/split.json``.
    See :func:`plan_split` for the protocol. Returns ``out``."""
    src, out = Path(src), Path(out)
    check_output(out, [src], overwrite)
    _check_parameters(seed, val, test, holdout_classes, holdout_n)
    samples = scan_dataset(src, skip_bad=skip_bad, verify=True)
    plan = plan_split(samples, seed, val, test, holdout_classes, holdout_n)
    by_file = {s.file: s for s in samples}
    with output_dir(out, sources=[src], overwrite=overwrite) as tmp:
        for sp in SPLITS:
            root = tmp / sp
            (root / "images").mkdir(parents=True)
            (root / "labels").mkdir()
            rows = []
            for name in progress(plan["files"][sp], desc=f"split {sp}", enabled=show_progress):
                s = by_file[name]
                copy_file(s.image, root / "images" / s.image.name)
                copy_file(s.label, root / "labels" / s.label.name)
                rows.append(s.extra)
            write_classes_csv(root, rows)
        meta = {"source": str(src), **plan}
        (tmp / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
