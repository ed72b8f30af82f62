"""Shared helpers for the dataset converters.

The project's dataset layout (every converter writes exactly this)::

    ROOT/images/<stem>.<png|jpg|bmp>   RGB or grayscale image
    ROOT/labels/<stem>.png             uint8 single-channel mask, same H x W as the image
                                       (0 = background; 255 for binary sets, 1..K for multi-class)
    ROOT/classes.csv                   columns file,class[,surface,...]; defect-free images: "free"

File names start with their class (``scratch_000012.png``) so the class can be recovered from
the prefix when ``classes.csv`` is absent (:func:`class_from_filename`).
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FREE_CLASS = "free"
CLASSES_CSV = "classes.csv"


class DataPrepError(ValueError):
    """Bad input or a refused operation; the message names the file and the problem."""


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
@contextlib.contextmanager
def _strict_loading() -> Iterator[None]:
    """Make sure a truncated file raises, whatever another module set globally."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def read_image(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """Open and fully decode an image; raise :class:`DataPrepError` naming the file if it is
    missing, unreadable or truncated. ``mode`` converts after decoding (e.g. "RGB", "L")."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"{path}: file not found")
    try:
        with _strict_loading(), Image.open(path) as im:
            im.load()
            out = im.convert(mode) if mode is not None and im.mode != mode else im.copy()
    except _READ_ERRORS as e:
        raise DataPrepError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from None
    return out


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) read from the header only; raises :class:`DataPrepError` when unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataPrepError(f"{path}: file not found") from None
    except _READ_ERRORS as e:
        raise DataPrepError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def read_mask(path: str | os.PathLike, threshold: int | None = None) -> np.ndarray:
    """Read a mask as a uint8 (H, W) array. Colour masks are converted to luminance.
    With ``threshold``, return a binary 0/255 mask of ``value >= threshold``."""
    im = read_image(path)
    if im.mode not in ("L", "P", "I", "I;16"):
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
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


def read_classes_csv(root: str | os.PathLike) -> list[dict] | None:
    """Rows of ``ROOT/classes.csv`` as dicts (None when the file is absent)."""
    path = Path(root) / CLASSES_CSV
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "file" not in reader.fieldnames or "class" not in reader.fieldnames:
            raise DataPrepError(f"{path}: needs a header with the columns 'file' and 'class'")
        rows = [dict(r) for r in reader]
    for i, r in enumerate(rows, start=2):
        if not r.get("file") or not r.get("class"):
            raise DataPrepError(f"{path}: line {i} has an empty 'file' or 'class'")
    return rows


def class_from_filename(name: str, known: Iterable[str] = ()) -> str:
    """Recover the class from a file name's prefix.

    With ``known`` class names, the longest one that prefixes ``<class>_`` wins. Otherwise the
    leading run of purely alphabetic ``_``-separated tokens is taken (``mouse_bite_000518`` ->
    ``mouse_bite``; ``crack_exp1_num_3191`` -> ``crack``)."""
    stem = Path(name).stem
    best = ""
    for cls in known:
        if (stem == cls or stem.startswith(cls + "_")) and len(cls) > len(best):
            best = cls
    if best:
        return best
    tokens = stem.split("_")
    taken = []
    for tok in tokens:
        if tok.isalpha():
            taken.append(tok)
        else:
            break
    if not taken or len(taken) == len(tokens) and len(tokens) > 1:
        # no alphabetic prefix, or nothing after it: fall back to "everything before the last _"
        return stem.rsplit("_", 1)[0] if "_" in stem else stem
    return "_".join(taken)


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

    def catch(self, error: DataPrepError) -> None:
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


def scan_dataset(root: str | os.PathLike, skip_bad: bool = False, verify: bool = True,
                 problems: Problems | None = None) -> list[Sample]:
    """List a dataset ROOT (images/, labels/, optional classes.csv) and check it.

    Errors (or, with ``skip_bad``, skipped files listed in one warning): an empty or missing
    images/ folder, an image without a label, a label without an image, two images with the
    same stem, a file listed in classes.csv that does not exist, and, with ``verify``, an
    unreadable or truncated image or label and a label whose size differs from its image."""
    root = Path(root)
    own_problems = problems is None
    problems = problems or Problems(skip_bad)
    img_dir, lbl_dir = root / "images", root / "labels"
    if not root.is_dir():
        raise DataPrepError(f"{root}: source folder not found")
    if not img_dir.is_dir():
        raise DataPrepError(f"{root}: no images/ folder (expected ROOT/images and ROOT/labels)")
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.stem in images:
            problems.report(p, f"two images share the stem {p.stem!r} ({images[p.stem].name})")
            continue
        images[p.stem] = p
    if not images:
        raise DataPrepError(f"{img_dir}: empty source folder (no images)")
    labels = {p.stem: p for p in sorted(lbl_dir.glob("*.png"))} if lbl_dir.is_dir() else {}

    rows = read_classes_csv(root)
    by_file: dict[str, dict] = {}
    if rows is not None:
        names = {p.name for p in images.values()}
        for r in rows:
            if r["file"] not in names:
                problems.report(root / CLASSES_CSV, f"lists {r['file']!r}, which is not in images/")
                continue
            by_file[r["file"]] = r
    known = {r["class"] for r in by_file.values()}

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
            except DataPrepError as e:
                problems.catch(e)
                continue
            if im.size != lb.size:
                problems.report(lbl, f"label size {lb.size[0]}x{lb.size[1]} differs from its image "
                                     f"{img.name} ({im.size[0]}x{im.size[1]})")
                continue
        row = by_file.get(img.name)
        cls = row["class"] if row else class_from_filename(img.name, known)
        samples.append(Sample(stem, img, lbl, cls, dict(row) if row else {"file": img.name, "class": cls}))
    for stem, lbl in labels.items():
        if stem not in images:
            problems.report(lbl, "label without an image")
    if own_problems:
        problems.warn()
    if not samples:
        raise DataPrepError(f"{root}: no usable image/label pairs")
    return samples


# --------------------------------------------------------------------------------------------
# the output-folder guard
# --------------------------------------------------------------------------------------------
def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def check_not_inside(out: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> None:
    """Refuse an output path inside (or equal to, or containing) a source folder."""
    out_r = Path(out).resolve()
    for src in sources:
        src_r = Path(src).resolve()
        if _is_within(out_r, src_r):
            raise DataPrepError(f"{out}: output is inside the source folder {src}; "
                                f"nothing may be written into a source")
        if _is_within(src_r, out_r):
            raise DataPrepError(f"{out}: output folder contains the source folder {src}; refusing")


def check_output(out: str | os.PathLike, sources: Sequence[str | os.PathLike] = (),
                 overwrite: bool = False) -> None:
    """The output-folder guard: refuse ``out`` inside (or containing) a source, a file in
    its place, or an existing non-empty folder without ``overwrite``. Cheap: converters call
    it before reading their source, :func:`output_dir` calls it again."""
    out = Path(out)
    check_not_inside(out, sources)
    if out.exists():
        if not out.is_dir():
            raise DataPrepError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise DataPrepError(f"{out}: output folder exists and is not empty (use --overwrite)")


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, sources: Sequence[str | os.PathLike] = (),
               overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``out``; on success it replaces ``out``.

    Refuses when ``out`` is inside a source (or contains one), and when ``out`` exists and is
    not empty unless ``overwrite``. The swap happens only after the body finished, so a crash
    never leaves a half-written dataset at ``out`` (the previous content stays)."""
    out = Path(out)
    check_output(out, sources, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
