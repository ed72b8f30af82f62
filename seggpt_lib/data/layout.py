"""The dataset layout: the one place that says what a dataset folder holds and how to read it.

Layout (what the ``data_prep`` converters write, what training, evaluation, mappings and
inference read)::

    ROOT/images/<stem>.<png|jpg|jpeg|bmp|tif|tiff>   RGB or grayscale image (read as RGB)
    ROOT/labels/<stem>.png                  uint8 mask, same H x W; 0 = background, non-zero = defect
                                            (255 in binary sets, class indices 1..K in multi-class sets)
    ROOT/classes.csv                        columns file,class[,surface,group,...]; defect-free images: "free"
    ROOT/labels.txt                         optional: the class of each label value (class-index masks)
    ROOT/labels_ignore/<stem>.png           optional: non-zero = "ignore" pixels (COCO crowd regions): weight 0
                                            in training, counted in no IoU

(the images may also lie directly in ``ROOT`` when there is no ``images`` folder).

How a label (or a prompt mask) file is read, the one rule of :func:`read_label` (training,
evaluation, ``seggpt prepare`` and, via :func:`seggpt_lib.predict.predictor.load_mask_file`,
inference prompts): a single-channel 8-bit file (``L``, ``P``: palette indices) as stored; a
1-bit file as 0/255; a 16-bit or 32-bit file as stored when its values are whole numbers in
0..255 (class indices preserved), as 0/255 when it holds one non-zero value (a binary mask such
as 0/65535), else :class:`DatasetError` (values that cannot be class indices are never clipped);
a colour file (RGB, RGBA, ...; alpha ignored) whose channels agree everywhere (grey saved as
colour) as that grey value, and a true colour label as binary: **every non-black pixel is
defect** (255), black is background. Non-zero is defect everywhere; a prompt mask must then be
binary (0 and one defect value).

``classes.csv`` is read as UTF-8 with or without a byte-order mark (a spreadsheet's "CSV UTF-8");
two rows giving one file different classes are an error (identical repeated rows are allowed).

An image's class: its ``classes.csv`` row (matched by file name, then by stem), else
:func:`class_from_filename`. An image whose mask is empty is *defect-free* (``is_free``),
whatever its class: such images are never positives, only queries of "free" pairs.

**Class-index masks.** A dataset whose ``ROOT/labels.txt`` (or ``ROOT/class_index.json``)
names its label values holds *class-index masks*: value ``k`` (1..K) is the defect class
named on line ``k`` of ``labels.txt`` (one name per line; blank lines and ``#`` comments
skipped; a first line ``background``/``_background_`` names value 0 and is skipped, and a
labelme-style ``__ignore__`` line is skipped too), or the name whose value is ``k`` in
``class_index.json`` (``{"background": 0, "crack": 1, ...}``). Such an image holds every class
whose value it contains: one image with a crack and a scratch is *one* image, a member of both
classes (:attr:`DefectIndex.members`), never copied per class; its ``class`` (for tables) is
the class covering most of its pixels, and the ``class`` column of ``classes.csv`` is not
needed (a row saying ``free`` must still have an empty mask). A value that ``labels.txt`` does
not name is an error naming the file. Without either file every non-zero value is the one
defect of the image's class (binary sets; 255 by convention).

Every problem with a dataset's files raises :class:`DatasetError`, whose message names the
file and the problem (``data_prep``'s ``DataPrepError`` is a subclass).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageFile

__all__ = [
    "CLASSES_CSV",
    "CLASS_INDEX_JSON",
    "IGNORE_DIR",
    "LABEL_NAMES",
    "FREE_CLASS",
    "IMAGE_EXTS",
    "DatasetError",
    "DatasetWarning",
    "DefectIndex",
    "Record",
    "class_from_filename",
    "class_lookup",
    "class_of",
    "decoded_size",
    "header_size",
    "image_dir",
    "images_by_stem",
    "open_image",
    "read_class_names",
    "read_classes_csv",
    "read_label",
    "read_manifest",
    "read_rgb",
    "resize_image",
    "resize_pair",
]

FREE_CLASS = "free"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CLASSES_CSV = "classes.csv"
LABEL_NAMES = "labels.txt"  # class-index masks: line k names label value k
IGNORE_DIR = "labels_ignore"  # optional ROOT/labels_ignore/<stem>.png: non-zero = ignore (crowd regions)
CLASS_INDEX_JSON = "class_index.json"  # the same as {"name": value} (`seggpt prepare coco` writes both for a multi-class export)
_BACKGROUND_NAMES = ("background", "_background_", "__background__")
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the problem."""


