"""The magnetic-tile surface-defect dataset (Huang, Qiu and Yuan) -> the project's layout.

Source layout, as published::

    SRC/MT_<Class>/Imgs/<name>.jpg   grayscale photo
    SRC/MT_<Class>/Imgs/<name>.png   its mask, same size (anti-aliased: thresholded at 128)

The class is the folder name without ``MT_``, lower-cased; ``MT_Free`` becomes ``free``.
Output: ``images/<class>_<name>.jpg`` (bytes copied unchanged), ``labels/<class>_<name>.png``
(0/255) and ``classes.csv`` with ``surface=magnetic_tile`` and the defect pixel count. The
source is only read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (
    FREE_CLASS,
    IMAGE_EXTS,
    DataPrepError,
    DatasetError,
    Problems,
    check_output,
    copy_file,
    output_dir,
    progress,
    read_image,
    read_mask,
    write_classes_csv,
    write_label,
)

MASK_THRESHOLD = 128
SURFACE = "magnetic_tile"


def _class_of(folder: str) -> str:
    name = folder[3:] if folder.upper().startswith("MT_") else folder
    name = name.lower()
    return FREE_CLASS if name == "free" else name


def find_magnetic_tile(src) -> list[tuple[str, Path, Path | None]]:
    """(class, image, mask or None) for every photo, sorted by class then name."""
    src = Path(src)
    if not src.is_dir():
        raise DataPrepError(f"{src}: source folder not found")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and p.name.upper().startswith("MT_"))
    if not folders:
        if not any(src.iterdir()):
            raise DataPrepError(f"{src}: empty source folder")
        raise DataPrepError(f"{src}: no MT_<Class> folders (expected SRC/MT_<Class>/Imgs/<name>.jpg)")
    items = []
    for folder in folders:
        imgs = folder / "Imgs"
        if not imgs.is_dir():
            raise DataPrepError(f"{folder}: no Imgs/ folder")
        cls = _class_of(folder.name)
        for p in sorted(imgs.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and p.suffix.lower() != ".png":
                mask = p.with_suffix(".png")
                items.append((cls, p, mask if mask.is_file() else None))
    if not items:
        raise DataPrepError(f"{src}: empty source folder (no photos in MT_*/Imgs)")
    return items


def convert_magnetic_tile(src, out, limit_per_class: int | None = None, skip_bad: bool = False,
                          overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Convert the magnetic-tile dataset at ``src`` into ``out``.

    ``limit_per_class`` keeps the first N photos (sorted by name) of each class. Bad input
    (raised as :class:`DataPrepError`, or skipped with one warning under ``skip_bad``): a photo
    without a mask, a mask whose size differs from its photo, an unreadable or truncated file."""
    src, out = Path(src), Path(out)
    check_output(out, [src], overwrite)
    items = find_magnetic_tile(src)
    if limit_per_class is not None:
        kept, seen = [], {}
        for it in items:
            seen[it[0]] = seen.get(it[0], 0) + 1
            if seen[it[0]] <= limit_per_class:
                kept.append(it)
        items = kept
    problems = Problems(skip_bad)
    with output_dir(out, sources=[src], overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        rows = []
        for cls, img, mask_path in progress(items, desc="magnetic-tile", total=len(items), enabled=show_progress):
            if mask_path is None:
                problems.report(img, f"image without a label (expected {img.with_suffix('.png').name})")
                continue
            try:
                size = read_image(img).size           # full decode: catches truncated files
                mask = read_mask(mask_path, threshold=MASK_THRESHOLD)
            except DatasetError as e:
                problems.catch(e)
                continue
            if (mask.shape[1], mask.shape[0]) != size:
                problems.report(mask_path, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its "
                                           f"image {img.name} ({size[0]}x{size[1]})")
                continue
            name = f"{cls}_{img.stem}"
            copy_file(img, tmp / "images" / f"{name}{img.suffix.lower()}")
            write_label(tmp / "labels" / f"{name}.png", mask)
            rows.append({"file": f"{name}{img.suffix.lower()}", "class": cls, "surface": SURFACE,
                         "defect_pixels": int(np.count_nonzero(mask))})
        problems.warn()
        if not rows:
            raise DataPrepError(f"{src}: no usable image/mask pairs")
        write_classes_csv(tmp, rows)
    return out
