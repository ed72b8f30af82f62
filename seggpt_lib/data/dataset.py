"""Training and evaluation data: dataset index, image cache, pair sampling, augmentation.

Dataset layout (what the ``data_prep`` converters write)::

    ROOT/images/<stem>.<png|jpg|jpeg|bmp>   RGB or grayscale image (read as RGB)
    ROOT/labels/<stem>.png                  uint8 mask, same H x W; 0 = background, non-zero = defect
                                            (255 in binary sets, class indices 1..K in multi-class sets)
    ROOT/classes.csv                        columns file,class[,surface]; defect-free images: "free"

Without ``classes.csv`` an image's class is its stem minus a trailing ``_<digits>``
(``mouse_bite_000518.jpg`` -> ``mouse_bite``). An image whose mask is empty is *defect-free*
(``is_free``), whatever its class: such images are never positives, only queries of "free" pairs.

Pipeline::

    index   = DefectIndex.scan(root)                    # compact, O(n) records, checked
    dataset = PairDataset(index, cfg, train=True, seed=0, length=20_000)
    sampler = dataset.make_sampler(rank, world_size)    # disjoint per-rank pair streams
    loader  = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=4, pin_memory=True)
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: model(**model_inputs(batch))

Every sample is a pure function of ``(seed, epoch, sample index)``: the pair, the palette, the
patch mask and the augmentation are drawn from counter-based generators seeded by those three
numbers, so a sample is the same with any number of loader workers, any DDP world size and
after a resume (``start``).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from seggpt_lib.utils.colors import fixed_palette, IMAGENET_MEAN, IMAGENET_STD, label_to_color, normalize, random_palette
from seggpt_lib.utils.masking import query_half_mask, random_patch_mask

__all__ = [
    "FREE_CLASS",
    "IMAGE_EXTS",
    "KINDS",
    "NEGATIVE_TARGETS",
    "AugmentConfig",
    "DatasetError",
    "DatasetWarning",
    "DefectIndex",
    "ImageCache",
    "Pair",
    "PairDataset",
    "PairSampler",
    "Record",
    "build_augment",
    "class_from_filename",
    "collate",
    "compute_stats",
    "fixed_pairs",
    "model_inputs",
    "read_manifest",
]

FREE_CLASS = "free"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CLASSES_CSV = "classes.csv"
KINDS = ("positive", "negative", "free")
NEGATIVE_TARGETS = ("query_mask", "empty")
_KIND_POS, _KIND_NEG, _KIND_FREE = 0, 1, 2
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the problem."""


class DatasetWarning(UserWarning):
    """Files were skipped (``skip_bad=True``); the message lists every one."""


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ==========================================================================================
# reading files
# ==========================================================================================
def class_from_filename(name: str) -> str:
    """The class encoded in a file name: the stem without a trailing ``_<digits>``.

    ``mouse_bite_000518.jpg`` -> ``mouse_bite``; a stem without such a suffix is its own class.
    """
    stem = Path(name).stem
    m = re.match(r"^(.+?)_\d+$", stem)
    return m.group(1) if m else stem


