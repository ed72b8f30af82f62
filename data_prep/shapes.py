"""A generic in-context segmentation set for pretraining: shapes and textures, several per image.

Nothing here looks like a defect of :mod:`data_prep.synthetic`: the classes are plain
geometric shapes and textured patches, each drawn in a random colour on a random smooth
background, two to four classes drawn per image (one to three instances each; a class that later
objects cover down to a few pixels leaves the label, so a few images, about 0.3 %, hold one). A model that learns
to paint "the class the prompt shows, and nothing else" on this set has learned to read its
prompt before it sees a single defect; fine-tuning then teaches it what defects look like.

Classes (:data:`SHAPE_CLASSES`, label values 1..16 in this order, ``labels.txt``):

* filled shapes: ``disc``, ``square``, ``triangle``, ``star``, ``ring``, ``cross``,
  ``hexagon``, ``crescent``;
* thin or scattered: ``stroke`` (a curved line), ``zigzag``, ``dots`` (a cluster of small
  discs), ``frame`` (a square outline);
* textured blobs (an irregular outline filled with a texture of two random colours):
  ``stripes``, ``checker``, ``speckle``, ``waves``.

The colour of every object is random, so a class is its shape or texture, never its colour;
with ``class_colours`` each class has its own colours (jittered), the easier task of matching the
prompt's colour, which a small model learns first.
Masks are class-index masks (``labels/<stem>.png``, disjoint: a later object covers an earlier
one); ``n_free`` images hold no object (class ``free``). Every random number comes from a numpy
generator seeded with ``(seed, index)``: the same seed gives byte-identical files.
"""
from __future__ import annotations

import colorsys
import functools
import json
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from seggpt_lib.data.layout import LABEL_NAMES

from .common import FREE_CLASS, DataPrepError, check_output, output_dir, progress, write_classes_csv

SHAPE_CLASSES: tuple[str, ...] = (
    "disc", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent",
    "stroke", "zigzag", "dots", "frame",
    "stripes", "checker", "speckle", "waves",
)
_TEXTURED = ("stripes", "checker", "speckle", "waves")
GENERATOR_VERSION = 1
CLASS_JITTER = 0.15  # class_colours: a drawn colour moves the class's own by up to 15 % of the range


@functools.lru_cache(maxsize=1)
def class_palette() -> np.ndarray:
    """``class_colours``: each class's two colours (16 x 2 x 3, RGB 0..255, read-only): hues evenly
    spaced round the colour wheel, the second (the pattern's, textured classes) opposite the first."""
    out = np.zeros((len(SHAPE_CLASSES), 2, 3), np.float32)
    for i in range(len(SHAPE_CLASSES)):
        h = i / len(SHAPE_CLASSES)
        out[i, 0] = np.array(colorsys.hsv_to_rgb(h, 0.85, 0.9)) * 255
        out[i, 1] = np.array(colorsys.hsv_to_rgb((h + 0.5) % 1.0, 0.85, 0.45)) * 255
    out.flags.writeable = False
    return out


def _rng(seed: int, index: int, what: str = "") -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), zlib.crc32(what.encode())]))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random field: a gradient between two colours plus low-frequency noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) * rng.uniform(0.3, 1.2), 0, 1)
    c0, c1 = _colour(rng), _colour(rng)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    cells = int(rng.integers(3, 8))
    small = rng.standard_normal((cells, cells, 3)).astype(np.float32)
    noise = np.stack([np.asarray(Image.fromarray(small[..., k], mode="F").resize((size, size), Image.BICUBIC))
                      for k in range(3)], axis=-1)
    return img + noise * rng.uniform(5, 25)


