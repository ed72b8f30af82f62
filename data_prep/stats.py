"""Dataset statistics: per-channel mean/std (0..1 scale, RGB; grayscale images count as three
equal channels), image counts per class, image-size range and mean defect-pixel fraction.

Works on a dataset ROOT, or on a split folder (``train/``, ``val/``, ``test/`` below it: one
entry per split). Never writes into the source."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import (
    DataPrepError,
    DatasetError,
    Problems,
    check_output,
    output_file,
    progress,
    read_image,
    read_mask,
    scan_dataset,
)
from .split import SPLITS


def root_stats(root, skip_bad: bool = False, show_progress: bool | None = None) -> dict:
    """Statistics of one dataset ROOT. A bad file (missing partner, unreadable, truncated or
    empty, a label whose size differs from its image) raises :class:`DataPrepError` naming it;
    with ``skip_bad`` it is left out, listed in one :class:`DataPrepWarning` and under
    ``"skipped"`` (nothing usable left still raises). Labels are read by the layout's rule
    (:func:`seggpt_lib.data.layout.read_label`: non-zero = defect)."""
    problems = Problems(skip_bad)
    samples = scan_dataset(root, skip_bad=skip_bad, verify=False, problems=problems)
    s1 = np.zeros(3, np.float64)
    s2 = np.zeros(3, np.float64)
    n_px = 0
    n_images = 0
    classes: dict[str, int] = {}
    frac: dict[str, list[float]] = {}
    widths, heights = [], []
    for s in progress(samples, desc="stats", total=len(samples), enabled=show_progress):
        try:
            img = np.asarray(read_image(s.image, "RGB"), dtype=np.float64) / 255.0
            lbl = read_mask(s.label)
        except DatasetError as e:
            problems.catch(e)
            continue
        if lbl.shape != img.shape[:2]:
            problems.report(s.label, f"label size {lbl.shape[1]}x{lbl.shape[0]} differs from its "
                                     f"image {s.image.name} ({img.shape[1]}x{img.shape[0]})")
            continue
        n_images += 1
        flat = img.reshape(-1, 3)
        s1 += flat.sum(0)
        s2 += (flat * flat).sum(0)
        n_px += flat.shape[0]
        classes[s.cls] = classes.get(s.cls, 0) + 1
        frac.setdefault(s.cls, []).append(float(np.count_nonzero(lbl)) / lbl.size)
        heights.append(img.shape[0])
        widths.append(img.shape[1])
    problems.warn()
    if not n_images:
        raise DataPrepError(f"{root}: no usable image/label pairs (skipped {len(problems.skipped)} bad file(s))")
    mean = s1 / n_px
    std = np.sqrt(np.maximum(s2 / n_px - mean * mean, 0.0))
    extra = {"skipped": list(problems.skipped)} if problems.skipped else {}
    return {
        "images": n_images,
        "classes": dict(sorted(classes.items())),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "width": [int(min(widths)), int(max(widths))],
        "height": [int(min(heights)), int(max(heights))],
        "defect_fraction": {c: round(float(np.mean(v)), 6) for c, v in sorted(frac.items())},
        **extra,
    }


def dataset_stats(src, skip_bad: bool = False, show_progress: bool | None = None) -> dict:
    """Statistics of a dataset ROOT, or ``{"splits": {name: stats}}`` for a split folder."""
    src = Path(src)
    if not src.is_dir():
        raise DataPrepError(f"{src}: source folder not found")
    if (src / "images").is_dir():
        return {"root": str(src), **root_stats(src, skip_bad, show_progress)}
    parts = [sp for sp in SPLITS if (src / sp / "images").is_dir()]
    if parts:
        out = {"root": str(src), "splits": {}}
        for sp in parts:
            try:
                out["splits"][sp] = root_stats(src / sp, skip_bad, show_progress)
            except DataPrepError as e:
                if "empty source folder" not in str(e):
                    raise
                out["splits"][sp] = {"images": 0}
        return out
    if not any(src.iterdir()):
        raise DataPrepError(f"{src}: empty source folder")
    raise DataPrepError(f"{src}: neither a dataset ROOT (images/, labels/) nor a split folder (train/, val/, test/)")


def check_stats_output(out_file, src, overwrite: bool = False) -> None:
    """Refuse ``out_file`` inside (or containing) ``src``, or existing without ``overwrite``."""
    check_output(out_file, [src], overwrite, folder=False)


def write_stats(stats: dict, out_file, src, overwrite: bool = False) -> Path:
    """Write the statistics as JSON (never inside ``src``; an existing file only with ``overwrite``)."""
    out_file = Path(out_file)
    with output_file(out_file, [src], overwrite) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    return out_file
