"""Tiling of the work canvas: ``grid x grid`` tiles and the seam windows between them.

``grid`` is the number of tiles per side (``grid=1``: no tiling, the whole image at model
size). Boxes are ``(top, left, height, width)`` in canvas pixels. See
:mod:`seggpt_lib.predict.predictor` for how windows are predicted and pasted.

A grid is checked before any work (:func:`check_grid`): an integer >= 1 whose tiles keep at
least :data:`MIN_TILE` pixels per side of the work canvas (``grid <= work_size // MIN_TILE``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

__all__ = ["MIN_TILE", "Window", "canvas_size", "check_grid", "max_grid", "plan_windows"]

MIN_TILE = 4  # the smallest tile side (work-canvas pixels) a grid may cut


@dataclass(frozen=True)
class Window:
    """A query window on the work canvas: ``box`` is predicted, ``paste`` (inside it) is kept.

    Boxes are ``(top, left, height, width)`` in canvas pixels; ``tile`` is the tile index for
    grid tiles (``-1`` for seam windows).
    """

    box: tuple[int, int, int, int]
    paste: tuple[int, int, int, int]
    tile: int = -1


def _sides(work_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(work_size, bool):
        raise ValueError(f"work_size must be an integer or (height, width), got {work_size!r}")
    if isinstance(work_size, numbers.Integral):
        return int(work_size), int(work_size)
    try:
        h, w = (int(v) for v in work_size)
    except (TypeError, ValueError):
        raise ValueError(f"work_size must be an integer or (height, width), got {work_size!r}") from None
    return h, w


def max_grid(work_size: int | Sequence[int]) -> int:
    """The largest grid a work canvas of ``work_size`` allows (tiles of :data:`MIN_TILE` px)."""
    return max(1, min(_sides(work_size)) // MIN_TILE)


def check_grid(grid: int, work_size: int | Sequence[int]) -> None:
    """``ValueError`` (a clear message) unless ``grid`` is an integer >= 1 that the work canvas
    allows: ``grid=1`` always (no tiling, the model size), ``grid >= 2`` while each tile keeps at
    least :data:`MIN_TILE` pixels per side (``grid <= max_grid(work_size)``)."""
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
        raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
    if grid == 1:
        return
    h, w = _sides(work_size)
    if min(h, w) // grid < MIN_TILE:
        raise ValueError(
            f"grid {grid} is too large for the work size {work_size}: tiles would be {h // grid}x{w // grid} px "
            f"(at least {MIN_TILE} px per side: grid <= {max_grid(work_size)} at this work size, or a larger work size)"
        )


def canvas_size(grid: int, work_size: int | Sequence[int], model_hw: tuple[int, int]) -> tuple[int, int]:
    """The work canvas ``(H, W)``: the model size for ``grid=1``, else ``work_size`` (an int for
    a square) rounded down to a multiple of ``grid``; :func:`check_grid`'s ``ValueError`` for a
    grid the work size does not allow."""
    check_grid(grid, work_size)
    if grid == 1:
        return tuple(model_hw)  # type: ignore[return-value]
    h, w = _sides(work_size)
    return (h // grid) * grid, (w // grid) * grid


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
