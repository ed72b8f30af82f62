"""Seeded, leak-free train/val/test splits of a dataset ROOT.

Protocols:

* ``stratified``: every class is split on its own with the given fractions, so every class
  with at least three groups (see below) appears in train, val and test (when both fractions
  are > 0).
* ``holdout-classes``: the named (or K randomly chosen) defect classes go only to test, to
  measure generalisation to defect types never seen in training; every other class,
  ``free`` included, is split as above.

**Groups: no photo on both sides.** What is split is *groups* of images, never single images
of a group:

* images sharing a value in the optional ``group`` column of ``classes.csv`` form one group
  (every derivative of one source photo shares it: ``seggpt prepare coco`` writes it for the
  per-category copies of one photo, prepare coco --per-category-copies); an image without one is its own group;
* near-duplicates (:mod:`data_prep.near_duplicates`: rotated, mirrored, re-encoded or rescaled
  copies of one photo) are merged into one group (union-find), unless ``dedup=False``
  (``--no-dedup``); ``dedup_distance`` (``--dedup-distance``) sets how close counts.

A group whose images belong to several classes is assigned with one of them, its *main*
class: a held-out class if it has one (the whole group goes to test), else the defect class
with most images in the group (ties: the class with fewer images in the dataset, so rare
classes get their groups, then the name), ``free`` only when it has nothing else. Each class
then shuffles its groups (deterministically from the seed and the class name, so adding a
class does not reshuffle the others) and cuts the shuffled list where the image counts come
nearest the fractions (:func:`allocate` of the images), keeping at least one group in train
and, when the class has three groups or more, one in each split with a positive fraction.
When every group is one image this is exactly the image-wise split of earlier versions.

**Refused splits** (:class:`DataPrepError` naming the classes and why): a class (not held
out) left without a validation or a test image while ``val`` / ``test`` is > 0 (it has fewer
than three groups), unless ``allow_incomplete`` (``--allow-incomplete-classes``, which warns
instead); and, always, a split whose whole val or test part would be empty while its
fraction is > 0.

Output: ``OUT/{train,val,test}/`` (each a dataset ROOT; files copied, never moved; with
``labels.txt`` / ``class_index.json`` and ``labels_ignore/`` carried along; ``class_names``,
``--class-names a,b,c``, names the label values 1..K of a folder of class-index masks without
``labels.txt`` and writes ``labels.txt`` into each part: the names must match the values the
masks hold, exactly, else :class:`DataPrepError` naming the labels folder and the values) and
``OUT/split.json`` with the seed, protocol, fractions, per-class counts, the class -> split
assignment, the file lists, the groups (per-split counts, and the members of every group of
two or more images with its split) and the near-duplicate report (settings, merged groups,
the close pairs). When a group has two or more images, the ``group`` column of each part's
``classes.csv`` records every image's group.
"""
from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from seggpt_lib.data.layout import CLASS_INDEX_JSON, IGNORE_DIR, LABEL_NAMES

from .common import (
    FREE_CLASS,
    DataPrepError,
    DataPrepWarning,
    Sample,
    check_class_names,
    check_output,
    copy_file,
    output_dir,
    parse_class_names,
    progress,
    scan_dataset,
    write_classes_csv,
    write_label_names,
)
from .near_duplicates import DEFAULT_DISTANCE, UnionFind, near_duplicate_groups

SPLITS = ("train", "val", "test")
GROUP_COLUMN = "group"
_EXAMPLES = 5  # near-duplicate groups shown in the report


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


def cut_groups(sizes: Sequence[int], val: float, test: float) -> tuple[int, int]:
    """Where to cut a class's shuffled groups (``sizes``: images per group): train takes
    ``[0, i)``, val ``[i, j)``, test ``[j, k)``. The cuts come nearest the image counts of
    :func:`allocate`; train keeps at least one group and, with three groups or more, each split
    with a positive fraction gets one (fewer groups: :func:`allocate` of the group count)."""
    k = len(sizes)
    if k < 3:
        g_tr, g_va, _ = allocate(k, val, test)
        return g_tr, g_tr + g_va
    cum = np.concatenate([[0], np.cumsum(sizes)])
    t_tr, t_va, _ = allocate(int(cum[-1]), val, test)
    need_va, need_te = int(val > 0), int(test > 0)

    def nearest(lo: int, hi: int, target: int) -> int:
        cand = np.arange(lo, hi + 1)
        return int(cand[np.argmin(np.abs(cum[lo:hi + 1] - target))])  # the first of equals

    i = nearest(1, k - need_va - need_te, t_tr)
    j = nearest(i + need_va, k - need_te, t_tr + t_va)
    return i, j


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