class DatasetWarning(UserWarning):
    """Files were skipped (``skip_bad=True``); the message lists every one."""


def default_workers() -> int:
    """Threads for reading a dataset's files: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


# ==========================================================================================
# class names
# ==========================================================================================
def class_from_filename(name: str, known: Iterable[str] = ()) -> str:
    """The class encoded in a file name (used when ``classes.csv`` does not list the file).

    The project's converters name files ``<class>_<source id>``: ``scratch_000012.png``
    (synthetic), ``crack_exp1_num_3191.jpg`` (magnetic tile: class + the source's own stem),
    ``<class>_<stem>`` / ``free_<stem>`` (COCO). The rule:

    1. with ``known`` class names, the longest one that is the stem or prefixes ``<class>_``
       wins (``Cable_thunderbolt_x`` with ``{"Cable", "Cable_thunderbolt"}`` -> ``Cable_thunderbolt``);
    2. else the leading run of purely alphabetic ``_``-separated tokens
       (``mouse_bite_000518`` -> ``mouse_bite``, ``crack_exp1_num_3191`` -> ``crack``);
    3. else (no alphabetic first token, e.g. ``c0_00001`` or ``000123``, or a stem made only of
       several alphabetic tokens, ``scratch_left``) everything before the last ``_``
       (``c0``, ``scratch``); a stem without ``_`` is its own class (``front``, ``000123``).
    """
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
        if not tok.isalpha():
            break
        taken.append(tok)
    if not taken or len(taken) == len(tokens) > 1:
        return stem.rsplit("_", 1)[0] if "_" in stem else stem
    return "_".join(taken)


def class_of(file: str, classes: Mapping[str, str], known: Iterable[str] | None = None) -> str:
    """An image's class: ``classes`` (from ``classes.csv``) by file name, then by stem, else
    :func:`class_from_filename` refined by ``known`` (default: the classes ``classes`` names)."""
    c = classes.get(file) or classes.get(Path(file).stem)
    if c:
        return c
    return class_from_filename(file, set(classes.values()) if known is None else known)


SPLITS = ("train", "val", "test")  # the train/val/test partition's folder names
# what the pipeline's ``data`` key names: built-in synthetic data, a COCO export, the magnetic-tile
# photos, or a folder in this layout (split into train/val/test or not)
DATA_SOURCES = ("synthetic", "coco", "magnetic_tile", "folder")


def is_dataset_root(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dataset in this layout (an ``images/`` folder)."""
    return (Path(path) / "images").is_dir()


def is_split_root(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a train/val/test partition (``train/`` and ``test/`` datasets; ``val/`` optional)."""
    return is_dataset_root(Path(path) / "train") and is_dataset_root(Path(path) / "test")


def image_dir(root: str | os.PathLike) -> Path:
    """The folder holding a dataset's images: ``root/images`` if present, else ``root``."""
    root = Path(root)
    sub = root / "images"
    return sub if sub.is_dir() else root


# ==========================================================================================
# reading files
# ==========================================================================================
_STRICT_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_loading() -> Iterator[None]:
    """A truncated file raises, whatever another module set in PIL's ``LOAD_TRUNCATED_IMAGES``."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _STRICT_LOCK:  # the flag is global: one reader at a time while it is switched off
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


@contextlib.contextmanager
def _reading(path: Path, problem: str = "unreadable or truncated image") -> Iterator[None]:
    """Turn PIL's errors into :class:`DatasetError` naming ``path``."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: {problem} ({type(e).__name__}: {e})") from None


def open_image(path: str | os.PathLike, mode: str | None = None) -> Image.Image:
    """Fully decode ``path`` (truncation raises), turn it upright by its EXIF Orientation tag
    (PIL's ``ImageOps.exif_transpose``: a phone photo tagged "rotate 90" comes back rotated, with
    width and height swapped; the tag is dropped) and convert it to ``mode`` (None: as stored);
    :class:`DatasetError` naming the file when it is missing, unreadable or truncated. Every
    image and label reader goes through here, so they all see the same upright pixels."""
    from PIL import ImageOps

    path = Path(path)
    with _reading(path), _strict_loading(), Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)  # a new image (a plain copy when there is no tag)
        return im.convert(mode) if mode is not None and im.mode != mode else im


def decoded_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the upright picture after a full decode (so a truncated file
    raises); the EXIF rule of :func:`header_size`."""
    path = Path(path)
    with _reading(path), _strict_loading(), Image.open(path) as im:
        im.load()
        w, h = im.size
        try:
            turned = im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED
        except Exception:
            turned = False
        return (h, w) if turned else (w, h)


_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the upright picture from the header only (no decoding): width and
    height swapped when the EXIF Orientation tag turns it by 90 degrees, as :func:`open_image` does."""
    path = Path(path)
    with _reading(path, "unreadable image"), Image.open(path) as im:
        w, h = im.size
        try:
            turned = im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED
        except Exception:  # a broken EXIF block: open_image's exif_transpose ignores it too
            turned = False
        return (h, w) if turned else (w, h)


def _wide_mask(a: np.ndarray, path: Path | str) -> np.ndarray:
    """A 16/32-bit (or float) label as uint8: values kept when they are whole numbers in 0..255,
    0/255 when there is one non-zero value, else :class:`DatasetError` (see the module docstring)."""
    if a.size == 0:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DatasetError(f"{path}: label contains NaN or infinite values")
    lo = a.min()
    if lo < 0:
        raise DatasetError(f"{path}: label has negative values (min {lo}); labels are 0 = background, "
                           "non-zero = defect")
    whole = not np.issubdtype(a.dtype, np.floating) or bool(np.all(a == np.round(a)))
    if whole and a.max() <= 255:
        return a.astype(np.uint8)
    nz = np.unique(a[a != 0])
    if nz.size == 1:  # a binary mask stored wide (0/65535, 0/1000, 0/0.5)
        return np.where(a != 0, 255, 0).astype(np.uint8)
    shown = ", ".join(str(v) for v in nz[:6]) + (" ..." if nz.size > 6 else "")
    raise DatasetError(f"{path}: {a.dtype} label values {{{shown}}} are neither class indices 0..255 nor a binary "
                       "mask (0 and one defect value)")


def _mask_array(im: Image.Image, path: Path | str = "label") -> np.ndarray:
    """A label image as a uint8 ``(H, W)`` array by the module docstring's rule (palette images
    keep their indices; a colour label is binary: non-black = 255)."""
    if im.mode in ("L", "P"):
        arr = np.asarray(im)
    elif im.mode.startswith("I") or im.mode == "F":
        arr = _wide_mask(np.asarray(im), path)
    elif im.mode == "1":
        arr = np.asarray(im).astype(np.uint8) * 255
    elif im.mode in ("LA", "La"):
        arr = np.asarray(im.getchannel("L"))
    else:  # RGB(A), PA, CMYK, ...: grey saved as colour keeps its value; a colour label is non-black = defect
        rgb = np.asarray(im.convert("RGB"))
        r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
        if np.array_equal(r, g) and np.array_equal(r, b):
            arr = r
        else:
            arr = np.where(rgb.any(axis=2), 255, 0).astype(np.uint8)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8 RGB; :class:`DatasetError` naming the file on failure."""
    return np.asarray(open_image(path, "RGB"))


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label as ``(H, W)`` uint8 by the module docstring's rule (non-zero = defect; a colour
    label: non-black = defect); :class:`DatasetError` naming the file on failure."""
    im = open_image(path)
    with _reading(Path(path), "unreadable label"):
        return _mask_array(im, path)


def read_classes_csv(root: str | os.PathLike) -> list[dict[str, str]] | None:
    """The rows of ``ROOT/classes.csv`` as dicts of all its columns, keys and values stripped
    (None when the file is absent). UTF-8 with or without a byte-order mark. A missing ``file``
    or ``class`` column, an empty ``file`` or ``class``, two rows giving one file different
    classes, or an unreadable file raise :class:`DatasetError` naming the file (a repeated
    identical row is kept once)."""
    path = Path(root) / CLASSES_CSV
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip() for c in (reader.fieldnames or [])]
            if "file" not in fields or "class" not in fields:
                raise DatasetError(f"{path}: needs the columns 'file,class[,surface]', found {fields}")
            rows = []
            seen: dict[str, tuple[int, str]] = {}  # file -> (line, class)
            for row in reader:
                line = reader.line_num
                row = {(k or "").strip(): (v if isinstance(v, str) else "").strip()
                       for k, v in row.items() if k is not None}
                if not row.get("file") or not row.get("class"):
                    raise DatasetError(f"{path}: line {line} has an empty 'file' or 'class'")
                first = seen.get(row["file"])
                if first is not None:
                    if first[1] != row["class"]:
                        raise DatasetError(f"{path}: {row['file']!r} is given two classes: {first[1]!r} (line "
                                           f"{first[0]}) and {row['class']!r} (line {line})")
                    continue  # the same row again
                seen[row["file"]] = (line, row["class"])
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return rows