def _poly(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        rr = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * np.pi * i / k
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _shape_mask(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    """One instance of ``cls`` as a boolean mask."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.08, 0.2)
    cx, cy = rng.uniform(r, size - r, 2)
    rot = rng.uniform(0, 2 * np.pi)
    w = max(1, int(round(size * rng.uniform(0.015, 0.035))))
    if cls == "disc":
        d.ellipse([cx - r, cy - r * rng.uniform(0.7, 1.0), cx + r, cy + r * rng.uniform(0.7, 1.0)], fill=255)
    elif cls == "square":
        d.polygon(_poly(cx, cy, r * 1.2, 4, rot), fill=255)
    elif cls == "triangle":
        d.polygon(_poly(cx, cy, r * 1.2, 3, rot), fill=255)
    elif cls == "star":
        d.polygon(_poly(cx, cy, r * 1.2, 5, rot, inner=0.45), fill=255)
    elif cls == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * rng.uniform(0.45, 0.65)
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif cls == "cross":
        t = r * rng.uniform(0.25, 0.4)
        for a in (rot, rot + np.pi / 2):
            ca, sa = math.cos(a), math.sin(a)
            d.polygon([(cx + ca * r - sa * t, cy + sa * r + ca * t), (cx + ca * r + sa * t, cy + sa * r - ca * t),
                       (cx - ca * r + sa * t, cy - sa * r - ca * t), (cx - ca * r - sa * t, cy - sa * r + ca * t)],
                      fill=255)
    elif cls == "hexagon":
        d.polygon(_poly(cx, cy, r * 1.1, 6, rot), fill=255)
    elif cls == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        o = r * rng.uniform(0.35, 0.6)
        d.ellipse([cx - r + o * math.cos(rot), cy - r + o * math.sin(rot), cx + r + o * math.cos(rot),
                   cy + r + o * math.sin(rot)], fill=0)
    elif cls == "stroke":
        p0, p2 = rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0.1, 0.9, 2) * size
        p1 = (p0 + p2) / 2 + rng.uniform(-0.3, 0.3, 2) * size
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        d.line([tuple(p) for p in pts], fill=255, width=w, joint="curve")
    elif cls == "zigzag":
        n = int(rng.integers(4, 8))
        ca, sa = math.cos(rot), math.sin(rot)
        pts = []
        for i in range(n + 1):
            u = (i / n - 0.5) * 2.4 * r
            v = (r * 0.4) * (1 if i % 2 else -1)
            pts.append((cx + ca * u - sa * v, cy + sa * u + ca * v))
        d.line(pts, fill=255, width=w, joint="curve")
    elif cls == "dots":
        for _ in range(int(rng.integers(4, 10))):
            px, py = cx + rng.normal(0, r * 0.6), cy + rng.normal(0, r * 0.6)
            rr = size * rng.uniform(0.015, 0.03)
            d.ellipse([px - rr, py - rr, px + rr, py + rr], fill=255)
    elif cls == "frame":
        d.polygon(_poly(cx, cy, r * 1.3, 4, rot), fill=255)
        d.polygon(_poly(cx, cy, r * 1.3 - 1.6 * w - 1, 4, rot), fill=0)
    elif cls in _TEXTURED:
        phi = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        rad = r * 1.2 * (1 + 0.25 * np.sin(2 * phi + rng.uniform(0, 6)) + 0.15 * np.sin(3 * phi + rng.uniform(0, 6)))
        d.polygon([(cx + a * math.cos(p), cy + a * math.sin(p)) for a, p in zip(rad, phi)], fill=255)
    else:
        raise DataPrepError(f"unknown shape class {cls!r} (known: {', '.join(SHAPE_CLASSES)})")
    return np.asarray(im) > 127


def _texture(rng: np.random.Generator, cls: str, size: int, class_colours: bool = False) -> np.ndarray:
    """The fill of an object: a flat random colour, or for textured classes two colours in a
    pattern. ``class_colours``: the class's own colours (:func:`class_palette`), each moved by the
    random one drawn (the same draws either way, so the shapes do not change)."""
    own = class_palette()[SHAPE_CLASSES.index(cls)] if class_colours else None

    def coloured(drawn: np.ndarray, which: int) -> np.ndarray:
        return drawn if own is None else np.clip(own[which] + CLASS_JITTER * (drawn - 127.5), 0, 255)

    c0 = _colour(rng)
    if cls not in _TEXTURED:
        return np.broadcast_to(coloured(c0, 0), (size, size, 3)).astype(np.float32)
    c1 = _colour(rng)
    while np.abs(c1 - c0).sum() < 120:  # a visible pattern
        c1 = _colour(rng)
    c0, c1 = coloured(c0, 0), coloured(c1, 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = np.cos(a) * xx + np.sin(a) * yy
    v = -np.sin(a) * xx + np.cos(a) * yy
    period = size * rng.uniform(0.04, 0.09)
    if cls == "stripes":
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif cls == "checker":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif cls == "speckle":
        t = (rng.random((size, size)) < 0.35).astype(np.float32)
    else:  # waves
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / (2 * period) + 2.0 * np.sin(2 * np.pi * v / (4 * period)))
    return (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.float32)


def render_shapes(seed: int, index: int, size: int = 128, n_classes: tuple[int, int] = (2, 4),
                  free: bool = False, class_colours: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One image (uint8 HxWx3), its class-index mask (uint8 HxW, value = place in
    :data:`SHAPE_CLASSES` + 1) and the classes it holds (in drawing order). ``free``: no object.
    ``class_colours``: every object in its class's colours (near-fixed), not a random one."""
    rng = _rng(seed, index)
    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    if free:
        classes: list[str] = []
    else:
        k = int(rng.integers(n_classes[0], n_classes[1] + 1))
        classes = [SHAPE_CLASSES[i] for i in rng.choice(len(SHAPE_CLASSES), size=k, replace=False)]
    min_px = max(4, int(0.004 * size * size))
    drawn: list[str] = []
    for cls in classes:
        value = SHAPE_CLASSES.index(cls) + 1
        for _ in range(int(rng.integers(1, 4))):
            m = _shape_mask(rng, cls, size)
            img[m] = _texture(rng, cls, size, class_colours)[m]
            label[m] = value
        drawn.append(cls)
    # a class covered by later objects down to a few pixels is dropped from the image's label
    for cls in drawn:
        v = SHAPE_CLASSES.index(cls) + 1
        if 0 < (label == v).sum() < min_px:
            label[label == v] = 0  # its pixels stay painted: too small to prompt with, not a class here
    held = [c for c in drawn if (label == SHAPE_CLASSES.index(c) + 1).any()]
    img = img + rng.normal(0, rng.uniform(1, 6), img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label, held


def generate_shapes(out_dir, n_images: int = 2000, seed: int = 0, size: int = 128, n_free: int | None = None,
                    overwrite: bool = False, show_progress: bool | None = None, class_colours: bool = False) -> Path:
    """Write the pretraining set (images/, labels/, labels.txt, classes.csv, shapes.json) to
    ``out_dir``: ``n_images`` images with two to four shape classes drawn each (see the module), plus ``n_free``
    images without objects (default: 5 % of ``n_images``). ``class_colours``: each class in its own
    colours (:func:`class_palette`, jittered): the prompt's colour then tells its class, a cue a
    small model picks up first (default: random colours, a class is its shape or texture).
    Returns the output path."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataPrepError(f"seed must be a non-negative integer, got {seed!r}")
    if size < 32:
        raise DataPrepError(f"size must be at least 32 pixels, got {size}")
    if n_images < 1:
        raise DataPrepError(f"n_images must be at least 1, got {n_images}")
    n_free = max(0, int(round(0.05 * n_images))) if n_free is None else int(n_free)
    out_dir = Path(out_dir)
    check_output(out_dir, (), overwrite)
    with output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        rows = []
        for i in progress(range(n_images + n_free), desc="shapes", total=n_images + n_free, enabled=show_progress):
            free = i >= n_images
            img, label, held = render_shapes(seed, i, size, free=free, class_colours=class_colours)
            name = f"shapes_{i:06d}.png"
            Image.fromarray(img, mode="RGB").save(tmp / "images" / name, format="PNG", compress_level=1)
            Image.fromarray(label, mode="L").save(tmp / "labels" / name, format="PNG", compress_level=6)
            rows.append({"file": name, "class": FREE_CLASS if not held else held[0], "defects": ";".join(held)})
        write_classes_csv(tmp, rows)
        (tmp / LABEL_NAMES).write_text("background\n" + "\n".join(SHAPE_CLASSES) + "\n")
        meta = {"generator": "data_prep.shapes", "version": GENERATOR_VERSION, "seed": int(seed), "size": size,
                "n_images": n_images, "n_free": n_free, "classes": list(SHAPE_CLASSES)}
        if class_colours:  # (absent otherwise: files of the random-colour set stay byte-identical)
            meta["class_colours"] = True
        (tmp / "shapes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