# ------------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------------
def sample_groups(samples: Sequence[Sample], merge: Sequence[Sequence[str]] = ()) -> dict[str, str]:
    """``file -> group key``: the ``group`` column of ``classes.csv`` (an image without one:
    its file name), with the files of each list in ``merge`` (near-duplicates) joined into one
    group, transitively. A merged group's key is the smallest key among its members."""
    base = {s.file: (s.extra.get(GROUP_COLUMN) or "").strip() or s.file for s in samples}
    uf = UnionFind(base.values())
    for files in merge:
        keys = [base[f] for f in files if f in base]
        for other in keys[1:]:
            uf.union(keys[0], other)
    key_of = {k: keys[0] for keys in uf.sets() for k in keys}  # sets() sorts each set
    return {f: key_of[k] for f, k in base.items()}


def find_near_duplicates(samples: Sequence[Sample], max_distance: float = DEFAULT_DISTANCE,
                         workers: int | None = None) -> dict:
    """Hash every image (:mod:`data_prep.near_duplicates`) and return the report:
    ``{"enabled", "max_distance", "sets": [[files]], "pairs": [[file, file, distance]]}``
    (``sets``: the near-duplicate sets of two or more images)."""
    if max_distance is None or max_distance < 0:
        raise DataPrepError(f"--dedup-distance must be a non-negative number, got {max_distance}")
    paths = [s.image for s in samples]
    sets, pairs = near_duplicate_groups(paths, max_distance, workers)
    names = [s.file for s in samples]
    return {"enabled": True, "max_distance": max_distance,
            "sets": [[names[i] for i in g] for g in sets],
            "pairs": [[names[i], names[j], d] for i, j, d in pairs]}


def _main_class(classes: list[str], held: set[str], class_size: Mapping[str, int]) -> str:
    """The class a group is assigned with (module docstring)."""
    hit = sorted(set(classes) & held)
    if hit:
        return hit[0]
    defect = [c for c in classes if c != FREE_CLASS]
    if not defect:
        return FREE_CLASS
    count: dict[str, int] = {}
    for c in defect:
        count[c] = count.get(c, 0) + 1
    return min(count, key=lambda c: (-count[c], class_size[c], c))


def _refusal(bad: list[tuple[str, int, int, list[str]]], groups_total: int) -> str:
    parts = [f"class {cls!r} has {g} group{'s' if g != 1 else ''} ({n} image{'s' if n != 1 else ''}): "
             f"{' and '.join(miss)} would be empty" for cls, g, n, miss in bad[:6]]
    if len(bad) > 6:
        parts.append(f"... and {len(bad) - 6} more classes")
    hint = ("; merge classes, give classes.csv, or lower --val/--test (a class needs 3 groups for train, "
            "val and test; images sharing a group or near-duplicates count once)")
    if len(bad) > 5 and sum(1 for _, g, _, _ in bad if g == 1) > len(bad) / 2:
        hint += ("; nearly every class has a single group: are the classes the file-name prefixes of "
                 "numbered files? Give classes.csv or class-index masks with labels.txt")
    return "refusing the split: " + "; ".join(parts) + hint + f" ({groups_total} groups in all)"


def plan_split(samples: Sequence[Sample], seed: int = 0, val: float = 0.15, test: float = 0.15,
               holdout_classes: Sequence[str] | None = None, holdout_n: int | None = None,
               groups: Mapping[str, str] | None = None, allow_incomplete: bool = False) -> dict:
    """Decide the split of ``samples`` without touching files (see the module docstring).
    ``groups``: ``file -> group key`` (default: :func:`sample_groups`, the ``group`` column).
    Returns the split.json dict (``files`` maps each split to its sorted file names, ``groups``
    describes the groups); :class:`DataPrepError` for a refused split."""
    _check_parameters(seed, val, test, holdout_classes, holdout_n)
    if groups is None:
        groups = sample_groups(samples)
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

    members: dict[str, list[Sample]] = {}
    for s in samples:
        members.setdefault(groups.get(s.file, s.file), []).append(s)
    class_size = {c: len(v) for c, v in by_class.items()}
    held_set = set(held)
    by_main: dict[str, list[str]] = {}
    for key in sorted(members):
        by_main.setdefault(_main_class([s.cls for s in members[key]], held_set, class_size), []).append(key)

    split_of: dict[str, str] = {}  # group key -> split
    for cls in sorted(by_main):
        keys = by_main[cls]
        if cls in held_set:
            for key in keys:
                split_of[key] = "test"
            continue
        order = _class_rng(seed, cls).permutation(len(keys))
        shuffled = [keys[i] for i in order]
        i, j = cut_groups([len(members[k]) for k in shuffled], val, test)
        for pos, key in enumerate(shuffled):
            split_of[key] = "train" if pos < i else "val" if pos < j else "test"

    files = {sp: [] for sp in SPLITS}
    counts = {c: {sp: 0 for sp in SPLITS} for c in by_class}
    class_groups: dict[str, set[str]] = {c: set() for c in by_class}
    for key, ms in members.items():
        sp = split_of[key]
        for s in ms:
            files[sp].append(s.file)
            counts[s.cls][sp] += 1
            class_groups[s.cls].add(key)
    assignment = {c: [sp for sp in SPLITS if counts[c][sp]] for c in sorted(by_class)}

    bad = []
    for cls in sorted(by_class):
        if cls in held_set:
            continue  # test-only by design
        miss = [sp for sp, f in (("val", val), ("test", test)) if f > 0 and not counts[cls][sp]]
        if miss:
            bad.append((cls, len(class_groups[cls]), class_size[cls], miss))
    if bad and not allow_incomplete:
        raise DataPrepError(_refusal(bad, len(members)) + "; --allow-incomplete-classes splits anyway")
    if bad:
        warnings.warn(_refusal(bad, len(members)).replace("refusing the split: ", "incomplete classes: ", 1)
                      + "; split anyway (--allow-incomplete-classes)", DataPrepWarning, stacklevel=2)
    for sp, f, name in (("val", val, "--val"), ("test", test, "--test")):
        if f > 0 and not files[sp]:
            raise DataPrepError(f"refusing the split: the whole {sp} split would be empty ({len(members)} groups "
                                f"in {len(by_class)} classes, {name} {f}): give more images or classes.csv, or "
                                f"set {name} 0")

    multi = {k: ms for k, ms in members.items() if len(ms) > 1}
    per_split = {sp: sum(1 for k in members if split_of[k] == sp) for sp in SPLITS}
    return {
        "seed": int(seed),
        "protocol": "holdout-classes" if held else "stratified",
        "fractions": {"val": val, "test": test},
        "holdout_classes": held,
        "classes": counts,
        "assignment": assignment,
        "files": {sp: sorted(v) for sp, v in files.items()},
        "groups": {
            "total": len(members),
            "counts": per_split,
            "from_column": any((s.extra.get(GROUP_COLUMN) or "").strip() for s in samples),
            # every group of two or more images: its split and files
            "shared": {k: {"split": split_of[k], "files": sorted(s.file for s in ms)}
                       for k, ms in sorted(multi.items())},
        },
    }


