"""The image cache: a dataset's images and masks decoded once, at one size, as uint8 arrays."""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from seggpt_lib.data.layout import DatasetError, DefectIndex, default_workers, open_image, read_label, resize_image, resize_pair

__all__ = ["ImageCache"]


class ImageCache:
    """Images and masks decoded once, resized to ``size = (H, W)`` and kept as uint8.

    ``mode``:

    * ``"memory"`` (default): two numpy arrays ``(N, H, W, 3)`` and ``(N, H, W)`` filled in
      the constructor (threads). DataLoader workers started by ``fork`` share the pages.
    * ``"memmap"``: the same arrays as files in ``cache_dir``, named by a fingerprint of the
      index (files, sizes, mtimes) and ``size``, so a second run reuses them; workers reopen
      the files read-only (nothing is pickled but the path).
    * ``"none"``: decode on every access (no memory; for a handful of evaluation images).

    ``get(i)`` returns ``(image (H, W, 3), mask (H, W))`` uint8 views. When the dataset has
    ignore masks (``labels_ignore/``), they are cached too (``(N, H, W)``, non-zero = ignore)
    and ``get_ignore(i)`` returns image ``i``'s; None otherwise.
    """

    MODES = ("memory", "memmap", "none")

    def __init__(
        self,
        index: DefectIndex,
        size: tuple[int, int],
        mode: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        workers: int | None = None,
        progress: bool | None = None,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"cache mode must be one of {self.MODES}, got {mode!r}")
        if mode == "memmap" and cache_dir is None:
            raise ValueError("cache mode 'memmap' needs a cache_dir")
        self.index = index
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.images: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.ignores: np.ndarray | None = None
        self.has_ignore = index.ignore_dir.is_dir()
        self._paths: tuple[Path, Path] | None = None
        n, (h, w) = len(index), self.size
        if mode == "memory":
            self.images = np.empty((n, h, w, 3), dtype=np.uint8)
            self.masks = np.empty((n, h, w), dtype=np.uint8)
            if self.has_ignore:
                self.ignores = np.zeros((n, h, w), dtype=np.uint8)
            self._fill(range(n), workers, progress)
        elif mode == "memmap":
            self._open_or_build_memmap(workers, progress)

    def __len__(self) -> int:
        return len(self.index)

    def nbytes(self) -> int:
        n, (h, w) = len(self.index), self.size
        return 0 if self.mode == "none" else n * h * w * 4

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode and resize one image/mask pair from disk (no caching)."""
        img = open_image(self.index.image_path(i), "RGB")
        mask = read_label(self.index.label_path(i))
        if (mask.shape[1], mask.shape[0]) != img.size:
            raise DatasetError(f"{self.index.label_path(i)}: label size {mask.shape[1]}x{mask.shape[0]} differs "
                               f"from its image {self.index.files[i]} ({img.size[0]}x{img.size[1]})")
        img, mask = resize_pair(img, mask, self.size)
        return np.asarray(img, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8)

    def load_ignore(self, i: int) -> np.ndarray | None:
        """Image ``i``'s ignore mask at the cache size (nearest), or None when it has none."""
        path = self.index.ignore_path(i)
        if path is None:
            return None
        return np.ascontiguousarray(resize_image(read_label(path), self.size, nearest=True), dtype=np.uint8)

    def get_ignore(self, i: int) -> np.ndarray | None:
        """Image ``i``'s ignore mask (uint8, non-zero = ignore) or None (no ignore pixels)."""
        if not self.has_ignore:
            return None
        if self.ignores is None or self.mode == "none":  # memmap caches and "none" read it when asked
            return self.load_ignore(i)
        return self.ignores[i]

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "none":
            return self.load(i)
        if self.images is None:  # a memmap cache unpickled in a worker
            self._attach()
        return self.images[i], self.masks[i]

    def _fill(self, rows, workers: int | None, progress: bool | None) -> None:
        def one(i: int) -> None:
            self.images[i], self.masks[i] = self.load(i)
            if self.ignores is not None:
                ig = self.load_ignore(i)
                if ig is not None:
                    self.ignores[i] = ig

        rows = list(rows)
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            it = pool.map(one, rows)
            if progress or (progress is None and sys.stderr.isatty() and len(rows) > 2000):
                try:
                    from tqdm.auto import tqdm

                    it = tqdm(it, total=len(rows), desc="caching images", leave=False)
                except ImportError:  # pragma: no cover
                    pass
            for _ in it:
                pass

    def _open_or_build_memmap(self, workers: int | None, progress: bool | None) -> None:
        fp = self.index.fingerprint(extra=list(self.size))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        base = self.cache_dir / f"seggpt-cache-{fp}-{self.size[0]}x{self.size[1]}"
        img_path, msk_path, done = (base.with_suffix(".images.u8"), base.with_suffix(".masks.u8"),
                                    base.with_suffix(".json"))
        self._paths = (img_path, msk_path)
        n, (h, w) = len(self.index), self.size
        if not done.is_file():
            tmp_img = img_path.with_name(img_path.name + f".tmp{os.getpid()}")
            tmp_msk = msk_path.with_name(msk_path.name + f".tmp{os.getpid()}")
            try:
                self.images = np.memmap(tmp_img, dtype=np.uint8, mode="w+", shape=(n, h, w, 3))
                self.masks = np.memmap(tmp_msk, dtype=np.uint8, mode="w+", shape=(n, h, w))
                self._fill(range(n), workers, progress)
                self.images.flush()
                self.masks.flush()
                self.images = self.masks = None
                os.replace(tmp_img, img_path)
                os.replace(tmp_msk, msk_path)
            except BaseException:
                self.images = self.masks = None
                for p in (tmp_img, tmp_msk):
                    p.unlink(missing_ok=True)
                raise
            done.write_text(json.dumps({"n": n, "size": [h, w], "files": len(self.index.files)}))
        self._attach()

    def _attach(self) -> None:
        n, (h, w) = len(self.index), self.size
        img_path, msk_path = self._paths
        self.images = np.memmap(img_path, dtype=np.uint8, mode="r", shape=(n, h, w, 3))
        self.masks = np.memmap(msk_path, dtype=np.uint8, mode="r", shape=(n, h, w))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.mode == "memmap":  # reopen in the worker instead of copying the data
            state["images"] = state["masks"] = None
        return state
