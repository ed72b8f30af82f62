"""COCO instance segmentation (VISION Datasets, Roboflow exports) -> the project's layout.

Where the annotation files may be (``--src``; every ``_annotations.coco.json`` below it is read)::

    SRC/<Sub>/<split>/_annotations.coco.json   VISION Datasets: several sub-datasets (Cable, Capacitor, ...)
    SRC/<split>/_annotations.coco.json         one sub-dataset, or a Roboflow export (train/ valid/ test/)
    SRC/_annotations.coco.json                 one split folder

Where the images may be: an image's ``file_name`` is looked up, in this order, beside its
annotation file (``<dir>/<file_name>``, the VISION and Roboflow layout), in ``<dir>/images/``
(Roboflow's ``<split>/images/``), then in ``<dir>/../images/``; a ``file_name`` carrying folders
is also tried by its bare name in each place. Nothing is moved; a missing image is an error that
lists every place tried.

Masks are decoded by **pycocotools** (``pycocotools.mask``), pixel for pixel what COCO tools
compute: polygons (a pixel is inside when its centre is, so the square ``[0,0,10,0,10,10,0,10]``
covers 10 x 10 = 100 pixels), uncompressed RLE (``counts`` a list) and compressed RLE
(``counts`` a string). RLE is checked here first (size equal to the image, run lengths
summing to height x width), as pycocotools trusts it.

Bad annotations are handled one by one; an image keeps its other annotations:

* a **degenerate polygon** (fewer than 3 points, e.g. 4 coordinates) is skipped on its own with a
  warning naming the annotation id and the image (always, ``skip_bad`` or not);
* a **malformed** segmentation (not numbers, an odd number of coordinates, coordinates far
  outside the image, a bad RLE), an unknown category id, or **no segmentation**
  (``"segmentation": []`` or missing: a detection-only export) is an error naming the
  annotation and the image; with ``skip_bad`` that annotation alone is skipped (listed in the
  warning). ``boxes_as_masks`` (``--boxes-as-masks``, opt-in) fills the bbox of an annotation
  without a segmentation instead (pycocotools' box rule);
* an image whose annotations were all skipped is left out with a warning (it is never written
  as defect-free).

Crowd regions (``"iscrowd": 1``): by default they are not defect pixels; they go to a separate
ignore mask ``labels_ignore/<stem>.png`` (255 = crowd region, 0 elsewhere; written only for
outputs that have crowd pixels; the label stays 0 there). Training gives those pixels weight 0
and evaluation counts them in no IoU (:mod:`seggpt_lib.data.layout`). An image with only crowd annotations is left out
with a warning. ``crowd_as_defect`` (``--crowd-as-defect``) counts crowd regions as defect pixels
of their category instead (no ignore mask).

Splits: with ``keep_splits`` the export's own split is kept: annotation files in folders named
``train``, ``valid``/``val``/``validation`` and ``test`` go to ``OUT/train``, ``OUT/val``,
``OUT/test``, each a dataset in our layout (plus ``OUT/split.json`` listing the files), which
``make reproduce DATA=folder:OUT`` uses in place. ``keep_splits=None`` decides by itself: on
when every annotation file lies in such a folder and there are ``train`` and ``test`` ones (a
Roboflow export), off otherwise (the VISION ``train``/``val``/``inference`` folders are merged).
The Python default is ``False`` (one merged dataset, as :func:`data_prep.prepare.prepare_data`
expects, which splits it itself); the CLI's default is ``None``. Merged, the source split is
kept in the ``source_split`` column.

Images: EXIF orientation is applied by the library's one reader
(:func:`seggpt_lib.data.layout.open_image`), so sizes are compared with the JSON upright, and
the image bytes are copied unchanged (every reader of the output turns them upright the same way).

Output naming: the class is the category name, prefixed by the sub-dataset name when several
sub-datasets are merged (``Cable_thunderbolt``); files are ``<class>_<originalstem>.<ext>``.
Images with no annotations are class ``free`` (``free_<Sub>_<stem>`` when merging).

Masks (``multiclass``):

* **class-index masks** (``multiclass=None``, the default, when the export has more than one
  class; ``multiclass=True`` always): every image is written **once**, its mask holding label
  value ``k`` (1..K) where the ``k``-th class lies; the classes are those with (non-crowd)
  annotations, numbered in the order of their names (sorted; stable whatever the annotation
  order), named in ``OUT/labels.txt`` (line ``k`` names value ``k``; the same table as
  ``class_index.json``, ``{"background": 0, name: k}``; with kept splits in every split folder
  too). Each class's pixels are pycocotools' union of that category's annotations; **where the
  categories of one image overlap, the one with the smaller area in that image (its union's
  pixel count) wins** (a small defect is never hidden by a large one; equal areas: the lower
  label value), so the union of the classes is the same union as in binary masks. The
  ``class`` column of ``classes.csv`` (and the file-name prefix) is the image's *main* class,
  the one covering most pixels of the written mask (ties: the lower label value), as
  :class:`seggpt_lib.data.layout.DefectIndex` reads it; the ``classes`` column lists every
  class the mask holds (``;``-separated). Readers of the output give such an image a
  membership in each of its classes (``DefectIndex.members``).
* **binary masks** (255; an export with one class, or ``multiclass=False``:
  ``--per-category-copies``): an image with annotations of several categories gives one output
  image per category, each mask holding only that category's pixels (the outputs of a
  single-category export are byte for byte what earlier versions wrote).

Groups: every output derived from one source image carries the same ``group`` in
``classes.csv`` (:func:`source_group`: the image's path without extension, relative to
``--src``, e.g. ``Cable/train/000123``; a Roboflow name ``<name>_jpg.rf.<hash>`` counts as
``<name>_jpg``, so the augmented copies of one upload share it), and ``seggpt prepare split``
keeps a group in one split: the per-category copies of one photo (``--per-category-copies``)
and Roboflow's augmented copies never land in both train and test.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from pycocotools import mask as coco_mask

from seggpt_lib.data.layout import CLASS_INDEX_JSON, IGNORE_DIR

from .common import (
    FREE_CLASS,
    DataPrepError,
    DataPrepWarning,
    DatasetError,
    Problems,
    check_output,
    copy_file,
    output_dir,
    progress,
    read_image,
    safe_name,
    write_classes_csv,
    write_label,
    write_label_names,
)

ANNOTATION_FILE = "_annotations.coco.json"
# an export's split folder names -> our split names
SPLIT_NAMES = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
# polygon and box coordinates beyond +-max(_COORD_MARGIN * image size, _COORD_LIMIT) are refused
# (pycocotools walks every edge in fifth-pixel steps: a wild coordinate would allocate without bound)
_COORD_MARGIN = 16
_COORD_LIMIT = 100_000


# --------------------------------------------------------------------------------------------
# RLE
# --------------------------------------------------------------------------------------------
def decode_rle_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE text into run lengths.

    Each count is stored in 5-bit groups, least significant first, as characters ``48 + g``;
    bit 0x20 means "another group follows", bit 0x10 of the last group is the sign. From the
    third count on, the value is stored as a difference to the count two places back."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"invalid character {s[p]!r} in compressed RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle_string(counts: list[int]) -> str:
    """Inverse of :func:`decode_rle_string` (used to write test fixtures)."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            g = x & 0x1F
            x >>= 5
            more = (x != -1) if (g & 0x10) else (x != 0)
            if more:
                g |= 0x20
            out.append(chr(g + 48))
    return "".join(out)