def _open_image(path: Path, mode: str | None) -> Image.Image:
    """Fully decode ``path`` (truncation raises) and convert it; errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode is None:
                return im.copy()
            return im.convert(mode) if im.mode != mode else im.copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from None


def _decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) after a full decode (so a truncated file raises)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from None


def _image_header(path: Path) -> tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _mask_array(im: Image.Image) -> np.ndarray:
    """A label image as a uint8 ``(H, W)`` array (palette images keep their indices)."""
    if im.mode in ("L", "P"):
        arr = np.asarray(im)
    elif im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
    elif im.mode == "1":
        arr = np.asarray(im).astype(np.uint8) * 255
    else:  # RGB(A), LA, ...: luminance
        arr = np.asarray(im.convert("L"))
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8 RGB; :class:`DatasetError` naming the file on failure."""
    return np.asarray(_open_image(Path(path), "RGB"))


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label as ``(H, W)`` uint8; :class:`DatasetError` naming the file on failure."""
    return _mask_array(_open_image(Path(path), None))


def _read_classes_csv(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``file -> class`` and ``file -> surface`` (empty when the column is absent)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip() for c in (reader.fieldnames or [])]
            if "file" not in fields or "class" not in fields:
                raise DatasetError(f"{path}: needs the columns 'file,class[,surface]', found {fields}")
            classes: dict[str, str] = {}
            surfaces: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
                if not row.get("file") or not row.get("class"):
                    raise DatasetError(f"{path}: line {line} has an empty 'file' or 'class'")
                classes[row["file"]] = row["class"]
                if row.get("surface"):
                    surfaces[row["file"]] = row["surface"]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return classes, surfaces


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


class DefectIndex:
    """The images of a dataset, stored column-wise in O(n) memory.

    Columns: ``files`` (list of image file names), ``class_ids`` (int32 into
    ``class_names``), ``is_free`` (bool: empty mask), ``heights``/``widths`` (int32),
    ``label_max`` (uint8: the largest label value, for multi-class checks) and optional
    ``surfaces``. Paths are derived: ``image_dir / file`` and ``label_dir / (stem + ".png")``.

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
    ) -> None:
        n = len(files)
        if len(classes) != n or len(is_free) != n:
            raise ValueError(f"files ({n}), classes ({len(classes)}) and is_free ({len(is_free)}) differ in length")
        self.root = Path(root) if root is not None else None
        base = self.root if self.root is not None else Path(".")
        self.image_dir = Path(image_dir) if image_dir is not None else base / "images"
        self.label_dir = Path(label_dir) if label_dir is not None else base / "labels"
        self.files: list[str] = [str(f) for f in files]
        names, ids = np.unique(np.asarray(list(classes), dtype=object).astype(str), return_inverse=True) if n else ([], [])
        self.class_names: list[str] = [str(c) for c in names]
        self.class_ids = np.asarray(ids, dtype=np.int32).reshape(n)
        self.is_free = np.asarray(is_free, dtype=bool).reshape(n)
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
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset folder not found")
        image_dir = root / "images" if (root / "images").is_dir() else root
        label_dir = root / "labels"
        problems: list[str] = []

        def report(msg: str) -> None:
            if not skip_bad:
                raise DatasetError(msg)
            problems.append(msg)

        stems: dict[str, str] = {}
        for p in sorted(image_dir.iterdir()):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
                continue
            if p.stem in stems:
                report(f"{p}: two images share the stem {p.stem!r} ({stems[p.stem]})")
                continue
            stems[p.stem] = p.name
        if not stems:
            raise DatasetError(f"{image_dir}: empty dataset folder (no {'/'.join(IMAGE_EXTS)} images)")
        label_stems = {p.stem for p in label_dir.glob("*.png")} if label_dir.is_dir() else set()
        for stem in sorted(label_stems - set(stems)):
            report(f"{label_dir / (stem + '.png')}: label without an image")

        csv_classes: dict[str, str] = {}
        csv_surfaces: dict[str, str] = {}
        if (root / CLASSES_CSV).is_file():
            csv_classes, csv_surfaces = _read_classes_csv(root / CLASSES_CSV)
            present = set(stems.values()) | set(stems)
            for f in sorted(csv_classes):
                if f not in present:
                    report(f"{root / CLASSES_CSV}: names {f!r}, which is not in {image_dir}")

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
                size = _decoded_size(img_path) if verify else _image_header(img_path)
                mask = read_label(lbl_path)
            except DatasetError as e:
                return str(e)
            if (mask.shape[1], mask.shape[0]) != size:
                return (f"{lbl_path}: label size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{name} ({size[0]}x{size[1]})")
            return size[1], size[0], bool(mask.any()), int(mask.max()) if mask.size else 0

        with ThreadPoolExecutor(workers or _default_workers()) as pool:
            results = list(pool.map(check, files))

        keep, classes, free, hs, ws, mx, surf = [], [], [], [], [], [], []
        for name, res in zip(files, results):
            if isinstance(res, str):
                report(res)
                continue
            h, w, has_defect, lmax = res
            c = csv_classes.get(name, csv_classes.get(Path(name).stem)) or class_from_filename(name)
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
            surf.append(csv_surfaces.get(name, csv_surfaces.get(Path(name).stem, "")))
        if problems:
            listing = "\n  ".join(problems)
            warnings.warn(f"{root}: skipped {len(problems)} bad file(s):\n  {listing}", DatasetWarning, stacklevel=2)
        if not keep:
            raise DatasetError(f"{root}: no usable image/label pairs")
        return cls(keep, classes, free, hs, ws, root=root, image_dir=image_dir, label_dir=label_dir,
                   label_max=mx, surfaces=surf if csv_surfaces else None)

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

    def class_of(self, i: int) -> str:
        return self.class_names[self.class_ids[i]]

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
        return DefectIndex(
            [self.files[i] for i in idx], [self.class_names[c] for c in self.class_ids[idx]], self.is_free[idx],
            self.heights[idx], self.widths[idx], root=self.root, image_dir=self.image_dir,
            label_dir=self.label_dir, label_max=self.label_max[idx],
            surfaces=[self.surfaces[i] for i in idx] if self.surfaces is not None else None,
        )

    def to_frame(self):
        """The index as a pandas DataFrame (see :func:`read_manifest`)."""
        import pandas as pd

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
        return h.hexdigest()[:20]


def read_manifest(root: str | os.PathLike, skip_bad: bool = False, verify: bool = True):
    """A dataset as a DataFrame: columns ``file, class, is_free, image, label, height, width``
    (plus ``surface`` when ``classes.csv`` has it); ``image``/``label`` are paths as strings."""
    return DefectIndex.scan(root, skip_bad=skip_bad, verify=verify).to_frame()


