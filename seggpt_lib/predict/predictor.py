"""Prompted (in-context) inference with a loaded SegGPT: the original project's procedure, batched.

One query image and its prompts (prompt image + binary prompt mask) give a binary defect mask
at the query's original resolution:

1. Every prompt mask is coloured with a fixed two-colour palette (black background, one defect
   colour, white by default): the model paints the query half in the prompt's colours.
2. ``grid=1``: the query and each prompt are resized to the model's per-image size
   (``model.cfg.image_size``). ``grid=n``: query and prompts are resized to a square work
   canvas (``work_size``, 1024 by default, rounded down to a multiple of ``n``), cut into
   ``n x n`` tiles, and each tile is resized to the model size. Images are resized bilinearly
   (antialiased), prompt masks with nearest neighbour (as the official code does).
3. Each *window* of the query (a tile) is paired with prompt tiles: ``tile_pairing="all"``
   (the original) pairs it with every tile of every prompt, ``"aligned"`` with the tile at the
   same place in each prompt. A pair is the prompt tile stacked on top of the query tile; its
   label pair is the prompt mask on top of itself; the query half of the label pair is hidden
   (:func:`seggpt_lib.utils.masking.query_half_mask`).
4. The pairs of one window form a *group*. With ``ensemble=True`` the group runs with the
   feature ensemble (the model's ``merge_between_batch=0`` semantics) restricted to the group
   (:func:`forward_grouped`, the model's ``group_index``), so many windows (of many queries) share one forward pass; with
   ``ensemble=False`` each pair runs on its own and the group's outputs are averaged.
   Either way the group's output is the mean of its members' query halves.
5. Window outputs are de-normalised, resized to their place on the canvas, pasted, the canvas
   is resized (bilinear) to the original resolution: that is the *raw* output (float 0..255).
   Each pixel is snapped to the nearest palette colour (:func:`seggpt_lib.utils.colors.cmap_to_lbl`):
   that is the *colour* output, and ``colour != background`` is the binary *mask*.

Seam pass (``seam_pass=True``, ``grid >= 2``): extra windows of one tile's size, centred on
the tile seams, are predicted in the same batched passes: one per seam segment between two
tiles (centred on the vertical seam between tiles ``(r, c)`` and ``(r, c+1)``, spanning row
``r``; likewise for horizontal seams) and one per seam crossing. Their centre strips are pasted
over the first pass: half a tile wide across a seam segment (full tile length), then a half-tile
square at each crossing. So every pixel within a quarter tile of a seam comes from a window in
which it lies in the middle, with context on both sides. For ``"all"`` pairing a seam window is
paired with the same prompt tiles as a grid tile; for ``"aligned"`` with the prompts' crops at
the same place. Windows are planned in :mod:`seggpt_lib.predict.tiling`.

Batching: all pairs of a call go through the model in as few forward passes as ``max_batch``
(pairs per pass) allows; with the ensemble, a group is never split across passes (a group larger
than ``max_batch`` runs alone). A learned prompt (prompt tensors at model size, see
:class:`PromptPairs`) plugs in instead of prompt images: every window is paired with all of it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seggpt_lib.data.layout import read_label, read_rgb
from seggpt_lib.model.checkpoint import build_from_checkpoint
from seggpt_lib.model.seggpt import SegGPT
from seggpt_lib.predict.consistency import patch_fraction, prompt_consistency
from seggpt_lib.predict.tiling import Window, canvas_size, check_grid, plan_windows
from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD, cmap_to_lbl, defect_score
from seggpt_lib.utils.device import PRECISIONS, autocast
from seggpt_lib.utils.masking import query_half_mask

__all__ = [
    "DEFAULT_DEFECT_COLOR",
    "PRECISIONS",
    "TILE_PAIRINGS",
    "PromptMaskError",
    "PromptPairs",
    "Prediction",
    "SegGPTPredictor",
    "Window",
    "forward_grouped",
    "load_rgb",
    "load_mask_file",
    "check_prompt_mask",
    "plan_windows",
]

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike, torch.Tensor]

DEFAULT_DEFECT_COLOR: tuple[int, int, int] = (255, 255, 255)
TILE_PAIRINGS = ("all", "aligned")
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))


class PromptMaskError(ValueError):
    """A prompt mask is not 2-D, not binary, or not the size of its image."""


# ------------------------------------------------------------------------------------------
# input loading and validation
# ------------------------------------------------------------------------------------------
def _name(obj: Any, fallback: str) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else fallback


def load_rgb(image: ImageLike) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8: numpy (HxW, HxWx1/3/4), torch ``(3, H, W)``, PIL or a path.

    Grey images are repeated to three channels and an alpha channel is dropped. A path is read
    with :func:`seggpt_lib.data.layout.read_rgb`: a missing, unreadable or truncated file raises
    :class:`~seggpt_lib.data.layout.DatasetError` naming the file.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"an image must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        if a.dtype == bool or (np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0):
            a = a.astype(np.float32) * 255.0
        a = np.clip(np.nan_to_num(a.astype(np.float32)), 0, 255).round().astype(np.uint8)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


def load_mask_file(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file as a uint8 ``(H, W)`` array: :func:`seggpt_lib.data.layout.read_label`,
    the one rule of training and inference (single-channel values as stored, 16-bit values kept
    or a binary 0/65535 mask as 0/255, a grey mask saved as colour as its grey value, a colour
    mask: non-black = defect). A missing, unreadable or truncated file raises
    :class:`~seggpt_lib.data.layout.DatasetError` naming the file.
    """
    return read_label(path)