def _check_rle(rle) -> tuple[int, int, list[int]]:
    """``(h, w, run lengths)`` of a COCO RLE dict, or ValueError when it is not a valid one."""
    if not isinstance(rle, dict):
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    try:
        h, w = (int(v) for v in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE needs 'size': [height, width]") from None
    if h < 0 or w < 0:
        raise ValueError(f"RLE size {h}x{w} is negative")
    counts = rle.get("counts")
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts)
    elif isinstance(counts, list):
        try:
            if any(isinstance(c, bool) or int(c) != c for c in counts):
                raise ValueError
            counts = [int(c) for c in counts]
        except (TypeError, ValueError, OverflowError):
            raise ValueError("RLE run lengths must be whole numbers") from None
    else:
        raise ValueError("RLE 'counts' must be a list or a string")
    if any(c < 0 for c in counts):
        raise ValueError("RLE has a negative run length")
    total = sum(counts)
    if total != h * w:
        raise ValueError(f"RLE run lengths sum to {total}, expected {h}*{w}={h * w}")
    return h, w, counts


def _decode(rle: dict) -> np.ndarray:
    """pycocotools' decoding of one of its own RLEs, as bool (h, w)."""
    with warnings.catch_warnings():  # pycocotools' __array__ predates NumPy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.array(coco_mask.decode(rle), dtype=bool)


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": list | str}``) -> bool (h, w), decoded by
    pycocotools after checking it (runs alternate background/foreground, starting with
    background, over the pixels in column-major order). ValueError when it is not valid."""
    h, w, counts = _check_rle(rle)
    if h == 0 or w == 0:
        return np.zeros((h, w), bool)
    # pycocotools' own encoding of the (checked) runs: no trust in the input text
    return _decode(coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w))


def mask_to_rle(mask: np.ndarray) -> dict:
    """bool (h, w) -> uncompressed COCO RLE (column-major runs, starting with background)."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.T.reshape(-1)
    counts, cur, run = [], False, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# --------------------------------------------------------------------------------------------