def read_class_names(root: str | os.PathLike) -> dict[int, str] | None:
    """``{label value: class name}`` of a dataset with class-index masks (module docstring):
    from ``ROOT/labels.txt``, else ``ROOT/class_index.json``; None when it has neither.
    :class:`DatasetError` naming the file for a name given twice, the name ``free``, a value
    outside 1..255, or an unreadable file."""
    root = Path(root)
    txt, js = root / LABEL_NAMES, root / CLASS_INDEX_JSON
    names: dict[int, str] = {}
    if txt.is_file():
        path = txt
        try:
            lines = [ln.strip() for ln in txt.read_text(encoding="utf-8-sig").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"{txt}: unreadable ({type(e).__name__}: {e})") from None
        lines = [ln for ln in lines if ln and not ln.startswith("#") and ln != "__ignore__"]
        if lines and lines[0].lower() in _BACKGROUND_NAMES:
            lines = lines[1:]
        names = {k: name for k, name in enumerate(lines, start=1)}
    elif js.is_file():
        path = js
        try:
            table = json.loads(js.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{js}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(table, dict):
            raise DatasetError(f"{js}: expected an object {{\"class name\": label value}}, got {type(table).__name__}")
        for name, value in table.items():
            if str(name).lower() in _BACKGROUND_NAMES and value == 0:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise DatasetError(f"{js}: the value of {name!r} must be an integer 1..255, got {value!r}")
            if value in names:
                raise DatasetError(f"{js}: value {value} is given to {names[value]!r} and {name!r}")
            names[value] = str(name).strip()
    else:
        return None
    seen: dict[str, int] = {}
    for value, name in sorted(names.items()):
        if not 1 <= value <= 255:
            raise DatasetError(f"{path}: label value {value} of {name!r} is outside 1..255")
        if not name:
            raise DatasetError(f"{path}: label value {value} has an empty name")
        if name == FREE_CLASS:
            raise DatasetError(f"{path}: {FREE_CLASS!r} names defect-free images, not a defect class (value {value})")
        if name in seen:
            raise DatasetError(f"{path}: the class {name!r} is named twice (values {seen[name]} and {value})")
        seen[name] = value
    if not names:
        raise DatasetError(f"{path}: names no defect class")
    return dict(sorted(names.items()))


# ==========================================================================================
# resizing
# ==========================================================================================
def resize_image(image: np.ndarray | Image.Image, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """An ``(H, W[, 3])`` image (array or PIL) at ``size = (H, W)``: PIL bilinear (antialiased
    when shrinking), or nearest for masks. Already that size: returned as it is (as an array).
    Bool arrays become 0/255 first."""
    h, w = int(size[0]), int(size[1])
    if isinstance(image, Image.Image):
        if image.size == (w, h):
            return np.asarray(image)
        im = image
    else:
        a = np.asarray(image)
        if a.shape[:2] == (h, w):
            return a
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        im = Image.fromarray(a)
    return np.asarray(im.resize((w, h), Image.NEAREST if nearest else Image.BILINEAR))


def resize_pair(image: np.ndarray | Image.Image, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask at ``size = (H, W)``: the image bilinear, the mask nearest (the
    training cache, prompt tuning and the figures all resize this way)."""
    return resize_image(image, size), resize_image(mask, size, nearest=True)


# ==========================================================================================
# the index
# ==========================================================================================
class Record(NamedTuple):
    """One image of a :class:`DefectIndex` (built on demand, not stored)."""

    file: str
    stem: str
    image: Path
    label: Path
    cls: str
    is_free: bool
    height: int
    width: int


class _Listing(NamedTuple):
    """A dataset folder listed (nothing decoded): see :func:`_list_dataset`."""

    image_dir: Path
    label_dir: Path
    stems: dict[str, str]  # stem -> image file name, sorted by name
    label_stems: set[str]
    classes: dict[str, str]  # classes.csv: file (or stem) -> class
    surfaces: dict[str, str]  # classes.csv: file (or stem) -> surface


def images_by_stem(folder: Path, report) -> dict[str, Path]:
    """``stem -> path`` of the images (:data:`IMAGE_EXTS`) in ``folder``, sorted by name; a
    second image with a stem already taken is left out and ``report(path, message)`` is called."""
    stems: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.stem in stems:
            report(p, f"two images share the stem {p.stem!r} ({stems[p.stem].name})")
            continue
        stems[p.stem] = p
    return stems


def _list_dataset(root: Path, report, strict: bool = True) -> _Listing:
    """The images, labels and ``classes.csv`` of ``root``; ``report(message)`` gets every
    problem found without decoding (two images sharing a stem and, with ``strict``, a label
    without an image and a ``classes.csv`` row naming a missing image). A missing or empty
    folder raises."""
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    images = image_dir(root)
    label_dir = root / "labels"
    stems = {stem: p.name for stem, p in images_by_stem(images, lambda p, msg: report(f"{p}: {msg}")).items()}
    if not stems:
        raise DatasetError(f"{images}: empty dataset folder (no {'/'.join(IMAGE_EXTS)} images)")
    label_stems = {p.stem for p in label_dir.glob("*.png")} if label_dir.is_dir() else set()
    if strict:
        for stem in sorted(label_stems - set(stems)):
            report(f"{label_dir / (stem + '.png')}: label without an image")
    classes: dict[str, str] = {}
    surfaces: dict[str, str] = {}
    present = set(stems.values()) | set(stems)
    for row in read_classes_csv(root) or []:
        if strict and row["file"] not in present:
            report(f"{root / CLASSES_CSV}: names {row['file']!r}, which is not in {images}")
            continue
        classes[row["file"]] = row["class"]
        if row.get("surface"):
            surfaces[row["file"]] = row["surface"]
    return _Listing(images, label_dir, stems, label_stems, classes, surfaces)


class DefectIndex:
    """The images of a dataset, stored column-wise in O(n) memory.

    Columns: ``files`` (list of image file names), ``class_ids`` (int32 into
    ``class_names``), ``is_free`` (bool: empty mask), ``heights``/``widths`` (int32),
    ``label_max`` (uint8: the largest label value, for multi-class checks) and optional
    ``surfaces``; the memberships ``member_img``/``member_cls`` (int64, sorted by class then
    image: every defect class each image holds, one per defect image in binary sets, several
    with class-index masks; :attr:`members` per image) and ``class_values`` (uint8 per class:
    its label value with class-index masks, 0 = every non-zero value otherwise; ``multiclass``
    says which). Paths are derived: ``image_dir / file`` and ``label_dir / (stem + ".png")``.

    Build one with :meth:`scan` (reads and checks a folder) or directly from lists (tests,
    synthetic indexes: no file is touched).
    """

    def __init__(
        self,
        files: Sequence[str],
        classes: Sequence[str],
        is_free: Sequence[bool] | np.ndarray,
        heights: Sequence[int] | np.ndarray | None = None,
        widths: Sequence[int] | np.ndarray | None = None,
        root: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        label_dir: str | os.PathLike | None = None,
        label_max: Sequence[int] | np.ndarray | None = None,
        surfaces: Sequence[str] | None = None,
        members: Sequence[Sequence[str]] | None = None,
        class_values: Mapping[str, int] | None = None,
    ) -> None:
        n = len(files)
        if len(classes) != n or len(is_free) != n:
            raise ValueError(f"files ({n}), classes ({len(classes)}) and is_free ({len(is_free)}) differ in length")
        if members is not None and len(members) != n:
            raise ValueError(f"members ({len(members)}) and files ({n}) differ in length")
        self.root = Path(root) if root is not None else None
        base = self.root if self.root is not None else Path(".")
        self.image_dir = Path(image_dir) if image_dir is not None else base / "images"
        self.label_dir = Path(label_dir) if label_dir is not None else base / "labels"
        self.files: list[str] = [str(f) for f in files]
        classes = [str(c) for c in classes]
        self.is_free = np.asarray(is_free, dtype=bool).reshape(n)
        if members is None:  # one class per defect image: its own
            members = [[] if f else [c] for c, f in zip(classes, self.is_free)]
        members = [sorted({str(m) for m in ms}) for ms in members]
        self.class_names: list[str] = sorted(set(classes).union(*members)) if n else []
        code = {c: k for k, c in enumerate(self.class_names)}
        self.class_ids = np.asarray([code[c] for c in classes], dtype=np.int32).reshape(n)
        pairs = sorted((code[m], i) for i, ms in enumerate(members) for m in ms)
        # memberships (image, class), sorted by class then image: every class an image holds
        self.member_cls = np.asarray([c for c, _ in pairs], dtype=np.int64)
        self.member_img = np.asarray([i for _, i in pairs], dtype=np.int64)
        if class_values is not None:
            missing = sorted(set(self.class_names) - set(class_values) - {FREE_CLASS})
            if missing:
                raise ValueError(f"class_values lacks the classes {missing}")
        # label value of each class (class-index masks); 0: every non-zero value (binary sets)
        self.class_values = np.asarray([int((class_values or {}).get(c, 0)) for c in self.class_names], dtype=np.uint8)
        self.multiclass = class_values is not None
        self.heights = np.asarray(heights if heights is not None else np.zeros(n), dtype=np.int32).reshape(n)
        self.widths = np.asarray(widths if widths is not None else np.zeros(n), dtype=np.int32).reshape(n)
        if label_max is None:  # unknown: at least 1 on defect images
            label_max = np.where(self.is_free, 0, 1)
        self.label_max = np.asarray(label_max, dtype=np.uint8).reshape(n)
        self.surfaces: list[str] | None = list(surfaces) if surfaces is not None else None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def scan(
        cls,
        root: str | os.PathLike,
        skip_bad: bool = False,
        verify: bool = True,
        workers: int | None = None,
    ) -> "DefectIndex":
        """Read and check a dataset folder.

        Every label is decoded (to record ``is_free``); with ``verify`` every image is fully
        decoded too, so a truncated file is found here rather than mid-training. Problems
        raise :class:`DatasetError` naming the file: an empty or missing folder, an image
        without a label, a label without an image, two images sharing a stem, a label whose
        size differs from its image, an unreadable or truncated file, a ``classes.csv`` row
        naming a missing file, and a "free" image whose mask is not empty. With
        ``skip_bad=True`` the bad files are left out and listed in one :class:`DatasetWarning`
        (an empty folder, or nothing usable left, still raises).
        """
        root = Path(root)
        problems: list[str] = []

        def report(msg: str) -> None:
            if not skip_bad:
                raise DatasetError(msg)
            problems.append(msg)

        ls = _list_dataset(root, report)
        image_dir, label_dir, stems, label_stems = ls.image_dir, ls.label_dir, ls.stems, ls.label_stems
        value_names = read_class_names(root)  # None: binary masks, class from classes.csv / the name

        files: list[str] = []
        for stem, name in stems.items():
            if stem not in label_stems:
                report(f"{image_dir / name}: image without a label (expected {label_dir / (stem + '.png')})")
                continue
            files.append(name)

        def check(name: str):
            img_path = image_dir / name
            lbl_path = label_dir / (Path(name).stem + ".png")
            try:
                size = decoded_size(img_path) if verify else header_size(img_path)
                mask = read_label(lbl_path)
            except DatasetError as e:
                return str(e)
            if (mask.shape[1], mask.shape[0]) != size:
                return (f"{lbl_path}: label size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{name} ({size[0]}x{size[1]})")
            found: list[str] = []
            if value_names is not None:
                counts = np.bincount(mask.ravel(), minlength=256)
                values = np.flatnonzero(counts[1:]) + 1
                unknown = [int(v) for v in values if int(v) not in value_names]
                if unknown:
                    return (f"{lbl_path}: label values {unknown} are not named in "
                            f"{root / LABEL_NAMES} (it names {min(value_names)}..{max(value_names)})")
                # largest area first: the image's class for tables
                found = [value_names[int(v)] for v in sorted(values, key=lambda v: (-counts[v], v))]
            return size[1], size[0], bool(mask.any()), int(mask.max()) if mask.size else 0, found

        with ThreadPoolExecutor(workers or default_workers()) as pool:
            results = list(pool.map(check, files))

        keep, classes, free, hs, ws, mx, surf, members = [], [], [], [], [], [], [], []
        for name, res in zip(files, results):
            if isinstance(res, str):
                report(res)
                continue
            h, w, has_defect, lmax, found = res
            c = class_of(name, ls.classes)
            if value_names is not None and c != FREE_CLASS:
                c = found[0] if found else FREE_CLASS
            if c == FREE_CLASS and has_defect:
                report(f"{label_dir / (Path(name).stem + '.png')}: image {name} has class {FREE_CLASS!r} "
                       f"but its mask is not empty")
                continue
            keep.append(name)
            classes.append(c)
            free.append(not has_defect)
            hs.append(h)
            ws.append(w)
            mx.append(lmax)
            surf.append(ls.surfaces.get(name, ls.surfaces.get(Path(name).stem, "")))
            members.append(found if value_names is not None else ([] if not has_defect else [c]))
        if problems:
            listing = "\n  ".join(problems)
            warnings.warn(f"{root}: skipped {len(problems)} bad file(s):\n  {listing}", DatasetWarning, stacklevel=2)
        if not keep:
            raise DatasetError(f"{root}: no usable image/label pairs")
        return cls(keep, classes, free, hs, ws, root=root, image_dir=image_dir, label_dir=label_dir,
                   label_max=mx, surfaces=surf if ls.surfaces else None, members=members,
                   class_values=None if value_names is None else {n: v for v, n in value_names.items()})

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"DefectIndex({len(self)} images, {int(self.is_free.sum())} defect-free, "
                f"classes={self.class_names}, root={str(self.root) if self.root else None!r})")

    def stem(self, i: int) -> str:
        return Path(self.files[i]).stem

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.files[i]

    def label_path(self, i: int) -> Path:
        return self.label_dir / (self.stem(i) + ".png")

    @property
    def ignore_dir(self) -> Path:
        """``labels_ignore/`` beside the label folder (see the module docstring)."""
        return self.label_dir.parent / IGNORE_DIR

    def ignore_path(self, i: int) -> Path | None:
        """Image ``i``'s ignore mask, or None when it has none."""
        p = self.ignore_dir / (self.stem(i) + ".png")
        return p if p.is_file() else None

    def class_of(self, i: int) -> str:
        """The image's class (with class-index masks: the one covering most of its pixels)."""
        return self.class_names[self.class_ids[i]]

    @property
    def members(self) -> list[list[str]]:
        """Per image, the defect classes it holds (sorted; empty for defect-free images)."""
        out: list[list[str]] = [[] for _ in range(len(self))]
        for c, i in zip(self.member_cls.tolist(), self.member_img.tolist()):
            out[i].append(self.class_names[c])
        return [sorted(m) for m in out]

    def classes_in(self, i: int) -> list[str]:
        """The defect classes image ``i`` holds (several with class-index masks)."""
        return sorted(self.class_names[c] for c in self.member_cls[self.member_img == int(i)])

    def label_value(self, cls: str | int) -> int:
        """The label value of a class (a name or class id): its class index with class-index
        masks, 0 (meaning every non-zero value) in binary sets."""
        k = self.class_names.index(cls) if isinstance(cls, str) else int(cls)
        return int(self.class_values[k])

    def record(self, i: int) -> Record:
        i = int(i)
        return Record(self.files[i], self.stem(i), self.image_path(i), self.label_path(i), self.class_of(i),
                      bool(self.is_free[i]), int(self.heights[i]), int(self.widths[i]))

    def find(self, file: str) -> int:
        """Position of an image by file name or stem (``KeyError`` if absent)."""
        lookup = getattr(self, "_lookup", None)
        if lookup is None:
            lookup = {}
            for i, f in enumerate(self.files):
                lookup[f] = i
                lookup.setdefault(Path(f).stem, i)
            self._lookup = lookup
        return lookup[file]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "DefectIndex":
        """A new index with the given rows (positions or a boolean mask), same folders."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        members = self.members
        return DefectIndex(
            [self.files[i] for i in idx], [self.class_names[c] for c in self.class_ids[idx]], self.is_free[idx],
            self.heights[idx], self.widths[idx], root=self.root, image_dir=self.image_dir,
            label_dir=self.label_dir, label_max=self.label_max[idx],
            surfaces=[self.surfaces[i] for i in idx] if self.surfaces is not None else None,
            members=[members[i] for i in idx],
            class_values=self._value_table() if self.multiclass else None,
        )

    def _value_table(self) -> dict[str, int]:
        return {c: int(v) for c, v in zip(self.class_names, self.class_values) if v}

    def to_frame(self):
        """The index as a pandas DataFrame (see :func:`read_manifest`)."""

        data = {
            "file": self.files,
            "class": [self.class_names[c] for c in self.class_ids],
            "is_free": self.is_free.copy(),
            "image": [str(self.image_dir / f) for f in self.files],
            "label": [str(self.label_path(i)) for i in range(len(self))],
            "height": self.heights.copy(),
            "width": self.widths.copy(),
        }
        if self.surfaces is not None:
            data["surface"] = list(self.surfaces)
        if self.multiclass:
            data["classes"] = [";".join(m) for m in self.members]
        return pd.DataFrame(data)

    def fingerprint(self, extra: Any = None, stat: bool = True) -> str:
        """A hash of the records (and, with ``stat``, the files' sizes and mtimes)."""
        h = hashlib.sha1()
        h.update(json.dumps([str(self.image_dir), str(self.label_dir), extra]).encode())
        for i, f in enumerate(self.files):
            h.update(f.encode() + b"\0")
            if stat:
                for p in (self.image_path(i), self.label_path(i)):
                    try:
                        st = p.stat()
                        h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
                    except OSError:
                        h.update(b"missing;")
        h.update(self.heights.tobytes() + self.widths.tobytes() + self.is_free.tobytes())
        if self.multiclass:
            h.update(self.member_img.tobytes() + self.member_cls.tobytes() + self.class_values.tobytes())
        return h.hexdigest()[:20]


def read_manifest(root: str | os.PathLike, skip_bad: bool = False, verify: bool = True, labels: bool = True):
    """A dataset as a DataFrame, one row per image sorted by file name.

    ``labels=True`` (default): the checked index (:meth:`DefectIndex.scan`, every image needs
    its label), columns ``file, class, is_free, image, label, height, width`` (plus
    ``surface`` when ``classes.csv`` has it); ``is_free`` means an empty mask.

    ``labels=False``: a listing that decodes nothing (prompt mappings, class look-ups):
    columns ``file, class, is_free, image, label`` (plus ``surface``), where ``label`` is None
    for an image without ``labels/<stem>.png`` and ``is_free`` means the class ``free``.
    Two images sharing a stem and a bad ``classes.csv`` still raise :class:`DatasetError`
    (a row naming an absent image is ignored).

    ``image``/``label`` are paths as strings.
    """
    if labels:
        return DefectIndex.scan(root, skip_bad=skip_bad, verify=verify).to_frame()

    def report(msg: str) -> None:
        raise DatasetError(msg)

    ls = _list_dataset(Path(root), report, strict=False)
    files = list(ls.stems.values())
    classes = [class_of(f, ls.classes) for f in files]
    data = {
        "file": files,
        "class": classes,
        "is_free": np.array([c == FREE_CLASS for c in classes], dtype=bool),
        "image": [str(ls.image_dir / f) for f in files],
        "label": pd.Series([str(ls.label_dir / f"{s}.png") if s in ls.label_stems else None for s in ls.stems],
                           dtype=object),  # keep None, not NaN
    }
    if ls.surfaces:
        data["surface"] = [ls.surfaces.get(f, ls.surfaces.get(Path(f).stem, "")) for f in files]
    return pd.DataFrame(data)


def class_lookup(*roots: str | os.PathLike | None):
    """``file name -> class`` over the datasets ``roots`` (the first that lists the file wins:
    its ``classes.csv`` or the name rule); a file of none of them by :func:`class_of`. A root
    that is missing or unreadable is left out."""
    table: dict[str, str] = {}
    for root in roots:
        if root is None or not Path(root).is_dir():
            continue
        try:
            df = read_manifest(root, labels=False)
        except (OSError, ValueError):
            continue
        for f, c in zip(df["file"], df["class"]):
            table.setdefault(f, c)

    def lookup(file: str) -> str:
        return class_of(file, table)

    return lookup
