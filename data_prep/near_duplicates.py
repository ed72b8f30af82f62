"""Near-duplicate photos: a perceptual hash that ignores rotations, flips and re-encoding.

Defect sets often ship the same photo several times: rotated or mirrored copies (a common
augmentation baked into the files), JPEG re-encodes, rescaled copies, or the same part shot
again under another exposure. A train/val/test split that puts two such copies on both sides
measures memory, not generalisation; :func:`data_prep.split.split_dataset` therefore merges
near-duplicates into one group (:func:`near_duplicate_groups`) before splitting.

The hash (written here with numpy and PIL only):

1. the image as grey (16-bit and float images as their values), thumbnail of
   ``THUMB x THUMB`` = 64 x 64 pixels by area averaging (the aspect ratio is dropped: a 90 degree
   rotation of a W x H photo gives exactly the transposed thumbnail); JPEG files are decoded
   at a reduced scale (PIL's ``draft``), which is fast and changes the thumbnail negligibly;
2. its 2-D DCT-II, of which the ``LOW x LOW`` = 16 x 16 lowest frequencies are kept;
3. bit ``k`` = coefficient ``k`` above the median of the 255 non-constant (AC) coefficients
   (the constant term's bit is always 0): **256 bits**, unchanged by brightness and contrast
   changes, and little changed by re-encoding, rescaling and noise, which act on high
   frequencies. Beside the bits, a *reliability mask*: bit ``k`` is reliable when its
   coefficient lies more than ``RELIABLE`` (0.05) x the RMS of the AC coefficients away from
   the median. In a smooth or small image most high-frequency coefficients are near zero and
   their bits are noise that a JPEG re-encode flips; they are left out of the comparison;
4. this is done for the **8 dihedral transforms** of the thumbnail (4 rotations, each plain and
   mirrored): :func:`hash_variants` returns the 8 (bits, mask) pairs, :func:`image_hash` the
   smallest bits (the *canonical* hash, the same for the 8 rotated/flipped copies of a photo).

The distance of two images (:func:`hash_distance`): the Hamming distance over the bits reliable
in both, scaled to 256 bits (``differing x 256 / common``; two images sharing fewer than
``MIN_COMMON`` = 32 reliable bits are not compared), the smallest between one image's 8 variants
and the other as it is, taken both ways round. A rotated, flipped and re-encoded copy is thus as
close as a re-encoded one (comparing canonical hashes alone would not be robust: a few flipped
bits can change which variant is the smallest).

Measured (largest distance of a copy rotated or mirrored and re-saved as JPEG quality 30-90, or
shrunk to 60 % and re-saved as JPEG 60; smallest distance between unrelated images): magnetic
-tile photos (grey, low contrast) 0-2 vs about 60 and more between different tiles; synthetic
256 px images 0-8 vs 71; random textures 0-18 vs 93; smooth blobs 0-4 vs 44; synthetic 64 px
images shrunk to 38 px 26 (the worst case), else 0-23, vs 74. :data:`DEFAULT_DISTANCE` = 24
therefore merges re-encoded, rescaled, rotated and mirrored copies with a wide margin to
unrelated images. The magnetic-tile set also holds up to 6 exposures of each tile, most of them
within 24 of each other: they are merged too (a real leak: the same part in train and test).
An image whose thumbnail is flat (no AC energy: a blank image) gets no hash and is never merged.

Cost: one reduced decode per image (threads) and ``16 N^2`` 256-bit comparisons, vectorised
in blocks: about 1 s for 700 images and 7 s for 3,500 (one core), fine for a few thousand.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from seggpt_lib.data.layout import DatasetError, default_workers

__all__ = [
    "DEFAULT_DISTANCE", "HASH_BITS", "LOW", "MIN_COMMON", "RELIABLE", "THUMB", "UnionFind", "dihedral", "hamming",
    "hash_distance", "hash_files", "hash_variants", "image_hash", "near_duplicate_groups", "near_duplicate_pairs",
    "thumbnail",
]

THUMB = 64               # thumbnail side (pixels)
LOW = 16                 # the LOW x LOW lowest DCT frequencies make the hash
HASH_BITS = LOW * LOW    # 256
RELIABLE = 0.05          # a bit is reliable when its coefficient is this many RMS (of the AC terms) off the median
MIN_COMMON = 32          # fewer common reliable bits than this: the two images are not compared (never merged)
DEFAULT_DISTANCE = 24    # near-duplicates: at most this distance (differing reliable bits, scaled to 256)
_BLOCK = 16              # rows per block of the pairwise comparison (memory: about _BLOCK * N * 8 * 100 bytes)


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` is the DCT of the column ``x``."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT_LOW = _dct_matrix(THUMB)[:LOW]  # (LOW, THUMB): only the low frequencies are computed


def dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations/flips of a 2-D array: ``rot90(a, k)`` and its mirror, for k = 0..3 (the
    first is ``a`` itself)."""
    out = []
    for k in range(4):
        r = np.rot90(a, k)
        out += [r, r[:, ::-1]]
    return out