# polygons and boxes
# --------------------------------------------------------------------------------------------
def _numbers(values, what: str, height: int, width: int) -> list[float]:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{what} must be a list of numbers, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what} holds a non-number {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{what} holds {v}")
        out.append(v)
    bound = max(_COORD_MARGIN * max(height, width), _COORD_LIMIT)
    if any(abs(v) > bound for v in out):
        raise ValueError(f"{what} has coordinates far outside the {width}x{height} image")
    return out


def split_polygons(polygons, height: int, width: int) -> tuple[list[list[float]], list[str]]:
    """Check COCO polygons: ``(good polygons, notes on degenerate ones)``. A degenerate polygon
    (fewer than 3 points) is left out with a note; a malformed one (not a list of numbers, an odd
    number of coordinates, coordinates far outside the image) raises ValueError."""
    if not isinstance(polygons, (list, tuple)):
        raise ValueError(f"polygons must be a list of lists, got {type(polygons).__name__}")
    good, notes = [], []
    for k, poly in enumerate(polygons):
        coords = _numbers(poly, f"polygon {k}", height, width)
        if len(coords) < 6:
            notes.append(f"polygon {k} has {len(coords)} coordinates (fewer than 3 points)")
        elif len(coords) % 2:
            raise ValueError(f"polygon {k} has an odd number of coordinates ({len(coords)})")
        else:
            good.append(coords)
    return good, notes


def _rasterise_polygons(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    if not polygons or height == 0 or width == 0:
        return np.zeros((height, width), bool)
    rles = coco_mask.frPyObjects(polygons, height, width)   # every polygon has >= 6 coordinates
    return _decode(coco_mask.merge(rles))


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygons (lists of x1, y1, x2, y2, ... in pixel coordinates) -> bool (h, w), by
    pycocotools (a pixel is inside when its centre is). ValueError on a degenerate or malformed
    polygon."""
    good, notes = split_polygons(polygons, height, width)
    if notes:
        raise ValueError("; ".join(notes))
    return _rasterise_polygons(good, height, width)


def bbox_to_mask(bbox, height: int, width: int) -> np.ndarray:
    """A COCO box ``[x, y, w, h]`` -> bool (h, w), by pycocotools (as its polygon)."""
    x, y, bw, bh = _check_bbox(bbox, height, width)
    if height == 0 or width == 0:
        return np.zeros((height, width), bool)
    rles = coco_mask.frPyObjects(np.array([[x, y, bw, bh]], dtype=np.float64), height, width)
    return _decode(rles[0])


def _check_bbox(bbox, height: int, width: int) -> list[float]:
    vals = _numbers(bbox, "bbox", height, width)
    if len(vals) != 4:
        raise ValueError(f"bbox must be [x, y, width, height], got {len(vals)} numbers")
    if vals[2] < 0 or vals[3] < 0:
        raise ValueError(f"bbox {vals} has a negative width or height")
    return vals


def has_segmentation(seg) -> bool:
    """False for a detection-only annotation (``"segmentation"`` missing, None or empty)."""
    return not (seg is None or (isinstance(seg, (list, tuple, dict)) and len(seg) == 0))


def segmentation_to_mask(seg, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, or RLE of the image's size) -> bool (h, w), by
    pycocotools. ValueError on a degenerate or malformed one."""
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, dict):
        m = rle_to_mask(seg)
        if m.shape != (height, width):
            raise ValueError(f"RLE size {m.shape[0]}x{m.shape[1]} (h x w) differs from the image "
                             f"{height}x{width}")
        return m
    raise ValueError(f"unsupported segmentation type {type(seg).__name__}")


def annotation_mask(ann: dict, height: int, width: int, boxes_as_masks: bool = False
                    ) -> tuple[np.ndarray | None, list[str]]:
    """One annotation's mask (None when all its polygons are degenerate) and notes on its
    skipped degenerate polygons. ValueError when it is malformed or has no segmentation (unless
    ``boxes_as_masks``: then its bbox is filled)."""
    seg = ann.get("segmentation")
    if not has_segmentation(seg):
        if not boxes_as_masks:
            raise ValueError("no segmentation")
        if "bbox" not in ann:
            raise ValueError("no segmentation and no bbox")
        return bbox_to_mask(ann["bbox"], height, width), []
    if isinstance(seg, list):
        good, notes = split_polygons(seg, height, width)
        return (_rasterise_polygons(good, height, width) if good else None), notes
    return segmentation_to_mask(seg, height, width), []


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
@dataclass
class CocoSplit:
    sub: str | None       # sub-dataset name (None when SRC itself is the sub-dataset)
    split: str            # the folder holding the annotation file
    ann_file: Path

    @property
    def our_split(self) -> str | None:
        """``train``, ``val`` or ``test`` when the folder is named like an export split, else None."""
        return SPLIT_NAMES.get(self.split.lower())


def find_coco_files(src: str | os.PathLike) -> list[CocoSplit]:
    src = Path(src)
    if not src.is_dir():
        raise DataPrepError(f"{src}: source folder not found")
    found = []
    for ann in sorted(src.rglob(ANNOTATION_FILE)):
        rel = ann.parent.relative_to(src).parts
        if len(rel) >= 2:
            found.append(CocoSplit(rel[0], rel[-1], ann))
        elif len(rel) == 1:
            found.append(CocoSplit(None, rel[0], ann))
        else:
            found.append(CocoSplit(None, src.resolve().name, ann))
    if not found:
        if not any(src.iterdir()):
            raise DataPrepError(f"{src}: empty source folder")
        raise DataPrepError(f"{src}: no {ANNOTATION_FILE} found (expected SRC/<split>/{ANNOTATION_FILE}, "
                            f"SRC/<Sub>/<split>/{ANNOTATION_FILE} or SRC/{ANNOTATION_FILE})")
    return found


def has_export_splits(splits: list[CocoSplit]) -> bool:
    """Whether the export carries its own split: every annotation file in a ``train``,
    ``valid``/``val``/``validation`` or ``test`` folder, with ``train`` and ``test`` present."""
    names = {s.our_split for s in splits}
    return None not in names and {"train", "test"} <= names


def image_candidates(ann_dir: Path, file_name: str) -> list[Path]:
    """Where an image named ``file_name`` in ``ann_dir/_annotations.coco.json`` may be, in the
    order tried: beside the JSON, in ``images/`` beside it, in ``../images/``; each with the
    ``file_name`` as given and by its bare name."""
    rel = file_name.replace("\\", "/")
    name = PurePosixPath(rel).name
    out: list[Path] = []
    for base in (ann_dir, ann_dir / "images", ann_dir.parent / "images"):
        for r in (rel, name):
            p = base / r
            if p not in out:
                out.append(p)
    return out


def find_image(ann_dir: Path, file_name: str) -> Path | None:
    return next((p for p in image_candidates(ann_dir, file_name) if p.is_file()), None)


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPrepError(f"{path}: unreadable COCO file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataPrepError(f"{path}: not a COCO file (no 'images' list)")
    for key in ("annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise DataPrepError(f"{path}: '{key}' must be a list")
    return data


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
@dataclass
class _Job:
    sp: CocoSplit
    sub: str | None
    cats: dict[int, str]
    info: dict
    anns: list[dict]
    dropped: int = 0                      # annotations of this image already skipped (skip_bad)
    rows: list[dict] = field(default_factory=list)


def class_index_mask(per_class: dict[str, np.ndarray], class_index: dict[str, int]) -> np.ndarray:
    """One image's class-index mask (uint8) from its per-class bool masks: value
    ``class_index[c]`` where class ``c`` lies; where classes overlap, the one with the smaller
    area (pixel count of its mask) wins, equal areas the lower value (module docstring)."""
    label = np.zeros(next(iter(per_class.values())).shape, np.uint8)
    # painted largest first (equal areas: the higher value first), so the winner is painted last
    for cls in sorted(per_class, key=lambda c: (-int(np.count_nonzero(per_class[c])), -class_index[c])):
        label[per_class[cls]] = class_index[cls]
    return label


def write_class_tables(root: Path, class_index: dict[str, int]) -> None:
    """``root/labels.txt`` (line ``k`` names label value ``k``) and ``root/class_index.json``
    (``{"background": 0, name: k}``): the same table, as the layout reads it."""
    write_label_names(root, {v: c for c, v in class_index.items()})
    (root / CLASS_INDEX_JSON).write_text(json.dumps({"background": 0, **class_index}, indent=2) + "\n",
                                         encoding="utf-8")


def source_group(src: Path, sp: "CocoSplit", file_name: str) -> str:
    """The ``group`` of the outputs derived from one source image (module docstring): its path
    without extension relative to ``src`` (``/``-separated), a Roboflow ``.rf.<hash>`` suffix dropped."""
    path = PurePosixPath(file_name.replace("\\", "/"))
    stem = path.stem.split(".rf.")[0] if ".rf." in path.stem else path.stem
    try:
        folder = sp.ann_file.parent.resolve().relative_to(Path(src).resolve()).as_posix()
    except ValueError:
        folder = sp.ann_file.parent.name
    parts = [p for p in (folder, *path.parent.parts, stem) if p not in ("", ".", "..", "/")]
    return "/".join(parts)


def convert_vision_coco(src, out, multiclass: bool | None = None, skip_bad: bool = False,
                        overwrite: bool = False, show_progress: bool | None = None,
                        keep_splits: bool | None = False, boxes_as_masks: bool = False,
                        crowd_as_defect: bool = False) -> Path:
    """Convert every ``_annotations.coco.json`` under ``src`` into one dataset at ``out`` (or,
    with ``keep_splits``, into ``out/train``, ``out/val``, ``out/test``; None: when the export
    has its own split). See the module docstring for where images may be, how masks are
    decoded (pycocotools), crowd regions and the annotation-by-annotation handling of bad input.
    ``multiclass``: None (default) writes class-index masks + ``labels.txt`` (each image once)
    when the export has more than one class, binary masks otherwise; True always class-index
    masks; False binary masks, one output per (image, category) (``--per-category-copies``).

    Bad input (raises :class:`DataPrepError` naming the file, or with ``skip_bad`` skips it and
    emits one :class:`DataPrepWarning` listing all): an empty source, an unreadable COCO file,
    an annotation whose image id or category id is unknown, a malformed segmentation or none
    (skipped alone), a missing, unreadable or truncated image, an image whose (upright) size
    differs from the COCO entry. Degenerate polygons, and images left with no usable annotation,
    are skipped with a warning whatever ``skip_bad``."""
    src, out = Path(src), Path(out)
    check_output(out, [src], overwrite)
    splits = find_coco_files(src)
    subs = sorted({s.sub for s in splits if s.sub is not None})
    merge = len(subs) > 1
    problems = Problems(skip_bad)
    notes: list[str] = []   # always warnings: degenerate polygons, images left out
    if keep_splits is None:
        keep_splits = has_export_splits(splits)
    elif keep_splits:
        odd = next((s for s in splits if s.our_split is None), None)
        if odd is not None:
            raise DataPrepError(f"{odd.ann_file}: keeping the export's splits needs every {ANNOTATION_FILE} in a "
                                f"folder named train, valid (or val) or test; this one is in {odd.split!r}")

    # pass 1: parse every file, resolve class names
    jobs: list[_Job] = []
    for sp in splits:
        data = _load_json(sp.ann_file)
        cats = {}
        for c in data.get("categories", []):
            try:
                cats[int(c["id"])] = str(c["name"])
            except (KeyError, TypeError, ValueError):
                problems.report(sp.ann_file, f"malformed category entry {c!r}")
        images: dict[int, _Job] = {}
        for im in data["images"]:
            try:
                iid = int(im["id"])
                if not isinstance(im["file_name"], str) or not im["file_name"]:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                problems.report(sp.ann_file, f"malformed image entry {im!r}")
                continue
            if iid in images:
                problems.report(sp.ann_file, f"image id {iid} is listed twice")
                continue
            images[iid] = _Job(sp, sp.sub, cats, im, [])
        for a in data.get("annotations", []):
            aid = a.get("id", "?") if isinstance(a, dict) else "?"
            try:
                iid, cid = int(a["image_id"]), int(a["category_id"])
            except (KeyError, TypeError, ValueError):
                problems.report(sp.ann_file, f"annotation {aid}: missing or malformed image_id/category_id")
                continue
            if iid not in images:
                problems.report(sp.ann_file, f"annotation {aid} refers to unknown image id {iid}")
                continue
            job = images[iid]
            where = f"annotation {aid} (image {job.info['file_name']})"
            if cid not in cats:
                problems.report(sp.ann_file, f"{where} refers to unknown category id {cid}")
                job.dropped += 1
                continue
            if not boxes_as_masks and not has_segmentation(a.get("segmentation")):
                problems.report(sp.ann_file, f"{where} has no segmentation (\"segmentation\" empty or missing): "
                                             "a detection-only export? Boxes are not masks; --boxes-as-masks "
                                             "fills each bbox instead")
                job.dropped += 1
                continue
            job.anns.append(a)
        jobs.extend(images[i] for i in sorted(images))

    def class_name(sub: str | None, cat: str) -> str:
        name = safe_name(cat)
        return f"{safe_name(sub)}_{name}" if merge and sub else name

    def is_crowd(a: dict) -> bool:
        v = a.get("iscrowd", 0)
        return v not in (0, None, False, "0", "")

    all_classes = sorted({class_name(j.sub, j.cats[int(a["category_id"])]) for j in jobs for a in j.anns
                          if crowd_as_defect or not is_crowd(a)})
    if FREE_CLASS in all_classes:
        raise DataPrepError(f"{src}: a category is named {FREE_CLASS!r}, which is reserved for defect-free images")
    class_index = {c: i + 1 for i, c in enumerate(all_classes)}
    if multiclass is None:  # the default: class-index masks when there is more than one class
        multiclass = len(class_index) > 1
    multiclass = bool(multiclass and class_index)  # no class at all: every image is free, nothing to name
    if multiclass and len(class_index) > 255:
        raise DataPrepError(f"{src}: {len(class_index)} classes do not fit a uint8 class-index mask "
                            "(--per-category-copies writes binary masks, one image per category)")
    if not jobs:
        raise DataPrepError(f"{src}: the COCO files list no images")

    with output_dir(out, sources=[src], overwrite=overwrite) as tmp:
        if not keep_splits:
            (tmp / "images").mkdir()
            (tmp / "labels").mkdir()
        rows_by_split: dict[str, list[dict]] = defaultdict(list)
        used: set[str] = set()

        def unique(stem: str) -> str:
            cand, n = stem, 1
            while cand.lower() in used:
                n += 1
                cand = f"{stem}_{n}"
            used.add(cand.lower())
            return cand

        for job in progress(jobs, desc="coco", total=len(jobs), enabled=show_progress):
            sp, sub, info = job.sp, job.sub, job.info
            file_name = str(info["file_name"])
            img_path = find_image(sp.ann_file.parent, file_name)
            if img_path is None:
                tried = ", ".join(str(p) for p in image_candidates(sp.ann_file.parent, file_name))
                problems.report(sp.ann_file, f"image {file_name!r} (id {info['id']}) not found; looked for {tried}")
                continue
            try:
                im = read_image(img_path)
            except DatasetError as e:
                problems.catch(e)
                continue
            w, h = im.size
            jw, jh = info.get("width"), info.get("height")
            if jw is not None and jh is not None and (int(jw), int(jh)) != (w, h):
                problems.report(img_path, f"image is {w}x{h} (upright, after its EXIF orientation) but "
                                          f"{sp.ann_file.name} says {jw}x{jh}")
                continue
            per_class: dict[str, np.ndarray] = {}
            ignore: np.ndarray | None = None
            dropped, crowd_only = job.dropped, 0
            for a in job.anns:
                where = f"annotation {a.get('id', '?')} (image {file_name})"
                try:
                    crowd = is_crowd(a)
                    m, poly_notes = annotation_mask(a, h, w, boxes_as_masks)
                except (ValueError, TypeError, KeyError, OverflowError) as e:
                    problems.report(sp.ann_file, f"{where}: bad segmentation ({e})")
                    dropped += 1
                    continue
                for note in poly_notes:
                    notes.append(f"{sp.ann_file}: {where}: {note}; skipped, the image's other polygons kept")
                if m is None:
                    dropped += 1
                    continue
                if crowd and not crowd_as_defect:
                    ignore = m if ignore is None else ignore | m
                    crowd_only += 1
                    continue
                cls = class_name(sub, job.cats[int(a["category_id"])])
                per_class[cls] = per_class.get(cls, np.zeros((h, w), bool)) | m
            if not per_class and (dropped or crowd_only):
                why = ("only crowd (iscrowd) regions" if not dropped else
                       f"no usable annotation ({dropped} skipped)")
                notes.append(f"{img_path}: left out, {why}: not written as defect-free")
                continue
            split = sp.our_split if keep_splits else ""
            base = tmp / split if split else tmp
            rows = rows_by_split[split]
            stem, ext = Path(file_name.replace("\\", "/")).stem, img_path.suffix.lower()
            surface = sub or src.resolve().name
            common = {"surface": surface, "source_split": sp.split, "group": source_group(src, sp, file_name)}

            def emit(name: str, label: np.ndarray, row: dict) -> None:
                copy_file(img_path, base / "images" / f"{name}{ext}")
                write_label(base / "labels" / f"{name}.png", label)
                if ignore is not None:
                    ig = ignore & (np.asarray(label) == 0)
                    if ig.any():
                        write_label(base / IGNORE_DIR / f"{name}.png", ig)
                extra = row.pop("_extra", {})
                rows.append({"file": f"{name}{ext}", **row, **common,
                             "defect_pixels": int(np.count_nonzero(label)), **extra})

            if not per_class:
                name = unique(f"{FREE_CLASS}_{safe_name(sub)}_{stem}" if merge and sub else f"{FREE_CLASS}_{stem}")
                emit(name, np.zeros((h, w), np.uint8), {"class": FREE_CLASS})
            elif multiclass:
                label = class_index_mask(per_class, class_index)
                counts = np.bincount(label.ravel(), minlength=256)
                held = sorted((c for c in per_class if counts[class_index[c]]), key=class_index.get)
                # the main class as DefectIndex reads it: most pixels, ties the lower value
                main = (min(held, key=lambda c: (-int(counts[class_index[c]]), class_index[c])) if held
                        else min(per_class, key=class_index.get))       # annotations without pixels
                emit(unique(f"{main}_{stem}"), label,
                     {"class": main, "_extra": {"classes": ";".join(sorted(held))}})
            else:
                for cls, m in sorted(per_class.items()):
                    emit(unique(f"{cls}_{stem}"), m, {"class": cls})
        problems.warn()
        if notes:
            warnings.warn(f"{len(notes)} annotation problem(s) handled alone:\n  " + "\n  ".join(notes),
                          DataPrepWarning, stacklevel=2)
        if not any(rows_by_split.values()):
            raise DataPrepError(f"{src}: no usable images (every one was bad)")
        for split, rows in sorted(rows_by_split.items()):
            if rows:
                write_classes_csv(tmp / split if split else tmp, rows)
                if multiclass:
                    write_class_tables(tmp / split if split else tmp, class_index)
        if keep_splits:
            if multiclass:
                write_class_tables(tmp, class_index)
            files = {sp_: sorted(r["file"] for r in rows_by_split.get(sp_, [])) for sp_ in ("train", "val", "test")}
            meta = {"protocol": "export", "source": str(src), "seed": None, "holdout_classes": [],
                    "counts": {k: len(v) for k, v in files.items()}, "files": files}
            (tmp / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
            if not files["train"] or not files["test"]:
                warnings.warn(f"{out}: the export's split has no {'train' if not files['train'] else 'test'} "
                              "images; make reproduce DATA=folder:OUT needs train/ and test/", DataPrepWarning,
                              stacklevel=2)
    return out
