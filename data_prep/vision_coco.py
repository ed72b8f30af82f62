"""VISION-Datasets-style COCO instance segmentation -> the project's layout.

Source layouts accepted (``--src``)::

    SRC/<Sub>/<split>/_annotations.coco.json   several sub-datasets (Cable, Capacitor, ...)
    SRC/<split>/_annotations.coco.json         one sub-dataset
    SRC/_annotations.coco.json                 one split folder

Images lie next to their annotation file (``file_name`` is relative to it). Segmentations may
be polygons, uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string, the
COCO LEB128-like text encoding, decoded here without pycocotools).

Output naming: the class is the category name, prefixed by the sub-dataset name when several
sub-datasets are merged (``Cable_thunderbolt``); files are ``<class>_<originalstem>.<ext>``
(image bytes copied unchanged). An image with annotations of several categories gives one
output image per category, each mask holding only that category's pixels (so a prompt of one
defect type never shows another type as foreground). Images with no annotations are class
``free`` (``free_<Sub>_<stem>`` when merging). Binary masks (255) by default; ``multiclass``
writes one output per image with class indices 1..K (see ``class_index.json``), named after
the class covering most pixels, and lists all its classes in the ``classes`` column.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .common import (
    FREE_CLASS,
    DataPrepError,
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
)

ANNOTATION_FILE = "_annotations.coco.json"


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


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (``{"size": [h, w], "counts": list | str}``) -> bool (h, w). Runs alternate
    background/foreground starting with background, over the pixels in column-major order."""
    try:
        h, w = (int(v) for v in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("RLE needs 'size': [height, width]") from None
    counts = rle.get("counts")
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts)
    elif not isinstance(counts, list):
        raise ValueError("RLE 'counts' must be a list or a string")
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError("RLE has a negative run length")
    total = sum(counts)
    if total != h * w:
        raise ValueError(f"RLE run lengths sum to {total}, expected {h}*{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


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


def polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """COCO polygons (lists of x1, y1, x2, y2, ... in pixel coordinates) -> bool (h, w)."""
    im = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(im)
    for poly in polygons:
        if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
            raise ValueError("a polygon needs an even number (>= 6) of coordinates")
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)]
        d.polygon(pts, fill=255, outline=255)
    return np.asarray(im) > 0


