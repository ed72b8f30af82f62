"""Shared helpers for the dataset converters.

The project's dataset layout (every converter writes exactly this)::

    ROOT/images/<stem>.<png|jpg|bmp>   RGB or grayscale image
    ROOT/labels/<stem>.png             uint8 single-channel mask, same H x W as the image
                                       (0 = background; 255 for binary sets, 1..K for multi-class)
    ROOT/classes.csv                   columns file,class[,surface,...]; defect-free images: "free"

File names start with their class (``scratch_000012.png``) so the class can be recovered from
the prefix when ``classes.csv`` is absent (:func:`class_from_filename`).

The layout's rules (extensions, ``classes.csv`` reading, the file-name class rule, the image,
mask and header readers) are the library's, :mod:`seggpt_lib.data.layout`, re-exported here;
this module adds the writing side and the converters' bookkeeping. Reading problems raise the
layout's :class:`DatasetError`; :class:`DataPrepError` (a conversion problem) is a subclass.
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from seggpt_lib.data.layout import CLASSES_CSV, FREE_CLASS, IMAGE_EXTS, DatasetError, class_from_filename, class_of
from seggpt_lib.data.layout import header_size as image_size
from seggpt_lib.data.layout import images_by_stem
from seggpt_lib.data.layout import open_image as read_image
from seggpt_lib.data.layout import _BACKGROUND_NAMES, LABEL_NAMES, read_class_names, read_classes_csv, read_label
from seggpt_lib.utils import outputs
from seggpt_lib.utils.outputs import OutputError

__all__ = [
    "CLASSES_CSV", "FREE_CLASS", "IMAGE_EXTS", "DataPrepError", "DataPrepWarning", "DatasetError",
    "FilenameClassWarning", "Problems", "check_filename_classes",
    "Sample", "check_class_names", "check_not_inside", "check_output", "class_from_filename", "copy_file",
    "image_size", "label_values", "output_dir", "output_file", "parse_class_names",
    "progress", "read_classes_csv", "read_image", "read_mask", "safe_name", "scan_dataset", "write_classes_csv",
    "write_image", "write_label", "write_label_names",
]


class DataPrepError(DatasetError):
    """Bad input or a refused operation; the message names the file and the problem.

    A :class:`~seggpt_lib.data.layout.DatasetError` (what the layout's readers raise, e.g. for
    a bad ``classes.csv`` or an unreadable image): ``except DatasetError`` catches both."""


class DataPrepWarning(UserWarning):
    """Emitted when files were skipped (``skip_bad=True``); the message lists every one."""


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------
def progress(iterable: Iterable, desc: str = "", total: int | None = None, enabled: bool | None = None):
    """Wrap ``iterable`` in a tqdm bar when stderr is a terminal (plain iterable otherwise)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


# --------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------
def read_mask(path: str | os.PathLike, threshold: int | None = None) -> np.ndarray:
    """Read a mask as a uint8 (H, W) array (:func:`seggpt_lib.data.layout.read_label`: colour
    masks become luminance). With ``threshold``, return a binary 0/255 mask of ``value >= threshold``."""
    arr = read_label(path)
    if threshold is not None:
        arr = np.where(arr >= threshold, 255, 0).astype(np.uint8)
    return arr


