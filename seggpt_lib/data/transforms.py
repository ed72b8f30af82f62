"""Joint image/mask augmentation (``torchvision.transforms.v2``): the one pipeline of training,
inference and prompt tuning.

* :class:`AugmentConfig`: the recipe (flips, random resized crop, per-channel gain, contrast,
  blur) and the size at which to cache images for it.
* :func:`build_augment`: the v2 pipeline ``f(Image, Mask) -> (Image, Mask)`` at a model size;
  with augmentation off it only resizes (image bilinear, mask nearest).
* :class:`ChannelGain`, :class:`Resize`, :class:`RandomResizedCrop`: our v2 transforms,
  defined here at module level so that they pickle (DataLoader workers started by spawn).

This module imports torchvision (slow): :mod:`seggpt_lib.data` loads it on first use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["AugmentConfig", "ChannelGain", "RandomResizedCrop", "Resize", "build_augment"]


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


def _interp(t: v2.Transform, inpt: Any) -> Any:
    return InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else t.interpolation


class Resize(v2.Resize):
    """torchvision's ``Resize``, except that masks are resampled with ``NEAREST_EXACT`` (pixel
    centres, like PIL): plain ``NEAREST`` shifts a downscaled mask by up to half a source
    pixel against the bilinear image."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, self.size, interpolation=_interp(self, inpt),
                                 max_size=self.max_size, antialias=self.antialias)


class RandomResizedCrop(v2.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` with masks resampled ``NEAREST_EXACT`` (see :class:`Resize`)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):  # torchvision's mask kernel forces NEAREST
            out = TF.crop(inpt, params["top"], params["left"], params["height"], params["width"])
            return TF.resize(out, self.size, interpolation=InterpolationMode.NEAREST_EXACT)
        return self._call_kernel(TF.resized_crop, inpt, **params, size=self.size,
                                 interpolation=self.interpolation, antialias=self.antialias)


def build_augment(cfg: AugmentConfig | None, image_size: tuple[int, int]):
    """The v2 pipeline for one image of a pair: ``f(Image, Mask) -> (Image, Mask)`` at
    ``image_size``. With augmentation off it only resizes (bilinear / nearest)."""
    size = [int(image_size[0]), int(image_size[1])]
    if cfg is None or not cfg.enabled:
        return Resize(size, antialias=True)
    ts: list[Any] = []
    if cfg.hflip > 0:
        ts.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip > 0:
        ts.append(v2.RandomVerticalFlip(cfg.vflip))
    if cfg.crop:
        ts.append(RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True))
    else:
        ts.append(Resize(size, antialias=True))
    if cfg.brightness and tuple(cfg.brightness) != (1.0, 1.0):
        ts.append(ChannelGain(tuple(cfg.brightness)))
    if cfg.contrast and tuple(cfg.contrast) != (1.0, 1.0):
        ts.append(v2.ColorJitter(contrast=tuple(cfg.contrast)))
    if cfg.blur_prob > 0 and cfg.blur_sigma[1] > 0:
        ts.append(v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur_prob))
    return v2.Compose(ts)
