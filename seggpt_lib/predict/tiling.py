"""Tiling of the work canvas: ``grid x grid`` tiles and the seam windows between them.

``grid`` is the number of tiles per side (``grid=1``: no tiling, the whole image at model
size). Boxes are ``(top, left, height, width)`` in canvas pixels. See
:mod:`seggpt_lib.predict.predictor` for how windows are predicted and pasted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Window", "canvas_size", "plan_windows"]


@dataclass(frozen=True)
class Window:
    """A query window on the work canvas: ``box`` is predicted, ``paste`` (inside it) is kept.

    Boxes are ``(top, left, height, width)`` in canvas pixels; ``tile`` is the tile index for
    grid tiles (``-1`` for seam windows).
    """

    box: tuple[int, int, int, int]
    paste: tuple[int, int, int, int]
    tile: int = -1


def canvas_size(grid: int, work_size: int | Sequence[int], model_hw: tuple[int, int]) -> tuple[int, int]:
    """The work canvas ``(H, W)``: the model size for ``grid=1``, else ``work_size`` (an int for
    a square) rounded down to a multiple of ``grid``."""
    if grid == 1:
        return tuple(model_hw)  # type: ignore[return-value]
    ws = (work_size, work_size) if isinstance(work_size, int) else tuple(work_size)
    th, tw = ws[0] // grid, ws[1] // grid
    if th < 4 or tw < 4:
        raise ValueError(f"work_size {work_size} is too small for grid {grid}")
    return th * grid, tw * grid


def plan_windows(grid: int, canvas_hw: tuple[int, int], seam_pass: bool = False) -> list[Window]:
    """Grid tiles (row-major) and, with ``seam_pass``, the seam windows.

    Seam windows have one tile's size: one per seam segment between two tiles (centred on the
    seam, spanning the tile row or column), then one per seam crossing. Their pasted centre
    strips are half a tile wide across the seam (a half-tile square at a crossing).
    """
    hc, wc = canvas_hw
    th, tw = hc // grid, wc // grid
    wins = []
    for r in range(grid):
        for c in range(grid):
            b = (r * th, c * tw, th, tw)
            wins.append(Window(b, b, r * grid + c))
    if not seam_pass or grid < 2:
        return wins
    qh, qw = th // 4, tw // 4
    for r in range(grid):  # vertical seams, one window per tile row
        for c in range(1, grid):
            x = c * tw
            wins.append(Window((r * th, x - tw // 2, th, tw), (r * th, x - qw, th, 2 * qw)))
    for r in range(1, grid):  # horizontal seams, one window per tile column
        for c in range(grid):
            y = r * th
            wins.append(Window((y - th // 2, c * tw, th, tw), (y - qh, c * tw, 2 * qh, tw)))
    for r in range(1, grid):  # crossings
        for c in range(1, grid):
            y, x = r * th, c * tw
            wins.append(Window((y - th // 2, x - tw // 2, th, tw), (y - qh, x - qw, 2 * qh, 2 * qw)))
    return wins