def check_prompt_mask(mask: Any, image_hw: tuple[int, int] | None = None, name: str = "prompt mask") -> np.ndarray:
    """Validate a prompt mask and return it as a boolean ``(H, W)`` array (non-zero = defect).

    It must be 2-D, binary (values in ``{0, v}`` for one ``v``: ``{0, 1}``, ``{0, 255}``,
    bool...) and, when ``image_hw`` is given, of its image's size. Raises
    :class:`PromptMaskError` naming ``name`` otherwise.
    """
    if isinstance(mask, (str, os.PathLike)):
        name = str(mask) if name == "prompt mask" else name
        mask = load_mask_file(mask)
    elif hasattr(mask, "mode") and hasattr(mask, "size") and not isinstance(mask, np.ndarray):  # PIL
        mask = np.asarray(mask)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim != 2:
        raise PromptMaskError(f"{name}: a prompt mask must be 2-D (H, W), got shape {m.shape}")
    if m.dtype != bool:
        if np.issubdtype(m.dtype, np.floating) and np.isnan(m).any():
            raise PromptMaskError(f"{name}: prompt mask contains NaN")
        nz = m[m != 0]
        if nz.size and nz.min() != nz.max():
            values = np.unique(m)
            shown = ", ".join(str(v) for v in values[:8]) + (" ..." if values.size > 8 else "")
            raise PromptMaskError(
                f"{name}: prompt mask is not binary: values {{{shown}}} "
                "(expected 0 and one defect value, e.g. {0, 1} or {0, 255})"
            )
        m = m != 0
    if image_hw is not None and tuple(m.shape) != tuple(image_hw):
        raise PromptMaskError(
            f"{name}: prompt mask is {m.shape[0]}x{m.shape[1]} (HxW) but its image is "
            f"{image_hw[0]}x{image_hw[1]}"
        )
    return m