def write_label(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a uint8 single-channel PNG label (bool masks become 0/255)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataPrepError(f"{path}: a label must be a 2-D array, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype != np.uint8:
        if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
            raise DataPrepError(f"{path}: label values must be in 0..255")
        mask = mask.astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, mode="L").save(path, format="PNG", compress_level=6)


def write_image(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    """Write an image (uint8 array HxW or HxWx3, or a PIL image) losslessly as PNG."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=6)


def write_classes_csv(root: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write ``ROOT/classes.csv``: columns ``file,class`` first, then any extra keys in the
    order they first appear. Rows are sorted by file name."""
    root = Path(root)
    columns = ["file", "class"]
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    path = root / CLASSES_CSV
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for row in sorted(rows, key=lambda r: r["file"]):
            w.writerow({k: row.get(k, "") for k in columns})
    return path


def write_label_names(root: str | os.PathLike, names: Mapping[int, str]) -> Path:
    """Write ``ROOT/labels.txt``: line ``k`` names label value ``k`` (``names`` must be 1..K)."""
    values = sorted(names)
    if values != list(range(1, len(values) + 1)):
        raise DataPrepError(f"{Path(root) / LABEL_NAMES}: label values must be 1..{len(values)}, got {values}")
    path = Path(root) / LABEL_NAMES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{names[v]}\n" for v in values), encoding="utf-8")
    return path


def parse_class_names(names: str | Sequence[str], what: str = "--class-names") -> dict[int, str]:
    """``{k: name}`` for the names of label values 1..K (``"a,b,c"`` or a list), checked as
    ``labels.txt`` would be read back: :class:`DataPrepError` for an empty name, a name given
    twice, ``free``, a background or comment name, or more than 255 names."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [str(n).strip() for n in items]
    if not items or any(not n for n in items):
        raise DataPrepError(f"{what}: empty class name in {names!r} (give a,b,c: the names of label values 1, 2, 3)")
    for n in items:
        if n == FREE_CLASS:
            raise DataPrepError(f"{what}: {FREE_CLASS!r} names defect-free images, not a defect class")
        if n.lower() in _BACKGROUND_NAMES or n.startswith("#") or n == "__ignore__" or "\n" in n:
            raise DataPrepError(f"{what}: {n!r} cannot name a defect class (it names label value "
                                f"{items.index(n) + 1}; value 0 is the background)")
    dup = sorted({n for n in items if items.count(n) > 1})
    if dup:
        raise DataPrepError(f"{what}: the class(es) {', '.join(map(repr, dup))} are named twice")
    if len(items) > 255:
        raise DataPrepError(f"{what}: {len(items)} names do not fit uint8 label values 1..255")
    return {k: n for k, n in enumerate(items, start=1)}


def label_values(label_dir: str | os.PathLike) -> dict[int, Path]:
    """The non-zero values the masks ``label_dir/*.png`` hold: ``{value: the first file holding
    it}`` (files in name order; an unreadable file is left to the dataset scan to report)."""
    found: dict[int, Path] = {}
    for path in sorted(Path(label_dir).glob("*.png")):
        try:
            values = np.unique(read_label(path))
        except DatasetError:
            continue
        for v in values.tolist():
            if v and v not in found:
                found[int(v)] = path
    return dict(sorted(found.items()))


def check_class_names(root: str | os.PathLike, names: Mapping[int, str], what: str = "--class-names") -> None:
    """Check that ``names`` (``{k: name}``, values 1..K) name exactly the label values the masks
    ``ROOT/labels/*.png`` hold: :class:`DataPrepError` naming the values found (and a file
    holding each value ``names`` lacks) when the count does not match, or when ``ROOT`` already
    names its values differently (``labels.txt`` / ``class_index.json``)."""
    root = Path(root)
    own = read_class_names(root)
    listed = ", ".join(f"{k}={n}" for k, n in sorted(names.items()))
    if own is not None and dict(own) != dict(names):
        raise DataPrepError(f"{root}: its {LABEL_NAMES} (or class_index.json) already names the label values "
                            f"({', '.join(f'{k}={n}' for k, n in own.items())}), unlike {what} ({listed})")
    found = label_values(root / "labels")
    unknown = {v: p for v, p in found.items() if v not in names}
    missing = [v for v in names if v not in found]
    if not unknown and not missing:
        return
    values = ", ".join(map(str, found)) or "none (every mask is empty)"
    parts = [f"{root / 'labels'}: {what} gives {len(names)} name(s) ({listed}) but the masks hold the "
             f"label values {values}"]
    if unknown:
        parts.append("not named: " + ", ".join(f"{v} (e.g. {p})" for v, p in unknown.items()))
    if missing:
        parts.append("in no mask: " + ", ".join(map(str, missing)))
    hint = "give one name per label value 1..K" + ("; 255 is the defect value of binary masks, which need no "
                                                   f"{what}" if 255 in unknown else "")
    raise DataPrepError("; ".join(parts) + f" ({hint})")


def safe_name(text: str) -> str:
    """A file-name-safe version of a class or dataset name (spaces etc. become ``_``)."""
    out = "".join(c if (c.isalnum() or c in "-.") else "_" for c in text.strip())
    out = "_".join(p for p in out.split("_") if p)
    return out or "unnamed"


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


# --------------------------------------------------------------------------------------------
# bad-input bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class Problems:
    """Either raise on the first bad file, or (``skip_bad``) remember every one for a warning."""

    skip_bad: bool = False
    skipped: list[str] = field(default_factory=list)

    def report(self, path: str | os.PathLike, message: str) -> None:
        text = f"{path}: {message}"
        if not self.skip_bad:
            raise DataPrepError(text)
        self.skipped.append(text)

    def catch(self, error: DatasetError) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(str(error))

    def warn(self, what: str = "file") -> None:
        if self.skipped:
            lines = "\n  ".join(self.skipped)
            warnings.warn(f"skipped {len(self.skipped)} bad {what}(s):\n  {lines}", DataPrepWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# dataset scanning
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    stem: str
    image: Path
    label: Path
    cls: str
    extra: dict = field(default_factory=dict)  # the classes.csv row (all columns)

    @property
    def file(self) -> str:
        return self.image.name


class FilenameClassWarning(DataPrepWarning):
    """The classes come from file-name prefixes and give nearly one class per image (numbered
    files such as ``000123.jpg`` without ``classes.csv``): see :func:`check_filename_classes`."""


# the one-class-per-image check: more than FEW_CLASSES classes from file names, and more than
# SINGLETON_SHARE of them holding a single image
FEW_CLASSES = 5
SINGLETON_SHARE = 0.5


def check_filename_classes(root: str | os.PathLike, named: Mapping[str, str]) -> str | None:
    """Warn (:class:`FilenameClassWarning`) when the classes that file-name prefixes gave
    (``named``: file -> class, only the images that ``classes.csv`` does not list and whose
    masks name no class) look like one class per image: more than ``FEW_CLASSES`` (5) defect
    classes, more than ``SINGLETON_SHARE`` (half) of them with a single image. Returns the
    message (None: no warning)."""
    counts: dict[str, int] = {}
    for c in named.values():
        if c != FREE_CLASS:
            counts[c] = counts.get(c, 0) + 1
    single = sorted(c for c, n in counts.items() if n == 1)
    if len(counts) <= FEW_CLASSES or len(single) <= SINGLETON_SHARE * len(counts):
        return None
    shown = ", ".join(repr(c) for c in single[:4]) + (", ..." if len(single) > 4 else "")
    msg = (f"{root}: the file-name prefixes give {len(counts)} classes for {sum(counts.values())} images, "
           f"{len(single)} of them with a single image ({shown}): without {CLASSES_CSV} an image's class is its "
           f"file-name prefix (<class>_<id>.png), so numbered files make one class per image. Give "
           f"{CLASSES_CSV} (columns file,class) or class-index masks with labels.txt (label value k = the "
           f"class on line k)")
    warnings.warn(msg, FilenameClassWarning, stacklevel=3)
    return msg


def _mask_class(label: np.ndarray, value_names: Mapping[int, str], path: Path, named_by: str = LABEL_NAMES) -> str:
    """The class of a class-index mask: the named value covering most pixels (``free`` when empty)."""
    counts = np.bincount(np.asarray(label, np.uint8).ravel(), minlength=256)
    values = np.flatnonzero(counts[1:]) + 1
    unknown = [int(v) for v in values if int(v) not in value_names]
    if unknown:
        raise DataPrepError(f"{path}: label values {unknown} are not named in {named_by} (it names "
                            f"{min(value_names)}..{max(value_names)})")
    if not values.size:
        return FREE_CLASS
    return value_names[int(min(values, key=lambda v: (-counts[v], v)))]


def scan_dataset(root: str | os.PathLike, skip_bad: bool = False, verify: bool = True,
                 problems: Problems | None = None, class_names: Mapping[int, str] | None = None) -> list[Sample]:
    """List a dataset ROOT (images/, labels/, optional classes.csv) and check it.

    Errors (or, with ``skip_bad``, skipped files listed in one warning): an empty or missing
    images/ folder, an image without a label, a label without an image, two images with the
    same stem, a file listed in classes.csv that does not exist, and, with ``verify``, an
    unreadable or truncated image or label and a label whose size differs from its image.

    An image's class: its classes.csv row; else, with class-index masks (``labels.txt`` /
    ``class_index.json``), the named class covering most of its mask (``free`` when empty; a
    label value the file does not name is an error); else its file-name prefix
    (:func:`class_from_filename`). When file-name prefixes give nearly one class per image,
    :func:`check_filename_classes` warns. ``class_names`` (``{k: name}``, ``--class-names``)
    names the label values in place of ``labels.txt``."""
    root = Path(root)
    own_problems = problems is None
    problems = problems or Problems(skip_bad)
    img_dir, lbl_dir = root / "images", root / "labels"
    if not root.is_dir():
        raise DataPrepError(f"{root}: source folder not found")
    if not img_dir.is_dir():
        raise DataPrepError(f"{root}: no images/ folder (expected ROOT/images and ROOT/labels)")
    images = images_by_stem(img_dir, problems.report)
    if not images:
        raise DataPrepError(f"{img_dir}: empty source folder (no images)")
    labels = {p.stem: p for p in sorted(lbl_dir.glob("*.png"))} if lbl_dir.is_dir() else {}

    rows = read_classes_csv(root)
    by_file: dict[str, dict] = {}  # classes.csv rows by their "file" (a file name or a stem)
    if rows is not None:
        names = {p.name for p in images.values()} | set(images)
        for r in rows:
            if r["file"] not in names:
                problems.report(root / CLASSES_CSV, f"lists {r['file']!r}, which is not in images/")
                continue
            by_file[r["file"]] = r
    csv_classes = {f: r["class"] for f, r in by_file.items()}
    # None: binary masks, the class from classes.csv / the name
    value_names = dict(class_names) if class_names is not None else read_class_names(root)
    named_by = "--class-names" if class_names is not None else LABEL_NAMES
    named: dict[str, str] = {}  # images whose class is their file-name prefix

    samples: list[Sample] = []
    for stem, img in images.items():
        lbl = labels.get(stem)
        if lbl is None:
            problems.report(img, f"image without a label (expected {lbl_dir / (stem + '.png')})")
            continue
        if verify:
            try:
                im = read_image(img)
                lb = read_image(lbl)
            except DatasetError as e:
                problems.catch(e)
                continue
            if im.size != lb.size:
                problems.report(lbl, f"label size {lb.size[0]}x{lb.size[1]} differs from its image "
                                     f"{img.name} ({im.size[0]}x{im.size[1]})")
                continue
        row = by_file.get(img.name) or by_file.get(stem)
        cls = class_of(img.name, csv_classes)
        if row is None and value_names is not None:
            try:
                cls = _mask_class(read_label(lbl), value_names, lbl, named_by)
            except DatasetError as e:
                problems.catch(e)
                continue
        elif row is None:
            named[img.name] = cls
        samples.append(Sample(stem, img, lbl, cls, dict(row) if row else {"file": img.name, "class": cls}))
    for stem, lbl in labels.items():
        if stem not in images:
            problems.report(lbl, "label without an image")
    if own_problems:
        problems.warn()
    if not samples:
        raise DataPrepError(f"{root}: no usable image/label pairs")
    check_filename_classes(root, named)
    return samples


# --------------------------------------------------------------------------------------------
# the output-folder guard: the library's one rule (seggpt_lib.utils.outputs), raising DataPrepError
# --------------------------------------------------------------------------------------------
def _sources(sources) -> dict:
    """Converter sources as labelled inputs: a mapping as given, a sequence as ``--src``."""
    if isinstance(sources, Mapping):
        return dict(sources)
    return {f"--src{'' if i == 0 else f' #{i + 1}'}": s for i, s in enumerate(sources or ())}


@contextlib.contextmanager
def _as_data_prep_error() -> Iterator[None]:
    try:
        yield
    except OutputError as e:
        raise DataPrepError(str(e)) from None


def _is_within(path: Path, parent: Path) -> bool:
    return outputs.is_within(path, parent)


def check_not_inside(out: str | os.PathLike, sources, what: str = "--out") -> None:
    """Refuse an output path inside (or equal to, or containing) a source (symlinks resolved)."""
    with _as_data_prep_error():
        outputs.check_not_inside(out, _sources(sources), what)


def check_output(out: str | os.PathLike, sources=(), overwrite: bool = False, folder: bool = True,
                 what: str = "--out") -> None:
    """The output guard (:func:`seggpt_lib.utils.outputs.check_output`): refuse ``out`` inside
    (or equal to, or containing) a source, and an existing file or non-empty folder without
    ``overwrite``. Cheap: converters call it before reading their source, :func:`output_dir`
    calls it again."""
    with _as_data_prep_error():
        outputs.check_output(out, _sources(sources), what=what, overwrite=overwrite, folder=folder)


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, sources=(), overwrite: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success it replaces ``out``
    (:func:`seggpt_lib.utils.outputs.output_dir`): a crash never leaves a half-written dataset
    at ``out`` (the previous content stays)."""
    staged = outputs.StagedDir(out, _sources(sources), what=what, overwrite=overwrite)
    with _as_data_prep_error():
        tmp = staged.open()
    try:
        yield tmp
    except BaseException:
        staged.discard()
        raise
    staged.commit()


@contextlib.contextmanager
def output_file(out: str | os.PathLike, sources=(), overwrite: bool = False, what: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is renamed onto ``out``
    (:func:`seggpt_lib.utils.outputs.output_file`)."""
    with _as_data_prep_error():
        check_output(out, sources, overwrite, folder=False, what=what)
    with outputs.output_file(out, _sources(sources), what=what, overwrite=overwrite) as tmp:
        yield tmp
