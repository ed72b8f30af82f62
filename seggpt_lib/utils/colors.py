"""Palettes, label <-> colour images, palette snapping and (de)normalisation.

A palette is a ``(K, 3)`` uint8 tensor: row 0 is background (always black), row ``k`` the
colour of class ``k``. The original recipe draws one random defect colour per sample (black
background); training collapsed with all-random colours or black/white.
"""
from __future__ import annotations

from typing import Sequence

import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def random_palette(
    n_classes: int = 2,
    generator: torch.Generator | None = None,
    min_distance: float = 60.0,
    min_brightness: int = 64,
    max_tries: int = 1000,
) -> torch.Tensor:
    """Black background plus ``n_classes - 1`` random defect colours, reproducible from ``generator``.

    Defect colours keep at least ``min_distance`` (L2, 0..255 scale) from black and from each
    other, so snapping a prediction to the palette is unambiguous.
    """
    if n_classes < 2:
        raise ValueError(f"a palette needs background and at least one defect class, got n_classes={n_classes}")
    colours = [torch.zeros(3)]
    tries = 0
    while len(colours) < n_classes:
        tries += 1
        c = torch.randint(0, 256, (3,), generator=generator).float()
        if c.max() < min_brightness and tries < max_tries:
            continue
        if all(torch.dist(c, o) >= min_distance for o in colours) or tries >= max_tries:
            colours.append(c)
    return torch.stack(colours).to(torch.uint8)


def fixed_palette(colours: Sequence[Sequence[int]]) -> torch.Tensor:
    """A palette from explicit RGB triples; the first must be the background (usually black)."""
    pal = torch.as_tensor(colours, dtype=torch.uint8)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 2:
        raise ValueError(f"palette must be (K>=2, 3) RGB, got shape {tuple(pal.shape)}")
    return pal


def label_to_color(label: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Map an integer label map ``(..., H, W)`` to a colour image ``(..., 3, H, W)`` uint8.

    Binary masks (any non-zero = defect) work with a 2-colour palette: values above the last
    class are clipped to it.
    """
    idx = label.long().clamp(0, palette.shape[0] - 1)
    colour = palette.to(label.device)[idx]  # (..., H, W, 3)
    return colour.movedim(-1, -3).contiguous()


def cmap_to_lbl(image: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Snap each pixel to the nearest palette colour (L2) and return its index.

    ``image``: ``(B, 3, H, W)`` or ``(3, H, W)`` float on the 0..255 scale.
    ``palette``: ``(K, 3)`` shared by the batch, or ``(B, K, 3)`` one per sample.
    Returns ``(B, H, W)`` (or ``(H, W)``) int64 class indices. Vectorised: no Python loop
    over pixels or samples.
    """
    squeeze = image.ndim == 3
    if squeeze:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    pal = palette.to(device=image.device, dtype=torch.float32)
    if pal.ndim == 2:
        pal = pal.unsqueeze(0).expand(image.shape[0], -1, -1)
    if pal.shape[0] != image.shape[0]:
        raise ValueError(f"palette batch {pal.shape[0]} != image batch {image.shape[0]}")
    pix = image.float().flatten(2).transpose(1, 2)  # (B, HW, 3)
    dist = torch.cdist(pix, pal)  # (B, HW, K)
    idx = dist.argmin(dim=-1).reshape(image.shape[0], *image.shape[2:])
    return idx[0] if squeeze else idx


def snap_to_palette(image: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Replace every pixel by its nearest palette colour: removes blur and patch seams."""
    idx = cmap_to_lbl(image, palette)
    if palette.ndim == 3:
        out = torch.stack([label_to_color(i, p) for i, p in zip(idx, palette)])
    else:
        out = label_to_color(idx, palette)
    return out


def _stats(mean: Sequence[float], std: Sequence[float], ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=torch.float32, device=ref.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=ref.device).view(3, 1, 1)
    return m, s


def normalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (or 0..255 float) ``(..., 3, H, W)`` -> normalised float32."""
    m, s = _stats(mean, std, image)
    return (image.float() / 255.0 - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised ``(..., 3, H, W)`` -> float on the 0..255 scale, clipped."""
    m, s = _stats(mean, std, x)
    return ((x.float() * s + m) * 255.0).clamp(0, 255)


def defect_score(raw: torch.Tensor, defect_color: Sequence[float], background: Sequence[float] = (0, 0, 0)) -> torch.Tensor:
    """Per-pixel defect score on 0..1: how far each pixel lies from ``background`` toward
    ``defect_color`` (projection onto that segment, clipped).

    ``raw``: ``(..., 3, H, W)`` float on 0..255. Returns ``(..., H, W)`` float32. For the
    two-colour palette ``(background, defect_color)``, nearest-colour snapping (L2) gives the
    defect colour exactly where the score is above 0.5 (ties, score == 0.5, snap to background).
    """
    c = torch.as_tensor(defect_color, dtype=torch.float32, device=raw.device).view(3, 1, 1)
    b = torch.as_tensor(background, dtype=torch.float32, device=raw.device).view(3, 1, 1)
    d = c - b
    denom = float((d * d).sum())
    if denom <= 0:
        raise ValueError(f"defect colour {tuple(defect_color)} equals the background {tuple(background)}")
    return (((raw.float() - b) * d).sum(dim=-3) / denom).clamp(0.0, 1.0)