def _grey(im: Image.Image) -> Image.Image:
    """A float (``F``) grey image: 16/32-bit and float images by their values, others as ``L``."""
    if im.mode in ("F", "I") or im.mode.startswith("I;"):
        return Image.fromarray(np.asarray(im, dtype=np.float32), mode="F")
    if im.mode != "L":
        im = im.convert("RGBA").convert("L") if im.mode in ("P", "PA") else im.convert("L")
    return im.convert("F")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("L", (2 * THUMB, 2 * THUMB))  # decode at 1/2..1/8 scale: at least 128 px a side
            im.load()
            return _grey(im)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


@lru_cache(maxsize=64)
def _area_matrix(n: int) -> np.ndarray:
    """``(THUMB, n)`` weights of area averaging from ``n`` pixels to ``THUMB``: output ``i``
    averages the input over ``[i n/THUMB, (i+1) n/THUMB)`` (fractional pixels by their share);
    made exactly mirror-symmetric, so a flipped image gives the flipped thumbnail."""
    edges = np.arange(THUMB + 1) * (n / THUMB)
    x = np.arange(n)
    lo = np.maximum(edges[:-1, None], x[None, :])
    hi = np.minimum(edges[1:, None], x[None, :] + 1)
    r = np.clip(hi - lo, 0.0, None) / (n / THUMB)
    return (r + r[::-1, ::-1]) / 2


def thumbnail(image) -> np.ndarray:
    """``(THUMB, THUMB)`` float64 grey thumbnail of an image (a path, a PIL image, or an
    ``(H, W[, C])`` array), by area averaging (exactly: a rotated or flipped image gives the
    rotated or flipped thumbnail, up to rounding)."""
    if isinstance(image, (str, os.PathLike)):
        a = np.asarray(_open(Path(image)), dtype=np.float64)
    elif isinstance(image, Image.Image):
        a = np.asarray(_grey(image), dtype=np.float64)
    else:
        a = np.asarray(image, dtype=np.float64)
        if a.ndim == 3:  # colour: luma (ITU-R 601, as PIL's "L"); one channel: as it is
            a = a[..., :3] @ np.array([0.299, 0.587, 0.114]) if a.shape[2] >= 3 else a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {np.shape(image)}")
    return _area_matrix(a.shape[0]) @ a @ _area_matrix(a.shape[1]).T


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits).view(">u8").astype(np.uint64)


def _bits(t: np.ndarray) -> np.ndarray | None:
    """``(2, 4)`` uint64 of one thumbnail: its 256 hash bits and their reliability mask
    (None: a flat thumbnail)."""
    c = (_DCT_LOW @ t @ _DCT_LOW.T).ravel()
    ac = c[1:]
    rms = float(np.sqrt(np.mean(ac * ac)))
    if not np.isfinite(rms) or rms <= 1e-9 * (1.0 + abs(float(c[0]))):
        return None
    dev = ac - np.median(ac)
    # a coefficient equal to the median up to rounding (symmetric images have exact zeros) counts as below
    on = dev > 1e-7 * rms
    sure = np.abs(dev) > RELIABLE * rms
    return np.stack([_pack(np.concatenate([[False], on])),     # bit 0, the constant term: always 0 ...
                     _pack(np.concatenate([[False], sure]))])  # ... and never reliable


def hash_variants(image) -> np.ndarray | None:
    """``(8, 2, 4)`` uint64: for each of the 8 dihedral transforms of an image (row 0: the image
    as it is), its 256 hash bits (``[t, 0]``) and their reliability mask (``[t, 1]``); None for a
    flat image. ``image``: a path, a PIL image or an array. See the module docstring."""
    rows = [_bits(np.ascontiguousarray(v)) for v in dihedral(thumbnail(image))]
    if any(r is None for r in rows):
        return None
    return np.stack(rows)


def _hex(words: np.ndarray) -> str:
    return np.asarray(words, dtype=np.uint64).astype(">u8").tobytes().hex()


def image_hash(image) -> str | None:
    """The canonical hash of an image as 64 hex digits: the smallest of its 8 variant hashes
    (bits only), so the same for every rotation and flip of it (None for a flat image)."""
    v = hash_variants(image)
    return None if v is None else min(_hex(r[0]) for r in v)


if hasattr(np, "bitwise_count"):
    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)
else:  # pragma: no cover - numpy < 2.0
    _BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
        return _BYTE_BITS[b].sum(-1, dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Bits that differ between two 256-bit hashes (``(4,)`` uint64 words each)."""
    return int(_popcount(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))).sum())


def _scaled(diff: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Differing reliable bits scaled to 256 (float); no comparison (inf) under MIN_COMMON common bits."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(common >= MIN_COMMON, diff * (HASH_BITS / np.maximum(common, 1)), np.inf)


def _one_way(a: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """Distance of each of ``a``'s variants ``(..., 8, 2, W)`` to plain hashes ``b0 (..., 2, W)``
    (broadcast), the smallest over the variants."""
    both = np.bitwise_and(a[..., 1, :], b0[..., 1, :])
    diff = _popcount(np.bitwise_and(np.bitwise_xor(a[..., 0, :], b0[..., 0, :]), both)).sum(-1, dtype=np.uint16)
    common = _popcount(both).sum(-1, dtype=np.uint16)
    return _scaled(diff, common).min(axis=-1)


def hash_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The rotation/flip-invariant distance of two images from their :func:`hash_variants`: the
    differing bits among those reliable in both, scaled to 256 bits, between a variant of one
    and the other as it is (the smallest, both ways round); inf when they share fewer than
    ``MIN_COMMON`` reliable bits."""
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    return min(float(_one_way(a, b[0])), float(_one_way(b, a[0])))


def hash_files(paths: Sequence[str | os.PathLike], workers: int | None = None) -> list[np.ndarray | None]:
    """:func:`hash_variants` of every file (threads; :class:`DatasetError` naming an unreadable one)."""
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    with ThreadPoolExecutor(max(1, min(workers or default_workers(), len(paths)))) as pool:
        return list(pool.map(hash_variants, paths))


def near_duplicate_pairs(hashes: Sequence[np.ndarray | None], max_distance: float = DEFAULT_DISTANCE
                         ) -> list[tuple[int, int, int]]:
    """Every pair ``(i, j, distance)`` (``i < j``, sorted; the distance rounded to an integer)
    of images within ``max_distance`` (:func:`hash_distance`); images without a hash (None) are
    never paired. Vectorised in blocks of rows: ``16 N^2`` comparisons of 256 bits."""
    max_distance = float(max_distance)
    if max_distance < 0:
        raise ValueError(f"max_distance must not be negative, got {max_distance}")
    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if idx.size < 2:
        return []
    var = np.stack([hashes[i] for i in idx]).astype(np.uint64)  # (M, 8, 2, W)
    plain = np.ascontiguousarray(var[:, 0])                      # (M, 2, W)
    m = len(idx)
    best: dict[tuple[int, int], float] = {}
    for start in range(0, m, _BLOCK):
        block = var[start:start + _BLOCK]                        # (B, 8, 2, W)
        d = _one_way(block[:, None], plain[None, :, None])      # (B, M): a variant of row i vs plain j
        rows, cols = np.nonzero(d <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if i == c:
                continue
            key = (i, c) if i < c else (c, i)
            dist = float(d[r, c])
            if dist < best.get(key, np.inf):
                best[key] = dist
    return sorted((int(idx[i]), int(idx[j]), int(round(dist))) for (i, j), dist in best.items())


class UnionFind:
    """Disjoint sets over hashable items (path halving, union by size)."""

    def __init__(self, items: Iterable = ()) -> None:
        self.parent: dict = {}
        self.size: dict = {}
        for it in items:
            self.add(it)

    def add(self, item) -> None:
        if item not in self.parent:
            self.parent[item] = item
            self.size[item] = 1

    def find(self, item):
        self.add(item)
        p = self.parent
        while p[item] != item:
            p[item] = p[p[item]]
            item = p[item]
        return item

    def union(self, a, b) -> bool:
        """Join the sets of ``a`` and ``b``; whether they were apart."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def sets(self) -> list[list]:
        """The sets, each sorted, in order of their smallest item (items must be sortable)."""
        out: dict = {}
        for it in self.parent:
            out.setdefault(self.find(it), []).append(it)
        return sorted((sorted(v) for v in out.values()), key=lambda s: s[0])


def near_duplicate_groups(paths: Sequence[str | os.PathLike], max_distance: float = DEFAULT_DISTANCE,
                          workers: int | None = None) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Hash ``paths`` and join the images within ``max_distance`` of each other transitively
    (union-find). Returns ``(groups, pairs)``: the groups of two or more images (positions into
    ``paths``, sorted) and the close pairs ``(i, j, distance)`` that formed them."""
    pairs = near_duplicate_pairs(hash_files(paths, workers), max_distance)
    uf = UnionFind()
    for i, j, _ in pairs:
        uf.union(i, j)
    return [g for g in uf.sets() if len(g) > 1], pairs