# ------------------------------------------------------------------------------------------
# per-group feature ensemble
# ------------------------------------------------------------------------------------------
def forward_grouped(
    model: SegGPT,
    imgs: torch.Tensor,
    tgts: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    group_index: torch.Tensor | None = None,
    seg_type: torch.Tensor | None = None,
    query_only: bool = False,
    return_features: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decoded prediction ``(N, 3, 2H, W)`` (normalised space) with a per-group feature ensemble.

    ``query_only``: decode only the query (bottom) half, ``(N, 3, H, W)``; the same pixels as
    the bottom half of the full decoding, at about half the decoder's cost.
    ``return_features``: also return the last encoder features ``(N, Hp, Wp, D)``.

    ``group_index`` ``(N,)``: samples sharing an index are prompts of one query and are
    ensembled together (the model's ``merge_between_batch=0`` within each group, see
    :meth:`SegGPT.forward_encoder`); ``None`` runs every sample on its own (no ensemble). With a
    single group this equals ``model.unpatchify(model(imgs, tgts, bool_masked_pos, merge_between_batch=0)[1])``.
    """
    n = imgs.shape[0]
    bool_masked_pos = bool_masked_pos.flatten(1).to(torch.bool)
    if seg_type is None:
        seg_type = torch.zeros(n, dtype=torch.long, device=imgs.device)
    first_row = model.cfg.grid[0] // 2 if query_only else 0
    if group_index is None:
        feats = model.forward_encoder(imgs, tgts, bool_masked_pos, seg_type, -1)
        out = model.forward_decoder(feats, first_row)
        return (out, feats[-1]) if return_features else out
    group_index = group_index.to(device=imgs.device, dtype=torch.long)
    if group_index.shape != (n,):
        raise ValueError(f"group_index must have shape ({n},), got {tuple(group_index.shape)}")
    # compact the labels so that the number of groups is as small as possible
    _, group_index = torch.unique(group_index, return_inverse=True)
    feats = model.forward_encoder(imgs, tgts, bool_masked_pos, seg_type, 0, group_index=group_index)
    out = model.forward_decoder(feats, first_row)
    return (out, feats[-1]) if return_features else out


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------
@dataclass
class PromptPairs:
    """Prompt pairs at model size, normalised: what the model sees on top of a query tile.

    ``images`` and ``targets`` are ``(P, 3, H, W)`` float tensors (``targets``: the coloured
    prompt masks, normalised like the images). A learned prompt is one of these.
    """

    images: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape != self.targets.shape or self.images.shape[1] != 3:
            raise ValueError(
                f"prompt pairs must be two (P, 3, H, W) tensors of one shape, got "
                f"{tuple(self.images.shape)} and {tuple(self.targets.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Prediction:
    """One query's prediction at its original resolution."""

    mask: np.ndarray  # (H0, W0) bool, True = defect
    color: np.ndarray  # (H0, W0, 3) uint8, snapped to the palette
    raw: np.ndarray | None  # (H0, W0, 3) float32 on 0..255, before snapping (None if not kept)
    timing: dict[str, float] = field(default_factory=dict)
    n_pairs: int = 0
    # (H0, W0) float32 on 0..1: how far each raw pixel lies from black toward the defect colour
    # (seggpt_lib.utils.colors.defect_score); ``score >= 0.5`` equals ``mask`` exactly
    score: np.ndarray | None = None
    # prompt consistency (seggpt_lib.predict.consistency), when asked for; NaN: nothing to compare
    consistency: float | None = None

    @property
    def label(self) -> np.ndarray:
        """The mask as a 0/255 uint8 image."""
        return self.mask.astype(np.uint8) * 255


@dataclass
class _Group:
    query: int  # index of the query tile tensor in the call's tile list
    prompts: PromptPairs
    owner: int  # which query of the call
    window: int  # which window of that query


# ------------------------------------------------------------------------------------------
# the predictor
# ------------------------------------------------------------------------------------------
class SegGPTPredictor:
    """A loaded SegGPT ready for prompted inference (see the module docstring for the procedure).

    Example::

        predictor = SegGPTPredictor.from_checkpoint("weights.safetensors", device="cuda", precision="bf16")
        pred = predictor.predict(query, [prompt], [prompt_mask], grid=2)
        assert pred.mask.shape == query.shape[:2]
    """

    def __init__(
        self,
        model: SegGPT,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_batch: int = 8,
        defect_color: Sequence[int] = DEFAULT_DEFECT_COLOR,
        seg_type: int = 0,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        color = tuple(int(c) for c in defect_color)
        if len(color) != 3 or not all(0 <= c <= 255 for c in color) or color == (0, 0, 0):
            raise ValueError(f"defect_color must be an RGB triple in 0..255 other than black, got {defect_color}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.max_batch = int(max_batch)
        self.defect_color = color
        self.palette = torch.tensor([(0, 0, 0), color], dtype=torch.uint8)
        self.seg_type = int(seg_type)
        self._mean_t = torch.tensor(self.mean, device=self.device).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(3, 1, 1)
        self.stats: dict[str, int] = {"forward_passes": 0, "pairs": 0}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, preset: str | None = None, **kwargs: Any) -> "SegGPTPredictor":
        """Build the model a checkpoint describes (or ``preset``), load it, wrap it."""
        return cls(build_from_checkpoint(path, preset=preset), **kwargs)

    # -- sizes ----------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        """Model size of one image of the pair ``(H, W)``."""
        return tuple(self.model.cfg.image_size)  # type: ignore[return-value]

    def pairs_per_query(self, n_prompts: int, grid: int = 1, tile_pairing: str = "all", seam_pass: bool = False) -> int:
        """How many (query tile, prompt tile) pairs one query costs."""
        n_win = len(plan_windows(grid, (grid * 4, grid * 4), seam_pass))
        per = n_prompts * (grid * grid if tile_pairing == "all" else 1)
        return n_win * per

    # -- tensors --------------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` on 0..255 -> normalised float32."""
        return (x.float() / 255.0 - self._mean_t) / self._std_t

    def _denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() * self._std_t + self._mean_t) * 255.0).clamp(0, 255)

    @staticmethod
    def _resize(x: torch.Tensor, size: tuple[int, int], nearest: bool = False) -> torch.Tensor:
        """Resize ``(N, C, H, W)`` float: nearest-exact for masks, bilinear (antialiased) otherwise."""
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if nearest:
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def _image_tensor(self, image: np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 -> float ``(1, 3, H, W)`` on 0..255, on the device."""
        if not image.flags.writeable:
            image = image.copy()
        return torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float()

    def _colour_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Binary ``(N, 1, H, W)`` float -> palette colours ``(N, 3, H, W)`` on 0..255."""
        c = torch.tensor(self.defect_color, dtype=torch.float32, device=mask.device).view(1, 3, 1, 1)
        return (mask > 0.5).float() * c

    def _crops(self, canvas: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], nearest: bool = False) -> torch.Tensor:
        """Crop ``boxes`` from ``canvas`` ``(1, C, Hc, Wc)`` and resize each to the model size."""
        hw = self.image_size
        out = [self._resize(canvas[:, :, t : t + h, l : l + w], hw, nearest) for t, l, h, w in boxes]
        return torch.cat(out, dim=0)

    def prompt_pairs(
        self,
        prompts: Sequence[ImageLike],
        prompt_masks: Sequence[Any],
        grid: int = 1,
        work_size: int = 1024,
        boxes: Sequence[tuple[int, int, int, int]] | None = None,
    ) -> PromptPairs:
        """Prompt images + masks -> :class:`PromptPairs` at model size.

        ``grid=1``: one pair per prompt. ``grid=n``: every prompt's ``n x n`` tiles (prompt-major,
        tiles row-major), or its crops at ``boxes`` (canvas coordinates) when given.
        """
        if len(prompts) != len(prompt_masks):
            raise ValueError(f"{len(prompts)} prompt images but {len(prompt_masks)} prompt masks")
        if not prompts:
            raise ValueError("at least one prompt is needed")
        canvas_hw = canvas_size(grid, work_size, self.image_size)
        if boxes is None:
            boxes = [w.box for w in plan_windows(grid, canvas_hw)]
        imgs, tgts = [], []
        for i, (p, m) in enumerate(zip(prompts, prompt_masks)):
            name = _name(p, f"prompt {i}")
            img = load_rgb(p)
            mask = check_prompt_mask(m, img.shape[:2], name=_name(m, f"mask of {name}"))
            img_c = self._resize(self._image_tensor(img), canvas_hw)
            m_t = torch.from_numpy(mask).to(self.device)[None, None].float()
            m_c = self._resize(m_t, canvas_hw, nearest=True)
            imgs.append(self._normalize(self._crops(img_c, boxes)))
            tgts.append(self._normalize(self._colour_mask(self._crops(m_c, boxes, nearest=True))))
        return PromptPairs(torch.cat(imgs), torch.cat(tgts))

    # -- model ----------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_pairs(self, q_imgs: torch.Tensor, p_imgs: torch.Tensor, p_tgts: torch.Tensor,
                   group_index: torch.Tensor | None, features: bool = False) -> Any:
        """One forward pass over pairs; returns the query halves ``(N, 3, H, W)`` (normalised),
        and the per-pair prompt consistency ``(N,)`` with its weight (predicted patches) when ``features``."""
        imgs = torch.cat([p_imgs, q_imgs], dim=2)
        tgts = torch.cat([p_tgts, p_tgts], dim=2)
        n = imgs.shape[0]
        mask = query_half_mask(self.model.cfg.grid, batch_size=n, device=self.device)
        seg_type = torch.full((n,), self.seg_type, dtype=torch.long, device=self.device)
        with autocast(self.device, self.precision):
            out = forward_grouped(self.model, imgs, tgts, mask, group_index, seg_type, query_only=True,
                                  return_features=features)
        self.stats["forward_passes"] += 1
        self.stats["pairs"] += n
        if not features:
            return out.float()
        out, feats = out[0].float(), out[1]
        p = self.model.patch_size
        prompt_w = patch_fraction(self._pixel_mask(p_tgts), p)
        query_w = patch_fraction(self._pixel_mask(out), p)
        cons = prompt_consistency(feats, prompt_w, query_w)
        return out, cons, query_w.sum(dim=(1, 2))

    def _pixel_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised colour outputs ``(N, 3, H, W)`` -> defect mask ``(N, H, W)`` (score >= 0.5)."""
        return defect_score(self._denormalize(x), self.defect_color) >= 0.5

    def _forward_groups(self, tiles: torch.Tensor, groups: Sequence[_Group], ensemble: bool,
                        consistency: list | None = None) -> list[torch.Tensor]:
        """Every group's output ``(3, H, W)`` (normalised): the mean of its pairs' query halves.

        Pairs are packed into passes of at most ``max_batch``; with ``ensemble`` the groups are
        packed whole (a group bigger than ``max_batch`` runs alone). ``consistency``: a list that
        receives each group's ``[sum of consistency x weight, sum of weights]``.
        """
        sizes = [len(g.prompts) for g in groups]
        if ensemble:
            chunks: list[list[tuple[int, int, int]]] = []  # (group, first pair, n pairs)
            cur, cur_n = [], 0
            for gi, s in enumerate(sizes):
                if cur and cur_n + s > self.max_batch:
                    chunks.append(cur)
                    cur, cur_n = [], 0
                cur.append((gi, 0, s))
                cur_n += s
            if cur:
                chunks.append(cur)
        else:
            chunks, cur, cur_n = [], [], 0
            for gi, s in enumerate(sizes):
                start = 0
                while start < s:
                    take = min(s - start, self.max_batch - cur_n)
                    cur.append((gi, start, take))
                    cur_n += take
                    start += take
                    if cur_n == self.max_batch:
                        chunks.append(cur)
                        cur, cur_n = [], 0
            if cur:
                chunks.append(cur)
        sums = [None] * len(groups)
        if consistency is not None:
            consistency[:] = [[0.0, 0.0] for _ in groups]
        for chunk in chunks:
            q, pi, pt, gid = [], [], [], []
            for k, (gi, start, take) in enumerate(chunk):
                g = groups[gi]
                q.append(tiles[g.query : g.query + 1].expand(take, -1, -1, -1))
                pi.append(g.prompts.images[start : start + take])
                pt.append(g.prompts.targets[start : start + take])
                gid.append(torch.full((take,), k, dtype=torch.long))
            group_index = torch.cat(gid).to(self.device) if ensemble else None
            out = self._run_pairs(torch.cat(q), torch.cat(pi).to(self.device), torch.cat(pt).to(self.device), group_index,
                                  features=consistency is not None)
            if consistency is not None:
                out, cons, weight = out
                weight = torch.where(torch.isfinite(cons), weight, torch.zeros_like(weight))
                cons = torch.nan_to_num(cons, nan=0.0) * weight
            pos = 0
            for gi, _start, take in chunk:
                if consistency is not None:
                    consistency[gi][0] += float(cons[pos : pos + take].sum())
                    consistency[gi][1] += float(weight[pos : pos + take].sum())
                s = out[pos : pos + take].sum(dim=0)
                sums[gi] = s if sums[gi] is None else sums[gi] + s
                pos += take
        return [s / n for s, n in zip(sums, sizes)]

    # -- public API -----------------------------------------------------------------------
    def snap(self, raw: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Snap a raw colour output to the palette (nearest colour, L2).

        ``raw``: ``(3, H, W)`` tensor or ``(H, W, 3)`` array on 0..255. Returns the binary mask
        ``(H, W)`` bool (True = nearest to the defect colour) and the snapped colour image
        ``(H, W, 3)`` uint8.
        """
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).permute(2, 0, 1)
        pal = self.palette.to(raw.device)
        idx = cmap_to_lbl(raw.float(), pal)
        return idx != 0, pal[idx]

    def predict(
        self,
        query: ImageLike,
        prompts: Sequence[ImageLike] | None = None,
        prompt_masks: Sequence[Any] | None = None,
        grid: int = 1,
        ensemble: bool = True,
        top_k: int | None = None,
        tile_pairing: str = "all",
        seam_pass: bool = False,
        work_size: int = 1024,
        prompt_pairs: PromptPairs | None = None,
        keep_raw: bool = True,
        consistency: bool = False,
    ) -> Prediction:
        """Predict one query (see :meth:`predict_batch`)."""
        return self.predict_batch(
            [query],
            None if prompts is None else [prompts],
            None if prompt_masks is None else [prompt_masks],
            grid=grid, ensemble=ensemble, top_k=top_k, tile_pairing=tile_pairing,
            seam_pass=seam_pass, work_size=work_size,
            prompt_pairs=None if prompt_pairs is None else [prompt_pairs], keep_raw=keep_raw,
            consistency=consistency,
        )[0]

    @torch.inference_mode()
    def predict_batch(
        self,
        queries: Sequence[ImageLike],
        prompt_sets: Sequence[Sequence[ImageLike]] | None = None,
        prompt_mask_sets: Sequence[Sequence[Any]] | None = None,
        grid: int = 1,
        ensemble: bool = True,
        top_k: int | None = None,
        tile_pairing: str = "all",
        seam_pass: bool = False,
        work_size: int = 1024,
        prompt_pairs: Sequence[PromptPairs] | PromptPairs | None = None,
        keep_raw: bool = True,
        consistency: bool = False,
    ) -> list[Prediction]:
        """Predict many queries; all their pairs share the forward passes.

        ``queries[i]`` is predicted from ``prompt_sets[i]`` / ``prompt_mask_sets[i]`` (images and
        binary masks, non-zero = defect, each of its image's size), the first ``top_k`` of them
        when given; or from ``prompt_pairs`` (one :class:`PromptPairs` per query, or one for all)
        which replaces the prompt images (a learned prompt). ``grid`` (tiles per side), ``tile_pairing``,
        ``seam_pass``, ``work_size``, ``ensemble``: see the module docstring.
        ``consistency``: also measure each query's prompt consistency
        (:mod:`seggpt_lib.predict.consistency`; the pairs' values weighted by their predicted area).
        Returns one :class:`Prediction` per query (with its defect ``score``); ``timing`` holds this call's seconds spent
        preparing, in the model and after, divided evenly between the queries.
        """
        check_grid(grid, work_size)
        if tile_pairing not in TILE_PAIRINGS:
            raise ValueError(f"tile_pairing must be one of {TILE_PAIRINGS}, got {tile_pairing!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        nq = len(queries)
        if prompt_pairs is None:
            if prompt_sets is None or prompt_mask_sets is None:
                raise ValueError("give prompt images and masks, or prompt_pairs")
            if len(prompt_sets) != nq or len(prompt_mask_sets) != nq:
                raise ValueError(f"{nq} queries but {len(prompt_sets)} prompt sets and {len(prompt_mask_sets)} mask sets")
        elif isinstance(prompt_pairs, PromptPairs):
            prompt_pairs = [prompt_pairs] * nq
        elif len(prompt_pairs) != nq:
            raise ValueError(f"{nq} queries but {len(prompt_pairs)} prompt pair sets")

        t0 = time.perf_counter()
        model_hw = self.image_size
        canvas_hw = canvas_size(grid, work_size, model_hw)
        windows = plan_windows(grid, canvas_hw, seam_pass)
        tile_boxes = [w.box for w in windows if w.tile >= 0]
        all_boxes = [w.box for w in windows]

        orig_hw: list[tuple[int, int]] = []
        tiles: list[torch.Tensor] = []
        groups: list[_Group] = []
        for qi in range(nq):
            q = load_rgb(queries[qi])
            orig_hw.append(q.shape[:2])
            q_c = self._resize(self._image_tensor(q), canvas_hw)
            q_tiles = self._normalize(self._crops(q_c, all_boxes))
            base = sum(t.shape[0] for t in tiles)
            tiles.append(q_tiles)
            if prompt_pairs is not None:
                per_window = [prompt_pairs[qi]] * len(windows)
            else:
                ps, ms = list(prompt_sets[qi]), list(prompt_mask_sets[qi])
                if len(ps) != len(ms):
                    raise ValueError(f"query {qi}: {len(ps)} prompt images but {len(ms)} prompt masks")
                if top_k is not None:
                    ps, ms = ps[:top_k], ms[:top_k]
                if tile_pairing == "all" or grid == 1:
                    pp = self.prompt_pairs(ps, ms, grid, work_size, tile_boxes)
                    per_window = [pp] * len(windows)
                else:  # aligned: each window with the prompts' crops at the same box
                    pp = self.prompt_pairs(ps, ms, grid, work_size, all_boxes)
                    nb = len(all_boxes)
                    idx = [[p * nb + b for p in range(len(ps))] for b in range(nb)]
                    per_window = [PromptPairs(pp.images[i], pp.targets[i]) for i in idx]
            for wi, pw in enumerate(per_window):
                groups.append(_Group(base + wi, pw, qi, wi))
        all_tiles = torch.cat(tiles)
        self._sync()
        t1 = time.perf_counter()
        cons_sums: list | None = [] if consistency else None
        outs = self._forward_groups(all_tiles, groups, ensemble, cons_sums)
        self._sync()
        t2 = time.perf_counter()

        results = []
        by_query: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(nq)]
        for g, o in zip(groups, outs):
            by_query[g.owner].append((g.window, o))
        for qi in range(nq):
            canvas = torch.zeros(1, 3, *canvas_hw, device=self.device)
            for wi, out in sorted(by_query[qi], key=lambda t: t[0]):
                w = windows[wi]
                t, l, h, wd = w.box
                img = self._resize(self._denormalize(out)[None], (h, wd))
                pt, pl, ph, pw = w.paste
                canvas[:, :, pt : pt + ph, pl : pl + pw] = img[:, :, pt - t : pt - t + ph, pl - l : pl - l + pw]
            raw = self._resize(canvas, orig_hw[qi]).clamp(0, 255)
            mask, color = self.snap(raw[0])
            score = defect_score(raw[0], self.defect_color)
            # snapping and the score agree at 0.5 up to float rounding: make it exact (ties snap to background)
            score = torch.where(mask, score.clamp_min(0.5), score.clamp_max(_BELOW_HALF))
            cons = None
            if cons_sums is not None:
                num = sum(cons_sums[gi][0] for gi, g in enumerate(groups) if g.owner == qi)
                den = sum(cons_sums[gi][1] for gi, g in enumerate(groups) if g.owner == qi)
                cons = num / den if den > 0 else float("nan")
            results.append(Prediction(
                mask=mask.cpu().numpy(),
                color=color.cpu().numpy(),
                raw=raw[0].permute(1, 2, 0).cpu().numpy() if keep_raw else None,
                n_pairs=sum(len(g.prompts) for g in groups if g.owner == qi),
                score=score.cpu().numpy(),
                consistency=cons,
            ))
        self._sync()
        t3 = time.perf_counter()
        for r in results:
            r.timing = {
                "prepare_s": (t1 - t0) / nq,
                "model_s": (t2 - t1) / nq,
                "post_s": (t3 - t2) / nq,
                "total_s": (t3 - t0) / nq,
            }
        return results