def segmentation_to_mask(seg, height: int, width: int) -> np.ndarray:
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, dict):
        m = rle_to_mask(seg)
        if m.shape != (height, width):
            raise ValueError(f"RLE size {m.shape[0]}x{m.shape[1]} (h x w) differs from the image "
                             f"{height}x{width}")
        return m
    raise ValueError(f"unsupported segmentation type {type(seg).__name__}")


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
@dataclass
class CocoSplit:
    sub: str | None       # sub-dataset name (None when SRC itself is the sub-dataset)
    split: str
    ann_file: Path


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
        raise DataPrepError(f"{src}: no {ANNOTATION_FILE} found (expected SRC/<Sub>/<split>/{ANNOTATION_FILE})")
    return found


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
def convert_vision_coco(src, out, multiclass: bool = False, skip_bad: bool = False,
                        overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Convert every ``_annotations.coco.json`` under ``src`` into one dataset at ``out``.

    Bad input (raises :class:`DataPrepError` naming the file, or with ``skip_bad`` skips it
    and emits one :class:`DataPrepWarning` listing all): an empty source, an unreadable COCO
    file, an annotation whose image id or category id is unknown, a malformed segmentation,
    a missing, unreadable or truncated image, an image whose size differs from the COCO entry."""
    src, out = Path(src), Path(out)
    check_output(out, [src], overwrite)
    splits = find_coco_files(src)
    subs = sorted({s.sub for s in splits if s.sub is not None})
    merge = len(subs) > 1
    problems = Problems(skip_bad)

    # pass 1: parse every file, resolve class names
    parsed = []
    for sp in splits:
        data = _load_json(sp.ann_file)
        cats = {}
        for c in data.get("categories", []):
            try:
                cats[int(c["id"])] = str(c["name"])
            except (KeyError, TypeError, ValueError):
                problems.report(sp.ann_file, f"malformed category entry {c!r}")
        images: dict[int, dict] = {}
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
            images[iid] = im
        anns_by_image: dict[int, list] = defaultdict(list)
        bad_images: set[int] = set()
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
            if cid not in cats:
                problems.report(sp.ann_file, f"annotation {aid} refers to unknown category id {cid}")
                bad_images.add(iid)
                continue
            if "segmentation" not in a:
                problems.report(sp.ann_file, f"annotation {aid} (image {images[iid]['file_name']}) has no segmentation")
                bad_images.add(iid)
                continue
            anns_by_image[iid].append(a)
        parsed.append((sp, sp.sub, cats, images, anns_by_image, bad_images))

    def class_name(sub: str | None, cat: str) -> str:
        name = safe_name(cat)
        return f"{safe_name(sub)}_{name}" if merge and sub else name

    all_classes = sorted({class_name(sub, cats[int(a["category_id"])])
                          for (_sp, sub, cats, _i, anns, _b) in parsed
                          for lst in anns.values() for a in lst})
    if FREE_CLASS in all_classes:
        raise DataPrepError(f"{src}: a category is named {FREE_CLASS!r}, which is reserved for defect-free images")
    class_index = {c: i + 1 for i, c in enumerate(all_classes)}
    if multiclass and len(class_index) > 255:
        raise DataPrepError(f"{src}: {len(class_index)} classes do not fit a uint8 multi-class mask")

    jobs = [(sp, sub, cats, images[iid], anns.get(iid, []), iid in bad)
            for (sp, sub, cats, images, anns, bad) in parsed for iid in sorted(images)]
    if not jobs:
        raise DataPrepError(f"{src}: the COCO files list no images")

    with output_dir(out, sources=[src], overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        rows: list[dict] = []
        used: set[str] = set()

        def unique(stem: str) -> str:
            cand, n = stem, 1
            while cand.lower() in used:
                n += 1
                cand = f"{stem}_{n}"
            used.add(cand.lower())
            return cand

        for sp, sub, cats, info, anns, bad in progress(jobs, desc="coco", total=len(jobs), enabled=show_progress):
            if bad:
                continue   # already reported
            img_path = sp.ann_file.parent / str(info["file_name"])
            try:
                im = read_image(img_path)
            except DatasetError as e:
                problems.catch(e)
                continue
            w, h = im.size
            jw, jh = info.get("width"), info.get("height")
            if jw is not None and jh is not None and (int(jw), int(jh)) != (w, h):
                problems.report(img_path, f"image is {w}x{h} but {sp.ann_file.name} says {jw}x{jh}")
                continue
            per_class: dict[str, np.ndarray] = {}
            failed = False
            for a in anns:
                try:
                    m = segmentation_to_mask(a["segmentation"], h, w)
                except (ValueError, TypeError, KeyError) as e:
                    problems.report(sp.ann_file, f"annotation {a.get('id', '?')} (image {img_path.name}): "
                                                 f"bad segmentation ({e})")
                    failed = True
                    break
                cls = class_name(sub, cats[int(a["category_id"])])
                per_class[cls] = per_class.get(cls, np.zeros((h, w), bool)) | m
            if failed:
                continue
            stem, ext = Path(str(info["file_name"])).stem, img_path.suffix.lower()
            surface = sub or src.resolve().name
            common = {"surface": surface, "source_split": sp.split}
            if not per_class:
                name = unique(f"{FREE_CLASS}_{safe_name(sub)}_{stem}" if merge and sub else f"{FREE_CLASS}_{stem}")
                copy_file(img_path, tmp / "images" / f"{name}{ext}")
                write_label(tmp / "labels" / f"{name}.png", np.zeros((h, w), np.uint8))
                rows.append({"file": f"{name}{ext}", "class": FREE_CLASS, **common, "defect_pixels": 0})
                continue
            if multiclass:
                label = np.zeros((h, w), np.uint8)
                for cls in sorted(per_class, key=lambda c: -per_class[c].sum()):  # smallest on top
                    label[per_class[cls]] = class_index[cls]
                main = max(per_class, key=lambda c: (int(per_class[c].sum()), c))
                name = unique(f"{main}_{stem}")
                copy_file(img_path, tmp / "images" / f"{name}{ext}")
                write_label(tmp / "labels" / f"{name}.png", label)
                rows.append({"file": f"{name}{ext}", "class": main, **common,
                             "defect_pixels": int(np.count_nonzero(label)),
                             "classes": ";".join(sorted(per_class))})
            else:
                for cls, m in sorted(per_class.items()):
                    name = unique(f"{cls}_{stem}")
                    copy_file(img_path, tmp / "images" / f"{name}{ext}")
                    write_label(tmp / "labels" / f"{name}.png", m)
                    rows.append({"file": f"{name}{ext}", "class": cls, **common,
                                 "defect_pixels": int(np.count_nonzero(m))})
        problems.warn()
        if not rows:
            raise DataPrepError(f"{src}: no usable images (every one was bad)")
        write_classes_csv(tmp, rows)
        if multiclass:
            (tmp / "class_index.json").write_text(json.dumps({"background": 0, **class_index}, indent=2) + "\n")
    return out
