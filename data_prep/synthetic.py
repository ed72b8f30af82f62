"""Deterministic synthetic industrial-surface defects with pixel-exact masks.

Two surface families:

* ``pcb``: green laminate with a fibre-glass weave, copper traces and drilled pads at a random
  pitch, width and orientation. Defects: ``open`` (dark gap cut across one to three traces),
  ``short`` (silver solder bridge between two neighbouring traces), ``spur`` (bright copper
  spike growing from a trace edge), ``mouse_bite`` (pale semicircular bites in a trace edge),
  ``spurious_copper`` (isolated dark-oxidised copper blob on bare laminate).
* ``metal``: brushed, turned or blasted metal / ceramic with a lighting gradient and a
  specular highlight. Defects: ``scratch`` (long thin bright curve), ``pit`` (cluster of
  round dark holes with a lit rim), ``crack`` (near-black jagged branching line), ``stain``
  (large soft rust-brown blotch).

Plus defect-free images of both families (class ``free``). The mask of a defect image is the
set of pixels the defect changed (before the final slight blur and sensor noise), so it is
exact at the geometry level. Every random number comes from a numpy generator seeded with
``(seed, crc32(class), index)``: the same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from seggpt_lib.data.layout import LABEL_NAMES

from .common import FREE_CLASS, DataPrepError, check_output, output_dir, progress, write_classes_csv

FAMILIES: dict[str, tuple[str, ...]] = {
    "pcb": ("open", "short", "spur", "mouse_bite", "spurious_copper"),
    "metal": ("scratch", "pit", "crack", "stain"),
}
DEFECT_CLASSES: tuple[str, ...] = tuple(c for cs in FAMILIES.values() for c in cs)
SURFACE_OF: dict[str, str] = {c: fam for fam, cs in FAMILIES.items() for c in cs}
GENERATOR_VERSION = 1


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _rng_for(seed: int, cls: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(cls.encode()), index]))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise, roughly unit std, shape (size, size)."""
    cells = max(2, int(cells))
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    im = Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _blank(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("L", (size, size), 0)
    return im, ImageDraw.Draw(im)


def _to_bool(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8) > 127


def _blob_points(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 28,
                 rough: float = 0.35, aspect: float = 1.0, angle: float = 0.0) -> list[tuple[float, float]]:
    """An irregular closed outline around (cx, cy) of mean radius r."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in range(2, 6):
        rad += rough / k * rng.uniform(-1, 1) * np.sin(k * phi + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.35, None) * r
    x, y = rad * np.cos(phi) * aspect, rad * np.sin(phi)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + ca * a - sa * b, cy + sa * a + ca * b) for a, b in zip(x, y)]


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(size, dtype=np.float32)
    return r[None, :], r[:, None]


def _wave(xx: np.ndarray, yy: np.ndarray, kx: float, ky: float) -> np.ndarray:
    """sin(kx * x + ky * y) on the grid, computed from 1-D factors (cheap)."""
    kx, ky = np.float32(kx), np.float32(ky)
    return np.sin(kx * xx) * np.cos(ky * yy) + np.cos(kx * xx) * np.sin(ky * yy)


def _lighting(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Multiplicative illumination field: linear gradient + soft specular blob + vignette."""
    xx, yy = _coords(size)
    a = rng.uniform(0, 2 * np.pi)
    grad = ((xx - size / 2) * math.cos(a) + (yy - size / 2) * math.sin(a)) / size
    light = 1.0 + strength * rng.uniform(0.4, 1.0) * 2 * grad
    cx, cy = rng.uniform(-0.2, 1.2, 2) * size
    sig = rng.uniform(0.25, 0.6) * size
    light += rng.uniform(0.0, 0.22) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig * sig))
    r2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size * size / 2)
    light *= 1.0 - rng.uniform(0.0, 0.12) * r2
    return light.astype(np.float32)


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Slight optical blur and sensor noise; returns uint8 RGB."""
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    # 3x3 Gaussian-like kernel; sigma about 0.35..0.8 px
    e = math.exp(-1.0 / (2 * rng.uniform(0.35, 0.8) ** 2))
    im = im.filter(ImageFilter.Kernel((3, 3), [e * e, e, e * e, e, 1.0, e, e * e, e, e * e]))
    out = np.asarray(im, dtype=np.float32)
    sigma = np.float32(rng.uniform(1.5, 5.0))
    out = out + sigma * rng.standard_normal(out.shape[:2], dtype=np.float32)[..., None]
    np.rint(out, out=out)
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# PCB
# --------------------------------------------------------------------------------------------
class _PcbLayout:
    """Parallel traces with pads, drawn in a local frame (x along traces) that is rotated and
    shifted onto the canvas."""

    def __init__(self, rng: np.random.Generator, size: int):
        k = size / 256
        self.size = size
        s = rng.uniform(0.85, 1.4)
        self.w = 13.0 * s * k                                   # trace width
        self.gap = self.w * rng.uniform(1.2, 2.2)               # copper-to-copper clearance
        self.pitch = self.w + self.gap
        self.rp = min(0.5 * self.w + 0.4 * self.gap, 1.15 * self.w)   # pad radius
        base = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
        self.theta = math.radians(base + rng.uniform(-7, 7))
        self.c = np.array([size / 2, size / 2]) + rng.uniform(-0.1, 0.1, 2) * size
        half = 0.8 * size
        n = int(math.ceil(half / self.pitch)) + 1
        off = rng.uniform(0, self.pitch)
        self.slots: dict[int, list[tuple[float, float]]] = {}   # slot -> segments (x0, x1)
        self.pads: list[tuple[float, float]] = []               # (x, y) local
        for j in range(-n, n + 1):
            if rng.random() > 0.8:
                continue
            segs = []
            x = -half
            while x < half:
                if rng.random() < 0.45:
                    length = rng.uniform(0.3, 1.0) * size
                    x_end = x + length
                    if x_end < half:
                        segs.append((x, x_end))
                        self.pads.append((x_end, self.y(j)))
                        x = x_end + rng.uniform(2.6, 6.0) * self.rp
                        self.pads.append((x, self.y(j)))
                        continue
                segs.append((x, half))
                break
            self.slots[j] = segs
        self._off = off

    def y(self, j: int) -> float:
        return j * self.pitch

    def to_world(self, pts) -> list[tuple[float, float]]:
        ca, sa = math.cos(self.theta), math.sin(self.theta)
        return [(self.c[0] + ca * x - sa * y, self.c[1] + sa * x + ca * y) for x, y in pts]

    def to_local(self, p) -> tuple[float, float]:
        ca, sa = math.cos(self.theta), math.sin(self.theta)
        dx, dy = p[0] - self.c[0], p[1] - self.c[1]
        return ca * dx + sa * dy, -sa * dx + ca * dy

    def covers(self, j: int, x: float, margin: float = 0.0) -> bool:
        return any(a + margin <= x <= b - margin for a, b in self.slots.get(j, []))

    def rect(self, x0: float, x1: float, y0: float, y1: float) -> list[tuple[float, float]]:
        return self.to_world([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])

    def draw_copper(self) -> tuple[np.ndarray, np.ndarray]:
        im, d = _blank(self.size)
        holes, dh = _blank(self.size)
        for j, segs in self.slots.items():
            for a, b in segs:
                d.polygon(self.rect(a, b, self.y(j) - self.w / 2, self.y(j) + self.w / 2), fill=255)
        for (cx, cy), in zip(self.to_world(self.pads)):
            r = self.rp
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            rh = 0.38 * r
            dh.ellipse([cx - rh, cy - rh, cx + rh, cy + rh], fill=255)
        return _to_bool(im), _to_bool(holes)

    def random_spot(self, rng: np.random.Generator, lo: float = 0.2, hi: float = 0.8) -> tuple[float, float]:
        return self.to_local(rng.uniform(lo, hi, 2) * self.size)

    def in_view(self, x: float, y: float, margin: float = 0.1) -> bool:
        (wx, wy), = self.to_world([(x, y)])
        return margin * self.size <= wx <= (1 - margin) * self.size and margin * self.size <= wy <= (1 - margin) * self.size


def _pcb_colours(rng: np.random.Generator) -> dict[str, np.ndarray]:
    green = np.array([rng.uniform(25, 55), rng.uniform(95, 135), rng.uniform(45, 80)])
    copper = np.array([rng.uniform(195, 225), rng.uniform(135, 160), rng.uniform(70, 95)])
    return {"substrate": green.astype(np.float32), "copper": copper.astype(np.float32)}


def _pcb_defect(rng: np.random.Generator, lay: _PcbLayout, cls: str, copper: np.ndarray):
    """Return (removed, added, defect_mask, kind) boolean arrays for one defect."""
    size = lay.size
    w, gap = lay.w, lay.gap
    im, d = _blank(size)
    for _ in range(60):
        x, y = lay.random_spot(rng)
        j = int(round(y / lay.pitch))
        if cls == "open":
            if not lay.covers(j, x, margin=2 * w):
                continue
            n = int(rng.choice([1, 2, 2, 3, 3]))
            js = [j]
            while len(js) < n and lay.covers(js[-1] + 1, x, margin=2 * w):
                js.append(js[-1] + 1)
            g = w * rng.uniform(1.3, 4.0)
            sl = w * rng.uniform(-0.4, 0.4)
            y0, y1 = lay.y(js[0]) - 0.7 * w, lay.y(js[-1]) + 0.7 * w
            d.polygon(lay.to_world([(x, y0), (x + g, y0), (x + g + sl, y1), (x + sl, y1)]), fill=255)
            cut = _to_bool(im)
            removed = cut & copper
            return removed, None, removed
        if cls == "mouse_bite":
            if not lay.covers(j, x, margin=3 * w):
                continue
            nb = int(rng.integers(3, 7))
            r = w * rng.uniform(0.55, 0.9)
            both = rng.random() < 0.4
            xs = x
            for b in range(nb):
                side = (1 if b % 2 else -1) if both else 1
                cy = lay.y(j) + side * w / 2
                (cx, cyw), = lay.to_world([(xs, cy)])
                rr = r * rng.uniform(0.75, 1.15)
                d.ellipse([cx - rr, cyw - rr, cx + rr, cyw + rr], fill=255)
                xs += rr * rng.uniform(1.3, 2.2)
            removed = _to_bool(im) & copper
            return removed, None, removed
        if cls == "short":
            if not (lay.covers(j, x, margin=w) and lay.covers(j + 1, x, margin=w)):
                continue
            b = w * rng.uniform(1.0, 3.0)
            ya, yb = lay.y(j), lay.y(j + 1)
            n_side = 5
            left = [(x - b / 2 + rng.uniform(-0.25, 0.25) * b, ya + (yb - ya) * t) for t in np.linspace(0, 1, n_side)]
            right = [(x + b / 2 + rng.uniform(-0.25, 0.25) * b, yb - (yb - ya) * t) for t in np.linspace(0, 1, n_side)]
            d.polygon(lay.to_world(left + right), fill=255)
            added = _to_bool(im)
            return None, added, added
        if cls == "spur":
            if not lay.covers(j, x, margin=w):
                continue
            side = 1 if rng.random() < 0.5 else -1
            room = gap if (j + side) in lay.slots else 2.0 * gap
            # a jagged burr along the trace edge with one to four teeth
            teeth = int(rng.integers(1, 5))
            base = w * rng.uniform(1.1, 1.8) * teeth
            edge = lay.y(j) + side * w * 0.3
            top = lay.y(j) + side * w / 2
            pts = [(x - base / 2, edge)]
            xs = np.linspace(x - base / 2, x + base / 2, 2 * teeth + 1)
            for t, xt in enumerate(xs):
                if t % 2:   # tooth tip
                    h = room * rng.uniform(0.55, 0.9)
                    pts.append((xt + rng.uniform(-0.3, 0.3) * base / teeth, top + side * h))
                else:       # valley between teeth
                    pts.append((xt, top + side * room * rng.uniform(0.1, 0.3)))
            pts.append((x + base / 2, edge))
            d.polygon(lay.to_world(pts), fill=255)
            added = _to_bool(im) & ~copper
            return None, added, added
        if cls == "spurious_copper":
            r = w * rng.uniform(0.9, 2.4)
            for _t in range(40):
                (cx, cy) = rng.uniform(0.18, 0.82, 2) * size
                probe, dp = _blank(size)
                dp.ellipse([cx - 1.15 * r, cy - 1.15 * r, cx + 1.15 * r, cy + 1.15 * r], fill=255)
                if not (_to_bool(probe) & copper).any():
                    break
                r *= 0.93
            nblob = int(rng.choice([1, 1, 1, 2]))
            for _b in range(nblob):
                d.polygon(_blob_points(rng, cx, cy, r, rough=0.5, aspect=rng.uniform(0.6, 1.4),
                                       angle=rng.uniform(0, np.pi)), fill=255)
                cx += rng.uniform(-1.5, 1.5) * r
                cy += rng.uniform(-1.5, 1.5) * r
                r *= 0.6
            added = _to_bool(im) & ~copper
            return None, added, added
        raise DataPrepError(f"unknown pcb defect class {cls!r}")
    return None, None, np.zeros((size, size), bool)


def _render_pcb(rng: np.random.Generator, size: int, classes: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    lay = _PcbLayout(rng, size)
    copper, holes = lay.draw_copper()
    col = _pcb_colours(rng)
    xx, yy = _coords(size)
    # laminate: mottling + fibre-glass weave in the board frame
    ca, sa = math.cos(lay.theta), math.sin(lay.theta)
    f = 2 * np.pi / (rng.uniform(5, 9) * size / 256)
    weave = _wave(xx, yy, f * ca, f * sa) * _wave(xx, yy, -f * sa, f * ca)
    sub_tex = 1 + 0.07 * _smooth_noise(rng, size, 6) + 0.04 * weave
    img = col["substrate"][None, None, :] * sub_tex[..., None]
    f = 2 * np.pi / rng.uniform(12, 30)
    cu_tex = 1 + 0.06 * _smooth_noise(rng, size, 10) + 0.03 * _wave(xx, yy, f * ca, f * sa)
    cu_img = col["copper"][None, None, :] * cu_tex[..., None]

    masks = []
    final_copper = copper.copy()
    for cls in classes:  # each defect cut from / added to the board as drawn before it
        removed, _added, mask = _pcb_defect(rng, lay, cls, copper)
        if removed is not None:
            final_copper &= ~removed
        masks.append(mask)
    img = np.where(final_copper[..., None], cu_img, img)
    img[holes & final_copper] = np.array([30.0, 28.0, 24.0]) * rng.uniform(0.8, 1.3)
    for cls, mask in zip(classes, masks):  # painted in order: a later defect covers an earlier one
        if cls == "open":
            img[mask] = img[mask] * np.array([0.45, 0.4, 0.38])                 # dark charred gap
        elif cls == "mouse_bite":
            pale = np.array([rng.uniform(180, 205), rng.uniform(195, 215), rng.uniform(150, 175)])
            img[mask] = pale * (1 + 0.05 * rng.standard_normal((int(mask.sum()), 1)))  # bare laminate
        elif cls == "short":
            solder = np.array([205.0, 208.0, 212.0]) * rng.uniform(0.9, 1.05)
            shade = 1 + 0.12 * _smooth_noise(rng, size, 24)
            img[mask] = solder * shade[mask][:, None]                            # silver solder bridge
        elif cls == "spur":
            pink = np.array([rng.uniform(235, 250), rng.uniform(150, 170), rng.uniform(130, 150)])
            img[mask] = pink * (0.9 + 0.1 * cu_tex[mask][:, None])                # fresh salmon copper
        elif cls == "spurious_copper":
            ox = np.array([rng.uniform(125, 150), rng.uniform(65, 85), rng.uniform(40, 55)])
            img[mask] = ox * (1 + 0.08 * _smooth_noise(rng, size, 16)[mask][:, None])  # oxidised blob
    img = img * (_lighting(rng, size, 0.18) * rng.uniform(0.85, 1.1))[..., None]
    return _finish(rng, img), masks


# --------------------------------------------------------------------------------------------
# metal / ceramic
# --------------------------------------------------------------------------------------------
def _metal_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.choice(["brushed", "turned", "blasted"])
    if kind == "brushed":
        big = int(math.ceil(size * 1.45))
        streak = rng.standard_normal((big, max(2, big // int(rng.integers(8, 24))))).astype(np.float32)
        tex = np.asarray(Image.fromarray(streak, mode="F").resize((big, big), Image.BICUBIC))
        tex = 0.6 * tex + 0.8 * rng.standard_normal((big, 1)).astype(np.float32)
        im = Image.fromarray(tex.astype(np.float32), mode="F").rotate(rng.uniform(0, 180), Image.BILINEAR)
        o = (big - size) // 2
        tex = np.asarray(im, dtype=np.float32)[o:o + size, o:o + size]
        amp = rng.uniform(0.04, 0.08)
    elif kind == "turned":
        xx, yy = _coords(size)
        cx, cy = rng.uniform(-1.0, 2.0, 2) * size
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        step = rng.uniform(1.0, 2.0)
        knots = rng.standard_normal(int(r.max() / step) + 2)
        tex = np.interp(r, np.arange(knots.size) * step, knots).astype(np.float32)
        tex += 0.6 * np.sin(2 * np.pi * r / rng.uniform(3, 7)).astype(np.float32)
        amp = rng.uniform(0.03, 0.06)
    else:
        tex = 0.6 * _smooth_noise(rng, size, size // 3) + 0.8 * rng.standard_normal((size, size)).astype(np.float32)
        amp = rng.uniform(0.03, 0.06)
    return 1 + amp * tex + 0.05 * _smooth_noise(rng, size, 5)


def _metal_defect(rng: np.random.Generator, size: int, cls: str):
    """Return (mask, alpha) for one defect; alpha (float, None for hard masks) modulates stain."""
    k = size / 256
    im, d = _blank(size)
    if cls == "scratch":
        n = int(rng.choice([1, 1, 1, 2, 3]))
        for _ in range(n):
            L = size * rng.uniform(0.35, 0.95)
            a = rng.uniform(0, np.pi)
            c = rng.uniform(0.3, 0.7, 2) * size
            p0 = c - 0.5 * L * np.array([math.cos(a), math.sin(a)])
            p2 = c + 0.5 * L * np.array([math.cos(a), math.sin(a)])
            p1 = c + rng.uniform(-0.25, 0.25) * L * np.array([-math.sin(a), math.cos(a)])
            t = np.linspace(0, 1, 32)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
            width = max(2, int(round(rng.uniform(2.5, 6.5) * k)))
            d.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
        return _to_bool(im), None
    if cls == "crack":
        def walk(p, a, length, width):
            step = size * 0.025
            pts = [tuple(p)]
            for _ in range(max(2, int(length / step))):
                a += rng.normal(0, 0.45)
                p = p + step * np.array([math.cos(a), math.sin(a)])
                pts.append(tuple(p))
            for i in range(len(pts) - 1):
                wdt = max(1, int(round(width * (1 - 0.6 * i / len(pts)))))
                d.line([pts[i], pts[i + 1]], fill=255, width=wdt, joint="curve")
            return pts
        width = rng.uniform(4.5, 8.0) * k
        main = walk(rng.uniform(0.25, 0.75, 2) * size, rng.uniform(0, 2 * np.pi),
                    size * rng.uniform(0.4, 0.85), width)
        for _ in range(int(rng.integers(1, 4))):
            start = np.array(main[int(rng.integers(1, len(main)))])
            walk(start, rng.uniform(0, 2 * np.pi), size * rng.uniform(0.08, 0.25), width * 0.6)
        return _to_bool(im), None
    if cls == "pit":
        n = int(rng.integers(1, 7))
        c = rng.uniform(0.25, 0.75, 2) * size
        spread = size * rng.uniform(0.04, 0.14)
        big = rng.random() < 0.8
        for _ in range(n):
            r = (rng.uniform(6, 15) if big else rng.uniform(2.5, 6)) * k
            if n > 3:
                r *= 0.8
            p = c + rng.normal(0, spread, 2)
            d.polygon(_blob_points(rng, p[0], p[1], r, n=20, rough=0.25), fill=255)
        return _to_bool(im), None
    if cls == "stain":
        r = size * rng.uniform(0.08, 0.24)
        c = rng.uniform(0.3, 0.7, 2) * size
        d.polygon(_blob_points(rng, c[0], c[1], r, n=36, rough=0.7, aspect=rng.uniform(0.6, 1.5),
                               angle=rng.uniform(0, np.pi)), fill=255)
        soft = im.filter(ImageFilter.GaussianBlur(max(1.0, r * 0.18)))
        alpha = np.asarray(soft, dtype=np.float32) / 255.0
        return alpha >= 0.5, alpha
    raise DataPrepError(f"unknown metal defect class {cls!r}")


def _render_metal(rng: np.random.Generator, size: int, classes: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    grey = rng.uniform(95, 160)
    tint = [np.array([0.96, 1.0, 1.06]), np.array([1.0, 1.0, 1.0]), np.array([1.06, 1.02, 0.94]),
            np.array([1.03, 1.0, 0.97])][int(rng.integers(0, 4))]
    tex = _metal_texture(rng, size)
    base = (grey * tint).astype(np.float32)[None, None, :] * tex[..., None].astype(np.float32)
    light = _lighting(rng, size, 0.22)
    img = base * light[..., None]
    masks = []
    for cls in classes:  # painted in order: a later defect covers an earlier one
        mask, alpha = _metal_defect(rng, size, cls)
        masks.append(mask)
        if cls == "scratch":
            img[mask] = np.minimum(img[mask] * 0.5 + rng.uniform(150, 190), 250)          # bright groove
        elif cls == "crack":
            img[mask] = img[mask] * rng.uniform(0.12, 0.25)                               # near-black
        elif cls == "pit":
            g = _smooth_noise(rng, size, max(4, size // 12))
            a = rng.uniform(0, 2 * np.pi)
            rim = (np.cos(a) * np.gradient(g, axis=1) + np.sin(a) * np.gradient(g, axis=0))
            dark = img[mask] * rng.uniform(0.28, 0.4)
            img[mask] = dark * (1 + 0.6 * np.clip(rim[mask], -0.5, 0.5))[:, None]
            # lit rim: the inner border of each pit catches the light
            m_im = Image.fromarray(mask.astype(np.uint8) * 255)
            inner = _to_bool(m_im.filter(ImageFilter.MinFilter(3)))
            border = mask & ~inner
            img[border] = np.minimum(img[border] + 90, 245)
        elif cls == "stain":
            strength = rng.uniform(0.55, 0.8)
            w = np.where(mask, 0.35 + 0.65 * np.clip((alpha - 0.5) * 3.0, 0, 1), 0.0) * strength
            rust = np.array([rng.uniform(120, 150), rng.uniform(70, 90), rng.uniform(30, 50)])
            rust = rust * (1 + 0.15 * _smooth_noise(rng, size, 12))[..., None]
            img = img * (1 - w[..., None]) + rust * w[..., None]
    return _finish(rng, img), masks


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def extra_classes(seed: int, cls: str, index: int, multi_share: float) -> list[str]:
    """The defect classes drawn beside ``cls`` in image ``index`` of a multi-class set: none,
    or (with probability ``multi_share``) one or two other classes of its surface family, from
    their own generator (so the image's own draws do not move)."""
    if multi_share <= 0 or cls not in SURFACE_OF:
        return []
    rng = _rng_for(seed, cls + "+extras", index)
    if rng.random() >= multi_share:
        return []
    others = [c for c in FAMILIES[SURFACE_OF[cls]] if c != cls]
    n = 1 if rng.random() < 0.7 else 2
    return [others[i] for i in sorted(rng.choice(len(others), size=min(n, len(others)), replace=False).tolist())]


def render_defects(seed: int, cls: str, index: int, size: int = 256, surface: str | None = None,
                   extras: Sequence[str] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """One image (uint8 HxWx3) and one boolean mask per defect class drawn (``cls`` first, then
    ``extras``, each of ``cls``'s family), disjoint: where a later defect covers an earlier one
    the pixel is the later's. ``cls`` ``"free"``: no defect (``surface`` picks the family;
    default alternates with ``index``), an empty list. Each drawn class keeps at least a few
    visible pixels (redrawn otherwise)."""
    if cls == FREE_CLASS:
        fam = surface or list(FAMILIES)[index % len(FAMILIES)]
        defects: list[str] = []
    elif cls in SURFACE_OF:
        fam, defects = SURFACE_OF[cls], [cls]
    else:
        raise DataPrepError(f"unknown synthetic class {cls!r} (known: {', '.join(DEFECT_CLASSES)}, free)")
    if fam not in FAMILIES:
        raise DataPrepError(f"unknown surface {fam!r} (known: {', '.join(FAMILIES)})")
    for e in extras:
        if SURFACE_OF.get(e) != fam or e in defects:
            raise DataPrepError(f"extra defect {e!r} is not another class of the {fam} family")
        defects.append(e)
    render = _render_pcb if fam == "pcb" else _render_metal
    rng = _rng_for(seed, f"{cls}/{fam}" if cls == FREE_CLASS else cls, index)
    min_px = max(6, int(0.0015 * size * size))
    for _ in range(20):
        img, masks = render(rng, size, defects)
        visible, covered = [], np.zeros((size, size), bool)
        for m in reversed(masks):  # the later defect wins where two overlap
            visible.append(m & ~covered)
            covered |= m
        visible.reverse()
        if all(v.sum() >= min_px for v in visible):
            break
    return img, visible


def render_sample(seed: int, cls: str, index: int, size: int = 256, surface: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its mask (uint8 HxW, 0/255). ``cls`` is a defect class or
    ``"free"`` (then ``surface`` picks the family; default alternates with ``index``)."""
    img, masks = render_defects(seed, cls, index, size, surface)
    mask = masks[0] if masks else np.zeros(img.shape[:2], bool)
    return img, mask.astype(np.uint8) * 255


def class_value(cls: str) -> int:
    """The label value of a defect class in a multi-class synthetic set (its place in
    :data:`DEFECT_CLASSES`, from 1; ``labels.txt`` lists them in that order)."""
    return DEFECT_CLASSES.index(cls) + 1


def _write_one(job: tuple) -> dict:
    seed, cls, i, size, folder, multi_share = job
    folder = Path(folder)
    surface = SURFACE_OF.get(cls) or list(FAMILIES)[i % len(FAMILIES)]
    name = f"{cls}_{i:06d}.png"
    if multi_share is None:  # binary masks (0/255), one class per image
        img, mask = render_sample(seed, cls, i, size, surface)
        row = {"file": name, "class": cls, "surface": surface}
    else:  # class-index masks: every defect drawn, each with its class's value
        extras = extra_classes(seed, cls, i, multi_share)
        img, masks = render_defects(seed, cls, i, size, surface, extras)
        mask = np.zeros(img.shape[:2], np.uint8)
        for c, m in zip([cls, *extras] if cls != FREE_CLASS else [], masks):
            mask[m] = class_value(c)
        row = {"file": name, "class": cls, "surface": surface, "defects": ";".join([cls, *extras]) if masks else ""}
    Image.fromarray(img, mode="RGB").save(folder / "images" / name, format="PNG", compress_level=1)
    Image.fromarray(mask, mode="L").save(folder / "labels" / name, format="PNG", compress_level=6)
    return {**row, "defect_pixels": int(np.count_nonzero(mask))}


def generate_synthetic(out_dir, seed: int = 0, per_class: int = 40, size: int = 256,
                       n_free: int | None = None, overwrite: bool = False,
                       classes: Sequence[str] | None = None, workers: int | None = None,
                       show_progress: bool | None = None, multi_share: float | None = None) -> Path:
    """Write a synthetic dataset (images/, labels/, classes.csv, synthetic.json) to ``out_dir``.

    ``per_class`` images of each defect class (default: all nine of :data:`DEFECT_CLASSES`)
    and ``n_free`` defect-free images (default: ``per_class``; alternating pcb / metal).
    ``workers`` processes render in parallel (default: up to 8 for large sets; the output does
    not depend on it). Returns the output path.

    ``multi_share`` (None: a binary set, one defect class per image, masks 0/255): a
    *multi-class* set with class-index masks and ``labels.txt``: that share of the defect
    images of each class also holds one or two other defect classes of its family
    (:func:`extra_classes`), every class painted with its value (:func:`class_value`), disjoint
    where they overlap. The file name and ``classes.csv`` give the class the image was drawn
    for; its ``defects`` column lists all."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataPrepError(f"seed must be a non-negative integer, got {seed!r}")
    if size < 32:
        raise DataPrepError(f"size must be at least 32 pixels, got {size}")
    if per_class < 0 or (n_free is not None and n_free < 0):
        raise DataPrepError("per_class and n_free must not be negative")
    classes = tuple(classes) if classes is not None else DEFECT_CLASSES
    for c in classes:
        if c not in SURFACE_OF:
            raise DataPrepError(f"unknown synthetic class {c!r} (known: {', '.join(DEFECT_CLASSES)})")
    if multi_share is not None and not 0.0 <= float(multi_share) <= 1.0:
        raise DataPrepError(f"multi_share must lie in [0, 1] (or be None for a binary set), got {multi_share}")
    n_free = per_class if n_free is None else n_free
    jobs = [(c, i) for c in classes for i in range(per_class)] + [(FREE_CLASS, i) for i in range(n_free)]
    if not jobs:
        raise DataPrepError("nothing to generate (per_class and n_free are both 0)")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(jobs) * (size / 256) ** 2 >= 96 else 1
    out_dir = Path(out_dir)
    check_output(out_dir, (), overwrite)
    with output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        share = None if multi_share is None else float(multi_share)
        tasks = [(int(seed), c, i, size, str(tmp), share) for c, i in jobs]
        if workers > 1:
            # fork is fastest, but not safe in a process that already runs torch threads
            methods = mp.get_all_start_methods()
            method = "fork" if "fork" in methods and "torch" not in sys.modules else "spawn"
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
                it = pool.map(_write_one, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
                rows = list(progress(it, desc="synthetic", total=len(tasks), enabled=show_progress))
        else:
            rows = [_write_one(t) for t in progress(tasks, desc="synthetic", total=len(tasks),
                                                    enabled=show_progress)]
        write_classes_csv(tmp, rows)
        if share is not None:
            (tmp / LABEL_NAMES).write_text("background\n" + "\n".join(DEFECT_CLASSES) + "\n")
        meta = {"generator": "data_prep.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
                "size": size, "per_class": per_class, "n_free": n_free, "multi_share": share,
                "families": {f: [c for c in cs if c in classes] for f, cs in FAMILIES.items()},
                "images": len(rows)}
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir
