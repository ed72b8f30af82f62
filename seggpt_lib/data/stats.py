"""Dataset statistics: per-channel mean and std of the images."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from seggpt_lib.data.layout import DefectIndex, default_workers, open_image

__all__ = ["compute_stats"]


def compute_stats(
    root: str | os.PathLike | DefectIndex,
    size: int | None = None,
    workers: int | None = None,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of a dataset's images on the 0..1 scale, over all pixels.

    ``size`` resizes every image so that its longer side is at most ``size`` first (faster,
    approximately the same numbers); ``None`` uses full resolution.
    """
    index = root if isinstance(root, DefectIndex) else DefectIndex.scan(root, verify=False, workers=workers)

    def one(i: int) -> tuple[np.ndarray, np.ndarray, int]:
        im = open_image(index.image_path(i), "RGB")
        if size is not None and max(im.size) > size:
            scale = size / max(im.size)
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255.0
        return a.sum(0), (a * a).sum(0), a.shape[0]

    s = np.zeros(3)
    ss = np.zeros(3)
    n = 0
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for a, b, c in pool.map(one, range(len(index))):
            s += a
            ss += b
            n += c
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]
