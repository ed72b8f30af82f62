"""Patch masks over the stacked label pair (prompt on top, query below).

All masks are boolean tensors of shape ``(B, Hp * Wp)`` in row-major patch order, where
``(Hp, Wp)`` is the patch grid of the whole pair (``Hp = 2H / p``). ``True`` = the label
patch is hidden from the model (replaced by ``mask_token``) and counted in the loss.
"""
from __future__ import annotations

import torch


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    hp, wp = int(grid[0]), int(grid[1])
    if hp <= 0 or wp <= 0 or hp % 2:
        raise ValueError(f"patch grid must be positive with an even height (two stacked images), got {grid}")
    return hp, wp


def random_patch_mask(
    grid: tuple[int, int],
    ratio: float = 0.75,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hide exactly ``round(ratio * Hp * Wp)`` patches chosen uniformly over the whole pair.

    This is the training mask of the original recipe (``mask_ratio`` 0.75). Each row of the
    batch draws its own patches.
    """
    hp, wp = _check_grid(grid)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    n = hp * wp
    n_masked = int(round(ratio * n))
    noise = torch.rand(batch_size, n, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch_size, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_masked], True)
    return mask.to(device) if device is not None else mask


def query_half_mask(
    grid: tuple[int, int], batch_size: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Hide the whole query (bottom) half: what inference and validation use."""
    hp, wp = _check_grid(grid)
    mask = torch.zeros(batch_size, hp, wp, dtype=torch.bool, device=device)
    mask[:, hp // 2 :, :] = True
    return mask.flatten(1)


def seam_mask(
    grid: tuple[int, int],
    rows: tuple[int, ...] = (),
    cols: tuple[int, ...] = (),
    width: int = 1,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hide bands of the query half around tile seams (for the stitch pass).

    ``rows``/``cols`` are seam positions in query-half patch coordinates (a seam at ``r``
    lies between patch rows ``r - 1`` and ``r``); each band covers ``width`` patches on
    both sides of the seam.
    """
    hp, wp = _check_grid(grid)
    half = hp // 2
    q = torch.zeros(half, wp, dtype=torch.bool)
    for r in rows:
        q[max(0, r - width) : min(half, r + width), :] = True
    for c in cols:
        q[:, max(0, c - width) : min(wp, c + width)] = True
    mask = torch.zeros(batch_size, hp, wp, dtype=torch.bool)
    mask[:, half:, :] = q
    mask = mask.flatten(1)
    return mask.to(device) if device is not None else mask


def patch_mask_to_pixels(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Expand a ``(B, Hp*Wp)`` patch mask to a ``(B, 1, Hp*p, Wp*p)`` pixel mask (for display)."""
    hp, wp = _check_grid(grid)
    m = mask.reshape(-1, 1, hp, wp).to(torch.float32)
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