# ==========================================================================================
# the image cache
# ==========================================================================================
def _resize_pair(img: Image.Image, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear (antialiased), mask nearest, to ``size = (H, W)``."""
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return np.asarray(img, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8)


class ImageCache:
    """Images and masks decoded once, resized to ``size = (H, W)`` and kept as uint8.

    ``mode``:

    * ``"memory"`` (default): two numpy arrays ``(N, H, W, 3)`` and ``(N, H, W)`` filled in
      the constructor (threads). DataLoader workers started by ``fork`` share the pages.
    * ``"memmap"``: the same arrays as files in ``cache_dir``, named by a fingerprint of the
      index (files, sizes, mtimes) and ``size``, so a second run reuses them; workers reopen
      the files read-only (nothing is pickled but the path).
    * ``"none"``: decode on every access (no memory; for a handful of evaluation images).

    ``get(i)`` returns ``(image (H, W, 3), mask (H, W))`` uint8 views.
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
        self._paths: tuple[Path, Path] | None = None
        n, (h, w) = len(index), self.size
        if mode == "memory":
            self.images = np.empty((n, h, w, 3), dtype=np.uint8)
            self.masks = np.empty((n, h, w), dtype=np.uint8)
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
        img = _open_image(self.index.image_path(i), "RGB")
        mask = read_label(self.index.label_path(i))
        if (mask.shape[1], mask.shape[0]) != img.size:
            raise DatasetError(f"{self.index.label_path(i)}: label size {mask.shape[1]}x{mask.shape[0]} differs "
                               f"from its image {self.index.files[i]} ({img.size[0]}x{img.size[1]})")
        return _resize_pair(img, mask, self.size)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "none":
            return self.load(i)
        if self.images is None:  # a memmap cache unpickled in a worker
            self._attach()
        return self.images[i], self.masks[i]

    def _fill(self, rows, workers: int | None, progress: bool | None) -> None:
        def one(i: int) -> None:
            self.images[i], self.masks[i] = self.load(i)

        rows = list(rows)
        with ThreadPoolExecutor(workers or _default_workers()) as pool:
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


# ==========================================================================================
# counter-based random numbers: a sample's draws depend on (seed, epoch, sample) only
# ==========================================================================================
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 arrays (wrap-around arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keys(seed: int, epoch: int, samples: np.ndarray) -> np.ndarray:
    base = _mix(np.array([(int(seed) & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))
    base = _mix(base ^ np.uint64(int(epoch) & 0xFFFFFFFFFFFFFFFF))
    return _mix(base ^ np.asarray(samples, dtype=np.uint64))


def _uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per key, independent across ``stream`` numbers."""
    with np.errstate(over="ignore"):
        x = _mix(keys + _GOLDEN * np.uint64(stream + 1))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _sample_seed(seed: int, epoch: int, sample: int, stream: int) -> int:
    """A 63-bit seed for torch generators of one sample."""
    key = _keys(seed, epoch, np.array([sample], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return int(_mix(key + _GOLDEN * np.uint64(1000 + stream))[0] & np.uint64(0x7FFFFFFFFFFFFFFF))


def _pick(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """``floor(u * n)`` as int64, never reaching ``n``."""
    n = np.asarray(n, dtype=np.int64)
    return np.minimum((u * n).astype(np.int64), np.maximum(n - 1, 0))


# ==========================================================================================
# pair sampling
# ==========================================================================================
class Pair(NamedTuple):
    """One training/evaluation pair: positions into the index, and what kind it is.

    ``kind``: ``"positive"`` (same defect class), ``"negative"`` (a different defect class),
    ``"free"`` (a defect-free query with a defect prompt; its target is empty).
    ``is_negative`` is ``kind == "negative"``. ``sample``/``epoch`` seed the sample's
    palette, patch mask and augmentation.
    """

    prompt: int
    query: int
    is_negative: bool
    kind: str = "positive"
    sample: int = 0
    epoch: int = 0


class PairSampler(Sampler):
    """An endless-looking but fixed stream of :class:`Pair` drawn on the fly, O(n) memory.

    Global sample ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: a kind drawn
    with shares ``negative_share`` (different defect classes), ``free_share`` (defect-free
    query, defect prompt) and the rest positives (same defect class, prompt != query);
    positives and negatives swap prompt and query with probability ``swap_prob``. Queries
    are uniform over images (``class_balanced=False``) or over classes, then images.

    DDP: rank ``r`` of ``world_size`` takes global samples ``start + r, start + r + world_size,
    ...`` so ranks draw disjoint streams whose union is the single-process stream. With
    ``drop_last`` every rank gets ``(length - start) // world_size`` samples (equal counts,
    which DDP needs); otherwise each rank takes all of its strided samples. ``start`` (a
    global sample count, e.g. ``step * batch * world_size``) resumes mid-epoch;
    ``set_epoch(e)`` moves to epoch ``e`` and resets ``start`` to 0 unless given.
    ``fixed=True`` ignores ``set_epoch`` (validation).

    Only the pools (a few int arrays over the index) are stored: no per-pair list.
    """

    def __init__(
        self,
        index: DefectIndex,
        length: int | None = None,
        seed: int = 0,
        negative_share: float = 0.25,
        free_share: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        epoch: int = 0,
        swap_prob: float = 0.5,
        class_balanced: bool = False,
        drop_last: bool = True,
        fixed: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not (0.0 <= negative_share <= 1.0 and 0.0 <= free_share <= 1.0 and negative_share + free_share <= 1.0):
            raise ValueError(f"negative_share ({negative_share}) and free_share ({free_share}) must be shares summing to <= 1")
        self.index = index
        self.length = int(len(index) if length is None else length)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start = int(start)
        self.epoch = int(epoch)
        self.swap_prob = float(swap_prob)
        self.class_balanced = bool(class_balanced)
        self.drop_last = bool(drop_last)
        self.fixed = bool(fixed)
        self.requested = (float(negative_share), float(free_share))
        self._build_pools(index)
        neg, free = self.requested
        if neg > 0 and self.n_neg_classes < 2:
            warnings.warn(f"negative_share={neg} but the index has {self.n_neg_classes} defect class(es): "
                          "no negative pairs are drawn", DatasetWarning, stacklevel=2)
            neg = 0.0
        if free > 0 and (len(self.free_idx) == 0 or len(self.def_idx) == 0):
            warnings.warn(f"free_share={free} but the index has no defect-free images (or no defect prompts): "
                          "no free pairs are drawn", DatasetWarning, stacklevel=2)
            free = 0.0
        self.negative_share, self.free_share = neg, free
        if neg + free < 1.0 and len(self.pos_pool) == 0:
            raise DatasetError(f"{index.root or 'index'}: no defect class has two images with defects, "
                               "so no positive pair can be drawn")

    def _build_pools(self, index: DefectIndex) -> None:
        defect = np.flatnonzero(~index.is_free)
        cls = index.class_ids[defect]
        order = np.argsort(cls, kind="stable")
        self.def_idx = defect[order].astype(np.int64)  # defect images sorted by class
        self.def_cls = cls[order].astype(np.int64)  # their class ids
        n_cls = len(index.class_names)
        counts = np.bincount(self.def_cls, minlength=n_cls).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.cls_count, self.cls_start = counts, starts
        self.neg_classes = np.flatnonzero(counts >= 1)
        self.n_neg_classes = len(self.neg_classes)
        self.pos_classes = np.flatnonzero(counts >= 2)
        pos_mask = counts[self.def_cls] >= 2
        self.pos_pool = np.flatnonzero(pos_mask).astype(np.int64)  # positions into def_idx
        self.free_idx = np.flatnonzero(index.is_free).astype(np.int64)

    # -- stream -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not self.fixed:
            self.epoch = int(epoch)
        self.start = int(start)

    def __len__(self) -> int:
        remaining = max(0, self.length - self.start)
        if self.drop_last:
            return remaining // self.world_size
        return len(range(self.start + self.rank, self.length, self.world_size))

    def sample_ids(self) -> range:
        """The global sample numbers this rank draws, in order (a lazy ``range``)."""
        first = self.start + self.rank
        return range(first, first + self.world_size * len(self), self.world_size)

    def __iter__(self) -> Iterator[Pair]:
        ids = self.sample_ids()
        for lo in range(0, len(ids), 1024):
            block = ids[lo : lo + 1024]
            yield from self.draw_many(np.arange(block.start, block.stop, block.step, dtype=np.int64))

    def draw(self, sample: int, epoch: int | None = None) -> Pair:
        """Global sample ``sample`` of ``epoch`` (default: the current one)."""
        return self.draw_many(np.array([sample], dtype=np.int64), epoch)[0]

    def draw_many(self, samples: np.ndarray, epoch: int | None = None) -> list[Pair]:
        epoch = self.epoch if epoch is None else int(epoch)
        prompt, query, kind = self.draw_arrays(samples, epoch)
        return [Pair(int(p), int(q), bool(k == _KIND_NEG), KINDS[k], int(s), epoch)
                for p, q, k, s in zip(prompt.tolist(), query.tolist(), kind.tolist(), np.asarray(samples).tolist())]

    def draw_arrays(self, samples: np.ndarray, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised draw: ``(prompt, query, kind)`` int64 arrays for global ``samples``."""
        epoch = self.epoch if epoch is None else int(epoch)
        samples = np.asarray(samples, dtype=np.int64)
        keys = _keys(self.seed, epoch, samples)
        u_kind, u_q, u_p, u_swap, u_c1, u_c2 = (_uniform(keys, s) for s in range(6))
        n = len(samples)
        kind = np.full(n, _KIND_POS, dtype=np.int64)
        kind[u_kind < self.negative_share + self.free_share] = _KIND_NEG
        kind[u_kind < self.free_share] = _KIND_FREE
        prompt = np.zeros(n, dtype=np.int64)
        query = np.zeros(n, dtype=np.int64)
        n_def = len(self.def_idx)

        m = kind == _KIND_POS
        if m.any():
            if self.class_balanced:
                c = self.pos_classes[_pick(u_c1[m], len(self.pos_classes))]
                qpos = self.cls_start[c] + _pick(u_q[m], self.cls_count[c])
            else:
                qpos = self.pos_pool[_pick(u_q[m], len(self.pos_pool))]
                c = self.def_cls[qpos]
            j = _pick(u_p[m], self.cls_count[c] - 1)
            j = j + (j >= qpos - self.cls_start[c])  # skip the query itself
            query[m] = self.def_idx[qpos]
            prompt[m] = self.def_idx[self.cls_start[c] + j]

        m = kind == _KIND_NEG
        if m.any():
            if self.class_balanced:
                c = self.neg_classes[_pick(u_c1[m], self.n_neg_classes)]
                qpos = self.cls_start[c] + _pick(u_q[m], self.cls_count[c])
                k = _pick(u_c2[m], self.n_neg_classes - 1)
                rank_c = np.searchsorted(self.neg_classes, c)
                pc = self.neg_classes[k + (k >= rank_c)]
                ppos = self.cls_start[pc] + _pick(u_p[m], self.cls_count[pc])
            else:
                qpos = _pick(u_q[m], n_def)
                c = self.def_cls[qpos]
                j = _pick(u_p[m], n_def - self.cls_count[c])
                ppos = j + np.where(j >= self.cls_start[c], self.cls_count[c], 0)  # skip the query's class
            query[m] = self.def_idx[qpos]
            prompt[m] = self.def_idx[ppos]

        m = kind == _KIND_FREE
        if m.any():
            query[m] = self.free_idx[_pick(u_q[m], len(self.free_idx))]
            if self.class_balanced:
                c = self.neg_classes[_pick(u_c1[m], self.n_neg_classes)]
                ppos = self.cls_start[c] + _pick(u_p[m], self.cls_count[c])
            else:
                ppos = _pick(u_p[m], n_def)
            prompt[m] = self.def_idx[ppos]

        swap = (kind != _KIND_FREE) & (u_swap < self.swap_prob)
        prompt[swap], query[swap] = query[swap], prompt[swap].copy()
        return prompt, query, kind

    def pairs(self) -> list[Pair]:
        """This rank's pairs as a list (for small, fixed sets such as validation)."""
        return list(iter(self))


def fixed_pairs(
    index: DefectIndex,
    n_pairs: int,
    seed: int = 0,
    negative_share: float = 0.25,
    free_share: float = 0.0,
    swap_prob: float = 0.0,
    class_balanced: bool = False,
) -> list[Pair]:
    """A fixed, seeded list of ``n_pairs`` validation/test pairs (epoch 0).

    The same pairs as ``PairDataset(index, ..., train=False, length=n_pairs, seed=seed)`` with
    the same shares draws.
    """
    return PairSampler(index, n_pairs, seed, negative_share, free_share, swap_prob=swap_prob,
                       class_balanced=class_balanced, drop_last=False, fixed=True).pairs()


# ==========================================================================================
# augmentation
# ==========================================================================================
@dataclass
class AugmentConfig:
    """Joint image/mask augmentation (``torchvision.transforms.v2``), the original recipe.

    Geometric transforms hit image and mask alike (the mask with nearest-neighbour);
    photometric ones only the image. ``cache_scale`` > 1 keeps cached images larger than the
    model's input so the random resized crop has pixels to spare.
    """

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: tuple[float, float] = (0.9, 1.1)  # per-channel gain
    contrast: tuple[float, float] = (0.9, 1.1)
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.01, 0.1)
    blur_kernel: int = 3
    cache_scale: float = 1.25

    @classmethod
    def off(cls) -> "AugmentConfig":
        return cls(enabled=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown augmentation keys {sorted(unknown)}; valid keys: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Size at which to cache images for this augmentation."""
        if self.enabled and self.crop and self.cache_scale > 1:
            return tuple(int(math.ceil(s * self.cache_scale)) for s in image_size)  # type: ignore[return-value]
        return tuple(int(s) for s in image_size)  # type: ignore[return-value]


_V2_CLASSES: dict[str, type] = {}


def _v2_classes() -> dict[str, type]:
    """Our v2 transforms, defined on first use (torchvision imports slowly).

    * ``ChannelGain``: multiply each colour channel of an image by its own gain.
    * ``Resize`` / ``RandomResizedCrop``: torchvision's, except that masks are resampled
      with ``NEAREST_EXACT`` (pixel centres, like PIL). Plain ``NEAREST`` shifts a
      downscaled mask by up to half a source pixel against the bilinear image.
    """
    if not _V2_CLASSES:
        from torchvision import tv_tensors
        from torchvision.transforms import InterpolationMode, v2
        from torchvision.transforms.v2 import functional as TF

        class ChannelGain(v2.Transform):
            """Multiply each colour channel of an image by its own gain (masks untouched)."""

            def __init__(self, gain: tuple[float, float] = (0.9, 1.1)) -> None:
                super().__init__()
                self.gain = (float(gain[0]), float(gain[1]))

            def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
                lo, hi = self.gain
                return {"gain": torch.empty(3).uniform_(lo, hi)}

            def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
                if not isinstance(inpt, tv_tensors.Image):
                    return inpt
                out = inpt.float() * params["gain"].view(3, 1, 1)
                return tv_tensors.wrap(out.round_().clamp_(0, 255).to(inpt.dtype), like=inpt)

        def _interp(self, inpt: Any) -> Any:
            return InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else self.interpolation

        class Resize(v2.Resize):
            def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
                return self._call_kernel(TF.resize, inpt, self.size, interpolation=_interp(self, inpt),
                                         max_size=self.max_size, antialias=self.antialias)

        class RandomResizedCrop(v2.RandomResizedCrop):
            def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
                if isinstance(inpt, tv_tensors.Mask):  # torchvision's mask kernel forces NEAREST
                    out = TF.crop(inpt, params["top"], params["left"], params["height"], params["width"])
                    return TF.resize(out, self.size, interpolation=InterpolationMode.NEAREST_EXACT)
                return self._call_kernel(TF.resized_crop, inpt, **params, size=self.size,
                                         interpolation=self.interpolation, antialias=self.antialias)

        for c in (ChannelGain, Resize, RandomResizedCrop):
            c.__module__ = __name__
            c.__qualname__ = c.__name__
            _V2_CLASSES[c.__name__] = c
    return _V2_CLASSES


def __getattr__(name: str) -> Any:  # PEP 562: ``seggpt_lib.data.dataset.ChannelGain`` etc. (and pickling them)
    if name in ("ChannelGain", "Resize", "RandomResizedCrop"):
        return _v2_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_augment(cfg: AugmentConfig | None, image_size: tuple[int, int]):
    """The v2 pipeline for one image of a pair: ``f(Image, Mask) -> (Image, Mask)`` at
    ``image_size``. With augmentation off it only resizes (bilinear / nearest)."""
    from torchvision.transforms import v2

    k = _v2_classes()
    size = [int(image_size[0]), int(image_size[1])]
    if cfg is None or not cfg.enabled:
        return k["Resize"](size, antialias=True)
    ts: list[Any] = []
    if cfg.hflip > 0:
        ts.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ts.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.crop:
        ts.append(k["RandomResizedCrop"](size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True))
    else:
        ts.append(k["Resize"](size, antialias=True))
    if cfg.brightness and tuple(cfg.brightness) != (1.0, 1.0):
        ts.append(k["ChannelGain"](tuple(cfg.brightness)))
    if cfg.contrast and tuple(cfg.contrast) != (1.0, 1.0):
        ts.append(v2.ColorJitter(contrast=tuple(cfg.contrast)))
    if cfg.blur_prob > 0 and cfg.blur_sigma[1] > 0:
        ts.append(v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur_prob))
    return v2.Compose(ts)


# ==========================================================================================
# the dataset
# ==========================================================================================
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run a block on one torch thread, then restore the caller's setting.

    A sample is many small tensor ops: torch's intra-op pool only adds overhead to them (and
    collapses on a busy machine: 10x slower measured on 2 shared cores). Loader workers run
    on one thread already; this covers ``num_workers=0``, where the trainer's thread count
    is put back afterwards.
    """
    n = torch.get_num_threads()
    if n <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class PairDataset(Dataset):
    """Stacked prompt/query samples for SegGPT.

    Items are dicts:

    * ``imgs`` ``(3, 2H, W)`` float: prompt on top, query below, normalised with ``mean``/``std``
    * ``tgts`` ``(3, 2H, W)`` float: the coloured label pair, normalised the same way
    * ``bool_masked_pos`` ``(L,)`` bool: ``random_patch_mask(mask_ratio)`` in training (the
      query half for a ``query_mask_share`` of the samples), the query half in evaluation
    * ``valid`` ``(3, 2H, W)`` float: 1, and ``fg_weight`` on the defect pixels of the pair
    * ``seg_type`` long 0; ``labels`` ``(2H, W)`` uint8: the painted class indices (0/1 for
      binary sets); ``query_label`` ``(H, W)`` uint8: the query's own label (ground truth)
    * ``palette`` ``(n_classes, 3)`` uint8 (row 0 black); ``prompt_class``, ``query_class``,
      ``prompt_file``, ``query_file`` (str), ``is_negative`` (bool), ``kind`` (str),
      ``sample``/``epoch`` (int)

    The query half of the target: its own label for positives; for negatives its own label
    (``negative_target="query_mask"``, the original) or nothing (``"empty"``, class-aware);
    nothing for free queries. Index the dataset with the :class:`Pair` objects of
    :meth:`make_sampler` (what a DataLoader does with ``sampler=``), or with an int: global
    sample ``i`` of the current epoch (``set_epoch``). ``pairs`` fixes an explicit list
    (e.g. from a mapping JSON, see :meth:`pairs_from_mapping`); then ints index that list.
    """

    def __init__(
        self,
        index: DefectIndex,
        cfg: Any = None,
        train: bool = True,
        mask_ratio: float = 0.75,
        query_mask_share: float = 0.0,
        defect_color: Sequence[int] | None = None,
        negative_target: str = "query_mask",
        n_classes: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        fg_weight: float = 1.0,
        length: int | None = None,
        negative_share: float = 0.25,
        free_share: float = 0.0,
        swap_prob: float | None = None,
        class_balanced: bool = False,
        image_size: tuple[int, int] | None = None,
        patch_size: int | None = None,
        cache: ImageCache | None = None,
        cache_mode: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        pairs: Sequence[Pair] | None = None,
        workers: int | None = None,
    ) -> None:
        if image_size is None:
            image_size = getattr(cfg, "image_size", None) if cfg is not None else None
        if patch_size is None:
            patch_size = getattr(cfg, "patch_size", None) if cfg is not None else None
        if image_size is None or patch_size is None:
            raise ValueError("give cfg (with .image_size and .patch_size, e.g. a SegGPTConfig) or image_size and patch_size")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.patch_size = int(patch_size)
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        self.grid = (2 * h // self.patch_size, w // self.patch_size)
        if negative_target not in NEGATIVE_TARGETS:
            raise ValueError(f"negative_target must be one of {NEGATIVE_TARGETS}, got {negative_target!r}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if n_classes > 2 and len(index) and int(index.label_max.max()) >= n_classes:
            worst = int(np.argmax(index.label_max))
            raise DatasetError(f"{index.label_path(worst)}: label value {int(index.label_max[worst])} "
                               f"but n_classes={n_classes} (values must lie in 0..{n_classes - 1})")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
        self.index = index
        self.train = bool(train)
        self.mask_ratio = float(mask_ratio)
        if not 0.0 <= query_mask_share <= 1.0:
            raise ValueError(f"query_mask_share must lie in [0, 1], got {query_mask_share}")
        self.query_mask_share = float(query_mask_share)
        if defect_color is not None and (n_classes != 2 or len(defect_color) != 3):
            raise ValueError(f"defect_color {defect_color} needs a binary set (n_classes 2) and an RGB triple")
        self.defect_color = tuple(int(c) for c in defect_color) if defect_color is not None else None
        self.negative_target = negative_target
        self.n_classes = int(n_classes)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if augment is None:
            augment = AugmentConfig() if train else AugmentConfig.off()
        if not train:
            augment = AugmentConfig.off()
        self.augment = augment
        self.seed = int(seed)
        self.fg_weight = float(fg_weight)
        self.epoch = 0
        self.pairs = list(pairs) if pairs is not None else None
        self.sampler_args = dict(
            length=len(index) if length is None else int(length), seed=self.seed,
            negative_share=negative_share, free_share=free_share,
            swap_prob=(0.5 if train else 0.0) if swap_prob is None else swap_prob,
            class_balanced=class_balanced,
        )
        self._sampler = None if self.pairs is not None else PairSampler(index, fixed=not train, **self.sampler_args)
        cache_size = augment.cache_size(self.image_size)
        if cache is None:
            cache = ImageCache(index, cache_size, mode=cache_mode, cache_dir=cache_dir, workers=workers)
        elif cache.index is not index and len(cache.index) != len(index):
            raise ValueError("the cache was built for another index")
        self.cache = cache
        self._transform = None  # built on first use (in each worker)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_transform"] = None  # rebuilt in the worker
        return state

    # -- pairs ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else self.sampler_args["length"]

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by int indexing (a sampler's pairs carry their own epoch)."""
        if self.train:
            self.epoch = int(epoch)

    def make_sampler(self, rank: int = 0, world_size: int = 1, start: int = 0, drop_last: bool | None = None) -> Sampler:
        """The DataLoader sampler for this dataset's stream (``Pair`` objects), one per rank."""
        if self.pairs is not None:
            ids = list(range(rank, len(self.pairs), world_size))
            return _ListSampler([self.pairs[i] for i in ids])
        return PairSampler(self.index, rank=rank, world_size=world_size, start=start, epoch=self.epoch,
                           drop_last=self.train if drop_last is None else drop_last, fixed=not self.train,
                           **self.sampler_args)

    def pair(self, i: int) -> Pair:
        if self.pairs is not None:
            return self.pairs[i]
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside 0..{len(self) - 1}")
        return self._sampler.draw(i, self.epoch if self.train else 0)

    @staticmethod
    def pairs_from_mapping(index: DefectIndex, mapping: dict[str, Sequence[str]], top_k: int | None = None) -> list[Pair]:
        """Pairs ``(prompt, query)`` from a ``{query_file: [prompt_file, ...]}`` mapping; the kind
        is ``positive`` for the same class, ``free`` for a defect-free query, else ``negative``."""
        out: list[Pair] = []
        for q_name in sorted(mapping):
            try:
                q = index.find(q_name)
            except KeyError:
                raise DatasetError(f"mapping query {q_name!r} is not in the index") from None
            prompts = list(mapping[q_name])[: top_k if top_k else None]
            for p_name in prompts:
                try:
                    p = index.find(p_name)
                except KeyError:
                    raise DatasetError(f"mapping prompt {p_name!r} (for {q_name!r}) is not in the index") from None
                if index.is_free[q]:
                    kind = "free"
                else:
                    kind = "positive" if index.class_ids[p] == index.class_ids[q] else "negative"
                out.append(Pair(p, q, kind == "negative", kind, len(out), 0))
        return out

    # -- items --------------------------------------------------------------------------------
    def _label(self, mask: torch.Tensor) -> torch.Tensor:
        if self.n_classes == 2:
            return (mask != 0).to(torch.uint8)
        return mask.clamp_(max=self.n_classes - 1)

    def _view(self, i: int, aug_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image and its label at the model size, augmented with its own seed."""
        from torchvision import tv_tensors

        img_np, mask_np = self.cache.get(i)
        img = tv_tensors.Image(torch.from_numpy(np.array(img_np, dtype=np.uint8, copy=True)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.array(mask_np, dtype=np.uint8, copy=True))[None])
        if img.shape[-2:] == self.image_size and not self.augment.enabled:
            return img.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor)[0]
        if self._transform is None:
            self._transform = build_augment(self.augment, self.image_size)
        gen = torch.default_generator
        state = gen.get_state()
        try:  # v2 transforms draw from the global CPU generator: seed it for this view only
            gen.manual_seed(aug_seed)
            img, mask = self._transform(img, mask)
        finally:
            gen.set_state(state)
        return img.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor)[0].contiguous()

    def __getitem__(self, key: int | Pair) -> dict[str, Any]:
        with _one_thread():
            return self._item(key)

    def _item(self, key: int | Pair) -> dict[str, Any]:
        if isinstance(key, Pair):
            pair = key
        else:
            pair = self.pair(int(key))
        epoch = pair.epoch if self.train else 0
        s = pair.sample
        p_img, p_mask = self._view(pair.prompt, _sample_seed(self.seed, epoch, s, 1))
        q_img, q_mask = self._view(pair.query, _sample_seed(self.seed, epoch, s, 2))
        p_lbl, q_lbl = self._label(p_mask), self._label(q_mask)
        if pair.kind == "free" or (pair.kind == "negative" and self.negative_target == "empty"):
            q_tgt = torch.zeros_like(q_lbl)
        else:
            q_tgt = q_lbl
        labels = torch.cat([p_lbl, q_tgt], dim=0)  # (2H, W)
        gen = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, s, 0))
        palette = random_palette(self.n_classes, generator=gen)  # drawn always: keeps the stream
        if self.defect_color is not None:
            palette = fixed_palette([[0, 0, 0], list(self.defect_color)])
        if self.train:
            if self.query_mask_share > 0 and torch.rand((), generator=gen).item() < self.query_mask_share:
                masked = query_half_mask(self.grid)[0]  # the inference task itself
            else:
                masked = random_patch_mask(self.grid, self.mask_ratio, 1, generator=gen)[0]
        else:
            masked = query_half_mask(self.grid)[0]
        imgs = normalize(torch.cat([p_img, q_img], dim=1), self.mean, self.std)
        tgts = normalize(label_to_color(labels, palette), self.mean, self.std)
        valid = torch.ones_like(tgts)
        if self.fg_weight != 1.0:
            valid[:, labels > 0] = self.fg_weight
        ci = self.index.class_ids
        return {
            "imgs": imgs,
            "tgts": tgts,
            "bool_masked_pos": masked,
            "valid": valid,
            "seg_type": torch.tensor(0, dtype=torch.long),
            "labels": labels,
            "query_label": q_lbl,
            "palette": palette,
            "prompt_class": self.index.class_names[ci[pair.prompt]],
            "query_class": self.index.class_names[ci[pair.query]],
            "prompt_file": self.index.files[pair.prompt],
            "query_file": self.index.files[pair.query],
            "is_negative": bool(pair.is_negative),
            "kind": pair.kind,
            "sample": int(s),
            "epoch": int(epoch),
        }


class _ListSampler(Sampler):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # fixed pairs: nothing changes
        pass


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: tensors are stacked, strings become lists, bools/ints tensors."""
    with _one_thread():
        return default_collate(batch)


MODEL_KEYS = ("imgs", "tgts", "bool_masked_pos", "valid", "seg_type")


def model_inputs(batch: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``SegGPT.forward`` from a batch, moved to ``device``."""
    out = {k: batch[k] for k in MODEL_KEYS}
    if device is not None:
        out = {k: v.to(device, non_blocking=non_blocking) for k, v in out.items()}
    return out


# ==========================================================================================
# statistics
# ==========================================================================================
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
        im = _open_image(index.image_path(i), "RGB")
        if size is not None and max(im.size) > size:
            scale = size / max(im.size)
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float64).reshape(-1, 3) / 255.0
        return a.sum(0), (a * a).sum(0), a.shape[0]

    s = np.zeros(3)
    ss = np.zeros(3)
    n = 0
    with ThreadPoolExecutor(workers or _default_workers()) as pool:
        for a, b, c in pool.map(one, range(len(index))):
            s += a
            ss += b
            n += c
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]