def split_dataset(src, out, seed: int = 0, val: float = 0.15, test: float = 0.15,
                  holdout_classes: Sequence[str] | None = None, holdout_n: int | None = None,
                  skip_bad: bool = False, overwrite: bool = False, show_progress: bool | None = None,
                  dedup: bool = True, dedup_distance: float = DEFAULT_DISTANCE,
                  allow_incomplete: bool = False, workers: int | None = None,
                  class_names: str | Sequence[str] | None = None) -> Path:
    """Split the dataset ROOT ``src`` into ``out/{train,val,test}`` (copies) + ``out/split.json``.
    See the module docstring for the groups (``dedup``, ``dedup_distance``: near-duplicates)
    and the refused splits, :func:`plan_split` for the protocol. ``class_names`` (``"a,b,c"``
    or a list): the names of the label values 1..K (class-index masks without ``labels.txt``),
    written as ``labels.txt`` into each part. Returns ``out``."""
    src, out = Path(src), Path(out)
    check_output(out, [src], overwrite)
    _check_parameters(seed, val, test, holdout_classes, holdout_n)
    names = None
    if class_names is not None:
        names = parse_class_names(class_names)
        check_class_names(src, names)
    samples = scan_dataset(src, skip_bad=skip_bad, verify=True, class_names=names)
    if dedup:
        near = find_near_duplicates(samples, dedup_distance, workers)
    else:
        near = {"enabled": False, "max_distance": None, "sets": [], "pairs": []}
    base = sample_groups(samples)
    groups = sample_groups(samples, near["sets"])
    plan = plan_split(samples, seed, val, test, holdout_classes, holdout_n, groups=groups,
                      allow_incomplete=allow_incomplete)
    # the near-duplicate sets that joined groups that were apart (within one group they change nothing)
    merged = [sorted(fs) for fs in near["sets"] if len({base[f] for f in fs}) > 1]
    plan["near_duplicates"] = {
        "enabled": near["enabled"], "max_distance": near["max_distance"],
        "merged": len(merged), "images": sum(len(fs) for fs in merged),
        "examples": merged[:_EXAMPLES], "pairs": near["pairs"],
    }
    multi = bool(plan["groups"]["shared"])
    by_file = {s.file: s for s in samples}
    ignore_dir = src / IGNORE_DIR
    with output_dir(out, sources=[src], overwrite=overwrite) as tmp:
        for sp in SPLITS:
            root = tmp / sp
            (root / "images").mkdir(parents=True)
            (root / "labels").mkdir()
            for name in (LABEL_NAMES, CLASS_INDEX_JSON):
                if (src / name).is_file():
                    copy_file(src / name, root / name)
            if names is not None:
                write_label_names(root, names)
            rows = []
            for name in progress(plan["files"][sp], desc=f"split {sp}", enabled=show_progress):
                s = by_file[name]
                copy_file(s.image, root / "images" / s.image.name)
                copy_file(s.label, root / "labels" / s.label.name)
                ignore = ignore_dir / s.label.name
                if ignore.is_file():
                    copy_file(ignore, root / IGNORE_DIR / s.label.name)
                row = dict(s.extra)
                if multi:
                    row[GROUP_COLUMN] = groups[name]
                rows.append(row)
            write_classes_csv(root, rows)
        meta = {"source": str(src), **plan}
        (tmp / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
