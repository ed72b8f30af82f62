"""In-context (prompt) tuning: learn a prompt image and prompt label for one defect class.

SegGPT stays frozen (``requires_grad_(False)``, eval mode, no optimiser state for it); only two
tensors are trained, both in the model's normalised space at the model's per-image size
``(H, W) = model.cfg.image_size``:

* ``image``: the prompt image ``(3, H, W)`` (what sits on top of every query);
* ``label``: the prompt label ``(3, H, W)`` (the coloured prompt mask on top of the label pair).

This is SegGPT §3.3 ("in-context tuning"), the step the original project left undone. Each step
takes a batch of the class's labelled images as queries (at model size, randomly flipped),
stacks ``[learned image ; query image]`` and ``[learned label ; query label coloured black /
defect colour]``, hides the query half of the label pair (:func:`~seggpt_lib.utils.masking.query_half_mask`;
with ``mask="query+random"`` also a random share of the prompt-half patches, a dropout on the
learned label) and minimises the model's own masked smooth-L1 loss on the query half
(``valid`` is 0 on the prompt half, 1 on the query, ``fg_weight`` on its defect pixels).
AdamW on the two tensors, lr 1e-1 by default (Painter's advice: large lr, short run), cosine
schedule to 0; after each step the tensors are clamped to the range of real pixels.

Use a learned prompt in place of an image prompt::

    prompt = load_learned_prompt("pit.safetensors", model=predictor.model)
    pred = predictor.predict(query, prompt_pairs=to_prompt_pairs(prompt, predictor))

The predictor must normalise with the prompt's ``mean``/``std`` and snap to its
``defect_color`` (:func:`predictor_kwargs`); :func:`to_prompt_pairs` checks that.

Command line: ``seggpt tune-prompt --weights W --data DIR --class NAME --out FILE.safetensors``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from seggpt_lib.data.cache import ImageCache
from seggpt_lib.data.layout import DefectIndex, resize_pair
from seggpt_lib.model.checkpoint import atomic_write
from seggpt_lib.model.seggpt import SegGPT
from seggpt_lib.predict.predictor import PromptPairs
from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD, cmap_to_lbl, denormalize, normalize
from seggpt_lib.utils.device import autocast, resolve_device, resolve_precision
from seggpt_lib.utils.masking import query_half_mask

__all__ = [
    "DEFAULT_DEFECT_COLOR",
    "FORMAT",
    "INITS",
    "MASKS",
    "PRECISIONS",
    "LearnedPrompt",
    "LearnedPromptError",
    "PromptTuningConfig",
    "frozen",
    "load_learned_prompt",
    "predictor_kwargs",
    "prompt_loss",
    "prompt_pair_tensors",
    "prompt_predict",
    "save_learned_prompt",
    "to_prompt_pairs",
    "tune_prompt",
    "weights_fingerprint",
]

FORMAT = "seggpt-learned-prompt"
FORMAT_VERSION = "1"
# white on black: the default of seggpt_lib.predict.predictor.SegGPTPredictor, so the learned prompt
# paints queries in the colour the predictor snaps to
DEFAULT_DEFECT_COLOR: tuple[int, int, int] = (255, 255, 255)
INITS = ("real", "random")
MASKS = ("query", "query+random")
PRECISIONS = ("fp32", "bf16")
# config keys that do not change what the network computes (for the "other model" warning)
_RUNTIME_KEYS = ("attn_impl", "use_act_checkpoint", "drop_path_rate")


class LearnedPromptError(ValueError):
    """A learned prompt file is unreadable, not a learned prompt, or does not fit the model."""


# ------------------------------------------------------------------------------------------
# the learned prompt
# ------------------------------------------------------------------------------------------
def _triple(v: Sequence[float], name: str, kind=float) -> tuple:
    t = tuple(kind(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"{name} must have three values, got {v!r}")
    return t


class LearnedPrompt(nn.Module):
    """A learnable prompt pair for one defect class, in the model's normalised space.

    Parameters ``image`` and ``label`` are ``(3, H, W)`` float32 tensors, ``(H, W)`` the model's
    per-image size. Metadata: ``class_name``, ``model_config`` (the SegGPT config dict the
    prompt was tuned for), ``defect_color`` (the palette is black + this colour), ``mean`` /
    ``std`` (the normalisation), ``steps`` (tuning steps done), ``final_loss`` (the masked loss
    over the class's images after tuning, ``None`` if not measured) and ``info`` (a free dict:
    initial loss, lr, seed, the init image, the weights' fingerprint, ...).
    """

    def __init__(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        class_name: str = "",
        model_config: dict[str, Any] | None = None,
        defect_color: Sequence[int] = DEFAULT_DEFECT_COLOR,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        steps: int = 0,
        final_loss: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        image, label = torch.as_tensor(image), torch.as_tensor(label)
        if image.ndim != 3 or image.shape[0] != 3 or image.shape != label.shape:
            raise LearnedPromptError(
                f"a learned prompt needs an image and a label of one shape (3, H, W), got "
                f"{tuple(image.shape)} and {tuple(label.shape)}"
            )
        if not (torch.isfinite(image).all() and torch.isfinite(label).all()):
            raise LearnedPromptError("a learned prompt's tensors must be finite")
        self.image = nn.Parameter(image.detach().to(torch.float32).clone())
        self.label = nn.Parameter(label.detach().to(torch.float32).clone())
        self.class_name = str(class_name)
        self.model_config = dict(model_config) if model_config is not None else None
        color = _triple(defect_color, "defect_color", int)
        if not all(0 <= c <= 255 for c in color) or color == (0, 0, 0):
            raise ValueError(f"defect_color must be an RGB triple in 0..255 other than black, got {defect_color}")
        self.defect_color = color
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        self.steps = int(steps)
        self.final_loss = None if final_loss is None else float(final_loss)
        self.info: dict[str, Any] = dict(info or {})

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_pair(
        cls,
        image: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor,
        image_size: tuple[int, int],
        class_name: str = "",
        defect_color: Sequence[int] = DEFAULT_DEFECT_COLOR,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **meta: Any,
    ) -> "LearnedPrompt":
        """From a real prompt: an ``(H0, W0, 3)`` uint8 image and its ``(H0, W0)`` mask (non-zero =
        defect), resized to ``image_size`` (image bilinear, mask nearest, as the data pipeline),
        the mask coloured black / ``defect_color``, both normalised with ``mean``/``std``."""
        img = _as_hwc_uint8(image)
        m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        if m.ndim != 2 or m.shape != img.shape[:2]:
            raise ValueError(f"the prompt mask must be (H, W) = {img.shape[:2]}, got shape {m.shape}")
        img, m = resize_pair(img, (m != 0).astype(np.uint8), image_size)
        img_t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        lbl_t = _colour(torch.from_numpy(np.array(m, dtype=np.uint8)), defect_color)
        return cls(normalize(img_t, mean, std), normalize(lbl_t, mean, std), class_name,
                   defect_color=defect_color, mean=mean, std=std, **meta)

    @classmethod
    def random(
        cls,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        class_name: str = "",
        defect_color: Sequence[int] = DEFAULT_DEFECT_COLOR,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **meta: Any,
    ) -> "LearnedPrompt":
        """Uniform pixel noise (0..255, normalised) for both the image and the label."""
        h, w = int(image_size[0]), int(image_size[1])
        img = torch.rand(3, h, w, generator=generator) * 255.0
        lbl = torch.rand(3, h, w, generator=generator) * 255.0
        return cls(normalize(img, mean, std), normalize(lbl, mean, std), class_name,
                   defect_color=defect_color, mean=mean, std=std, **meta)

    # -- views ----------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def palette(self) -> torch.Tensor:
        """``(2, 3)`` uint8: black background, the defect colour."""
        return torch.tensor([(0, 0, 0), self.defect_color], dtype=torch.uint8)

    def pixel_image(self) -> np.ndarray:
        """The prompt image as ``(H, W, 3)`` uint8 (de-normalised, clipped)."""
        return denormalize(self.image.detach().cpu(), self.mean, self.std).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def pixel_label(self) -> np.ndarray:
        """The prompt label as ``(H, W, 3)`` uint8 (de-normalised, clipped, not snapped)."""
        return denormalize(self.label.detach().cpu(), self.mean, self.std).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def mask(self) -> np.ndarray:
        """The prompt label snapped to the palette: ``(H, W)`` bool, True = defect colour."""
        raw = denormalize(self.label.detach().cpu(), self.mean, self.std)
        return (cmap_to_lbl(raw, self.palette) != 0).numpy()

    def preview(self) -> np.ndarray:
        """Image | label | snapped mask side by side, ``(H, 3W, 3)`` uint8 (for a PNG)."""
        snapped = self.mask()[:, :, None] * np.asarray(self.defect_color, dtype=np.uint8)
        return np.concatenate([self.pixel_image(), self.pixel_label(), snapped.astype(np.uint8)], axis=1)

    def check_fits(self, model: SegGPT | Any, source: str = "learned prompt") -> None:
        """:class:`LearnedPromptError` when the prompt's size is not the model's per-image size;
        a warning when it was tuned for another architecture."""
        cfg = getattr(model, "cfg", model)
        want = tuple(int(v) for v in cfg.image_size)
        if self.image_size != want:
            raise LearnedPromptError(
                f"{source}: the prompt is {self.image_size[0]}x{self.image_size[1]} (HxW) but the model takes "
                f"{want[0]}x{want[1]} images; tune a prompt for this model (seggpt tune-prompt)"
            )
        if self.model_config is not None and hasattr(cfg, "to_dict"):
            mine = {k: v for k, v in self.model_config.items() if k not in _RUNTIME_KEYS}
            theirs = {k: v for k, v in cfg.to_dict().items() if k not in _RUNTIME_KEYS}
            if mine != theirs:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                warnings.warn(f"{source}: tuned for another SegGPT configuration (differs in {diff})", UserWarning,
                              stacklevel=2)
        fp = self.info.get("weights_fingerprint")
        if fp and isinstance(model, nn.Module) and weights_fingerprint(model) != fp:
            warnings.warn(f"{source}: tuned with other weights than this model's (fingerprint differs); "
                          "a prompt learned for one checkpoint may not transfer", UserWarning, stacklevel=2)

    def extra_repr(self) -> str:
        return (f"class={self.class_name!r}, size={self.image_size}, steps={self.steps}, "
                f"final_loss={self.final_loss}, defect_color={self.defect_color}")


def _as_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.permute(1, 2, 0)
        image = t.numpy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"the prompt image must be (H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _colour(mask: torch.Tensor, defect_color: Sequence[int]) -> torch.Tensor:
    """Binary ``(..., H, W)`` -> ``(..., 3, H, W)`` float on 0..255: black / ``defect_color``."""
    c = torch.tensor([float(v) for v in defect_color], device=mask.device).view(3, 1, 1)
    return (mask != 0).unsqueeze(-3).to(torch.float32) * c


def weights_fingerprint(model: SegGPT) -> str:
    """A cheap hash of a few small tensors of the model (tokens, heads): tells checkpoints apart."""
    sd = model.state_dict()
    h = hashlib.sha1()
    for name in ("mask_token", "segment_token_x", "segment_token_y", "type_token_cls", "patch_embed.proj.bias",
                 "decoder_pred.3.weight", "decoder_pred.3.bias"):
        if name in sd:
            h.update(name.encode())
            h.update(sd[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# saving and loading
# ------------------------------------------------------------------------------------------
def save_learned_prompt(prompt: LearnedPrompt, path: str | os.PathLike[str]) -> Path:
    """Write ``prompt`` as safetensors (``image``, ``label``) with its metadata as JSON strings;
    atomic (a crash never leaves a half file)."""
    tensors = {"image": prompt.image.detach().to("cpu", torch.float32).contiguous(),
               "label": prompt.label.detach().to("cpu", torch.float32).contiguous()}
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "class_name": prompt.class_name,
        "seggpt_config": json.dumps(prompt.model_config, sort_keys=True),
        "defect_color": json.dumps(list(prompt.defect_color)),
        "mean": json.dumps(list(prompt.mean)),
        "std": json.dumps(list(prompt.std)),
        "steps": str(prompt.steps),
        "final_loss": json.dumps(prompt.final_loss),
        "info": json.dumps(prompt.info, sort_keys=True, default=str),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_learned_prompt(path: str | os.PathLike[str], model: SegGPT | Any | None = None,
                        device: str | torch.device = "cpu") -> LearnedPrompt:
    """Read a file written by :func:`save_learned_prompt`.

    ``FileNotFoundError`` for a missing file; :class:`LearnedPromptError` for an unreadable or
    truncated file, a file that is not a learned prompt (e.g. model weights), and, when ``model``
    (or its config) is given, a prompt whose size is not the model's.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"learned prompt not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if meta.get("format") != FORMAT:
                raise LearnedPromptError(f"{p}: not a learned prompt file (format {meta.get('format')!r}, "
                                         f"expected {FORMAT!r}; model weights go to --weights)")
            if keys != {"image", "label"}:
                raise LearnedPromptError(f"{p}: expected the tensors 'image' and 'label', found {sorted(keys)}")
            image, label = f.get_tensor("image"), f.get_tensor("label")
        cfg = json.loads(meta.get("seggpt_config", "null"))
        prompt = LearnedPrompt(
            image, label,
            class_name=meta.get("class_name", ""),
            model_config=cfg,
            defect_color=json.loads(meta.get("defect_color", json.dumps(DEFAULT_DEFECT_COLOR))),
            mean=json.loads(meta.get("mean", json.dumps(IMAGENET_MEAN))),
            std=json.loads(meta.get("std", json.dumps(IMAGENET_STD))),
            steps=int(meta.get("steps", "0")),
            final_loss=json.loads(meta.get("final_loss", "null")),
            info=json.loads(meta.get("info", "{}")),
        )
    except LearnedPromptError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        raise LearnedPromptError(f"{p}: cannot read learned prompt (truncated or not a safetensors file): "
                                 f"{type(e).__name__}: {e}") from e
    except Exception as e:  # the safetensors Rust layer raises a few of its own
        raise LearnedPromptError(f"{p}: cannot read learned prompt: {type(e).__name__}: {e}") from e
    if model is not None:
        prompt.check_fits(model, source=str(p))
    return prompt.to(device)


# ------------------------------------------------------------------------------------------
# using a learned prompt
# ------------------------------------------------------------------------------------------
def prompt_pair_tensors(prompt: LearnedPrompt, model: SegGPT | Any | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt as ``(image (3, H, W), target (3, H, W))`` detached float tensors in normalised
    space: what goes on top of a query tile in place of an image prompt. With ``model`` its
    size is checked first."""
    if model is not None:
        prompt.check_fits(model)
    return prompt.image.detach().clone(), prompt.label.detach().clone()


def predictor_kwargs(prompt: LearnedPrompt) -> dict[str, Any]:
    """Arguments for ``SegGPTPredictor`` that match the prompt (normalisation, snapping colour)."""
    return {"mean": prompt.mean, "std": prompt.std, "defect_color": prompt.defect_color}


def to_prompt_pairs(prompt: LearnedPrompt, predictor: Any | None = None):
    """A :class:`seggpt_lib.predict.predictor.PromptPairs` of one pair for ``predictor.predict(...,
    prompt_pairs=...)``. With ``predictor``, checks that it takes the prompt's size and uses
    its normalisation and defect colour (else :class:`LearnedPromptError`)."""
    if predictor is not None:
        prompt.check_fits(predictor.model)
        mine = predictor_kwargs(prompt)
        theirs = {"mean": tuple(predictor.mean), "std": tuple(predictor.std), "defect_color": tuple(predictor.defect_color)}
        bad = [k for k in mine if not np.allclose(np.asarray(mine[k], float), np.asarray(theirs[k], float))]
        if bad:
            raise LearnedPromptError(
                "the predictor does not match the learned prompt: "
                + ", ".join(f"{k} {theirs[k]} vs prompt {mine[k]}" for k in bad)
                + " (build it with SegGPTPredictor(model, **predictor_kwargs(prompt)))"
            )
    img, tgt = prompt_pair_tensors(prompt)
    device = predictor.device if predictor is not None else img.device
    return PromptPairs(img[None].to(device), tgt[None].to(device))


def _stack(prompt_img: torch.Tensor, prompt_lbl: torch.Tensor, q_img: torch.Tensor, q_tgt: torch.Tensor):
    n = q_img.shape[0]
    imgs = torch.cat([prompt_img.unsqueeze(0).expand(n, -1, -1, -1), q_img], dim=2)
    tgts = torch.cat([prompt_lbl.unsqueeze(0).expand(n, -1, -1, -1), q_tgt], dim=2)
    return imgs, tgts


@torch.no_grad()
def prompt_predict(model: SegGPT, prompt: LearnedPrompt, queries: torch.Tensor) -> torch.Tensor:
    """The model's painting of the query half for normalised queries ``(B, 3, H, W)``:
    ``(B, 3, H, W)`` in normalised space (de-normalise and snap to ``prompt.palette``)."""
    prompt.check_fits(model)
    dev = next(model.parameters()).device
    q = queries.to(dev, torch.float32)
    imgs, tgts = _stack(prompt.image.detach().to(dev), prompt.label.detach().to(dev), q, torch.zeros_like(q))
    return model.predict_query(imgs, tgts)


# ------------------------------------------------------------------------------------------
# data: one class's images at model size
# ------------------------------------------------------------------------------------------
class _Images:
    """uint8 images ``(N, 3, H, W)`` and binary labels ``(N, H, W)`` at model size (CPU)."""

    def __init__(self, index, rows: Sequence[int], size: tuple[int, int]) -> None:
        rows = [int(r) for r in rows]
        self.files = [index.files[r] for r in rows]
        if rows:
            cache = ImageCache(index.subset(rows), size, mode="memory", progress=False)
            self.images = torch.from_numpy(cache.images).permute(0, 3, 1, 2).contiguous()
            self.labels = torch.from_numpy(cache.masks != 0)
        else:
            self.images = torch.zeros(0, 3, *size, dtype=torch.uint8)
            self.labels = torch.zeros(0, *size, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.files)


def _as_index(index_or_root):
    if isinstance(index_or_root, DefectIndex):
        return index_or_root
    return DefectIndex.scan(index_or_root, verify=False)


def _class_rows(index, class_name: str) -> tuple[list[int], list[int]]:
    """(defect images of the class, every other image) as index rows."""
    if class_name not in index.class_names:
        raise ValueError(f"class {class_name!r} is not in the dataset; classes: {index.class_names}")
    cid = index.class_names.index(class_name)
    pos = [i for i in range(len(index)) if index.class_ids[i] == cid and not index.is_free[i]]
    if not pos:
        raise ValueError(f"class {class_name!r} has no image with a defect (all masks empty)")
    neg = [i for i in range(len(index)) if index.class_ids[i] != cid or index.is_free[i]]
    return pos, neg


def _batch(data: _Images, rows: torch.Tensor, positive: bool, defect_color, mean, std, flips: torch.Tensor | None,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised query images, normalised coloured targets and binary labels for ``rows``."""
    img = data.images[rows].to(device)
    lbl = data.labels[rows].to(device) if positive else torch.zeros(len(rows), *data.labels.shape[1:], dtype=torch.bool,
                                                                        device=device)
    if flips is not None:  # (n, 2) bool: horizontal, vertical
        flips = flips.to(device)
        for axis, col in ((-1, 0), (-2, 1)):
            sel = flips[:, col]
            if sel.any():
                img[sel] = img[sel].flip(axis)
                lbl[sel] = lbl[sel].flip(axis)
    return normalize(img, mean, std), normalize(_colour(lbl, defect_color), mean, std), lbl


# ------------------------------------------------------------------------------------------
# tuning
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` for every parameter; both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None``: where the model is; otherwise :func:`seggpt_lib.utils.device.resolve_device`."""
    if device is None:
        return next(model.parameters()).device if model is not None else torch.device("cpu")
    return resolve_device(device)


def _eval_loss(model: SegGPT, p_img: torch.Tensor, p_lbl: torch.Tensor, data: _Images, batch_size: int,
               fg_weight: float, defect_color, mean, std, precision: str, device: torch.device) -> float:
    """Mean masked loss over ``data`` as queries (query half hidden, no flips).

    Each batch's loss is weighted by its size: with ``fg_weight == 1`` every image has the same
    number of hidden pixels, so this is the mean of the per-image losses.
    """
    h = p_img.shape[1]
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(data)))
            q_img, q_tgt, q_lbl = _batch(data, rows, True, defect_color, mean, std, None, device)
            imgs, tgts = _stack(p_img, p_lbl, q_img, q_tgt)
            valid = _valid(tgts, q_lbl, h, fg_weight)
            mask = query_half_mask(model.cfg.grid, len(rows), device=device)
            with autocast(device, precision):
                loss = model(imgs, tgts, mask, valid, first_row=model.cfg.grid[0] // 2)[0]
            total += float(loss) * len(rows)
            n += len(rows)
    return total / max(n, 1)


def _valid(tgts: torch.Tensor, q_lbl: torch.Tensor, h: int, fg_weight: float) -> torch.Tensor:
    """0 on the prompt half (the learned label is never a loss target), 1 on the query half,
    ``fg_weight`` on the query's defect pixels."""
    valid = torch.ones_like(tgts)
    valid[:, :, :h] = 0.0
    if fg_weight != 1.0:
        q = valid[:, :, h:]
        q.masked_fill_(q_lbl.unsqueeze(1).expand_as(q), float(fg_weight))
    return valid


def _hidden(grid: tuple[int, int], n: int, mask: str, ratio: float, gen: torch.Generator, device) -> torch.Tensor:
    m = query_half_mask(grid, n)
    if mask == "query+random" and ratio > 0:
        n_half = (grid[0] // 2) * grid[1]
        k = int(round(ratio * n_half))
        order = torch.rand(n, n_half, generator=gen).argsort(dim=1)
        m[:, :n_half].scatter_(1, order[:, :k], True)
    return m.to(device)


def prompt_loss(
    model: SegGPT,
    prompt: LearnedPrompt,
    index_or_root,
    class_name: str | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    fg_weight: float = 1.0,
    precision: str = "fp32",
) -> float:
    """Mean masked loss of ``prompt`` over a class's defect images as queries (query half
    hidden, no augmentation): the number tuning minimises, measured the same way for any
    prompt. ``class_name`` defaults to the prompt's."""
    prompt.check_fits(model)
    index = _as_index(index_or_root)
    pos, _ = _class_rows(index, class_name or prompt.class_name)
    dev = _device(device, model)
    precision = resolve_precision(precision, dev, PRECISIONS)
    data = _Images(index, pos, prompt.image_size)
    model.to(dev)
    with frozen(model):
        return _eval_loss(model, prompt.image.detach().to(dev), prompt.label.detach().to(dev), data, batch_size,
                          fg_weight, prompt.defect_color, prompt.mean, prompt.std, precision, dev)


@dataclass(frozen=True)
class PromptTuningConfig:
    """The prompt-tuning recipe (see the module docstring); its choices are recorded in the
    learned prompt's ``info``.

    ``init``: ``"real"`` (one of the class's images and its mask: ``init_file``, else one drawn
    with ``seed``) or ``"random"`` (pixel noise). ``mask``: ``"query"`` hides the query half;
    ``"query+random"`` also ``prompt_mask_ratio`` of the prompt-half label patches.
    ``negative_share``: that share of each batch are other images (other classes, defect-free)
    with an all-background target, so the prompt also learns to paint nothing on them.
    ``fg_weight``: loss weight of the queries' defect pixels. ``flip``: random flips of the
    queries. ``clamp``: keep the prompt in the range of real pixels after each step.
    ``warmup_steps``: linear warm-up, then cosine to 0. ``precision``: ``"fp32"``, ``"bf16"``
    (autocast; the prompt tensors stay float32) or ``"auto"`` (bf16 on CUDA, else fp32).
    ``defect_color``, ``mean``, ``std``: the palette and the normalisation (those of the
    predictor that will use the prompt). ``evaluate``: measure the loss over all the class's
    images before and after tuning (no flips), in batches of ``eval_batch_size`` (default
    ``batch_size``): ``info["initial_loss"]`` and ``final_loss``.
    """

    steps: int = 100
    lr: float = 1e-1
    batch_size: int = 4
    init: str = "real"
    init_file: str | None = None
    seed: int = 0
    mask: str = "query"
    prompt_mask_ratio: float = 0.25
    fg_weight: float = 1.0
    flip: bool = True
    negative_share: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clamp: bool = True
    precision: str = "fp32"
    defect_color: Sequence[int] = DEFAULT_DEFECT_COLOR
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    evaluate: bool = True
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if not 0.0 <= self.prompt_mask_ratio <= 1.0:
            raise ValueError(f"prompt_mask_ratio must lie in [0, 1], got {self.prompt_mask_ratio}")
        if not 0.0 <= self.negative_share < 1.0:
            raise ValueError(f"negative_share must lie in [0, 1), got {self.negative_share}")
        if self.fg_weight <= 0:
            raise ValueError(f"fg_weight must be positive, got {self.fg_weight}")
        if self.precision not in PRECISIONS + ("auto",):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r} "
                             "(to continue from a learned prompt: tune_prompt(..., start_from=prompt))")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tune_prompt(
    model: SegGPT,
    index_or_root,
    class_name: str,
    config: PromptTuningConfig | None = None,
    *,
    start_from: LearnedPrompt | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[LearnedPrompt, list[dict[str, Any]]]:
    """Learn a prompt image + label for ``class_name`` with SegGPT frozen (see the module docstring).

    ``index_or_root``: a :class:`~seggpt_lib.data.layout.DefectIndex` or a dataset folder. Queries
    are the class's images with a defect (and, with ``config.negative_share``, other images).
    ``config``: the recipe (:class:`PromptTuningConfig`; default: its defaults). ``start_from``: a
    :class:`LearnedPrompt` to continue from instead of ``config.init`` (its palette and
    normalisation are kept). ``device=None`` keeps the model where it is; the model is moved to
    ``device`` and its ``requires_grad`` flags and train/eval mode are restored after.
    ``callback`` is called with each step's history row.

    Returns the prompt (on ``device``) and the history: one dict per step with ``step``,
    ``loss`` (the batch loss before the update), ``lr`` and ``seconds``.
    """
    cfg = config or PromptTuningConfig()
    steps, lr, batch_size, seed, mask = cfg.steps, cfg.lr, cfg.batch_size, cfg.seed, cfg.mask
    fg_weight, flip, negative_share, clamp = cfg.fg_weight, cfg.flip, cfg.negative_share, cfg.clamp
    prompt_mask_ratio, warmup_steps, evaluate = cfg.prompt_mask_ratio, cfg.warmup_steps, cfg.evaluate
    eval_batch_size, defect_color, mean, std = cfg.eval_batch_size, cfg.defect_color, cfg.mean, cfg.std

    size = tuple(int(v) for v in model.cfg.image_size)
    index = _as_index(index_or_root)
    pos, neg = _class_rows(index, class_name)
    n_neg = int(round(batch_size * negative_share)) if negative_share > 0 else 0
    if n_neg and not neg:
        raise ValueError(f"negative_share={negative_share} but the dataset has no image outside class {class_name!r}")
    n_neg = min(n_neg, batch_size - 1)
    dev = _device(device, model)
    precision = resolve_precision(cfg.precision, dev, PRECISIONS)
    gen = torch.Generator().manual_seed(int(seed))
    data = _Images(index, pos, size)
    negs = _Images(index, neg, size) if n_neg else None

    info: dict[str, Any] = {"lr": lr, "batch_size": batch_size, "seed": int(seed), "mask": mask, "fg_weight": fg_weight,
                            "flip": bool(flip), "negative_share": negative_share, "clamp": bool(clamp),
                            "n_images": len(data), "weights_fingerprint": weights_fingerprint(model)}
    if mask == "query+random":
        info["prompt_mask_ratio"] = prompt_mask_ratio
    if start_from is not None:
        init = start_from
        init.check_fits(model)
        prompt = LearnedPrompt(init.image, init.label, class_name, model.cfg.to_dict(), init.defect_color, init.mean,
                               init.std, init.steps, init.final_loss, {**init.info, **info, "init": "continued"})
        defect_color, mean, std = prompt.defect_color, prompt.mean, prompt.std
    elif cfg.init == "random":
        prompt = LearnedPrompt.random(size, gen, class_name, defect_color, mean, std, model_config=model.cfg.to_dict(),
                                      info={**info, "init": "random"})
    else:
        init_file = cfg.init_file
        if init_file is not None:
            try:
                row = index.find(init_file)
            except KeyError:
                raise ValueError(f"init_file {init_file!r} is not in the dataset") from None
            if row not in pos:
                raise ValueError(f"init_file {init_file!r} is not a defect image of class {class_name!r}")
            k = pos.index(row)
        else:
            k = int(torch.randint(len(pos), (1,), generator=gen))
        img = data.images[k].permute(1, 2, 0).numpy()
        prompt = LearnedPrompt.from_pair(img, data.labels[k].numpy(), size, class_name, defect_color, mean, std,
                                         model_config=model.cfg.to_dict(),
                                         info={**info, "init": "real", "init_file": data.files[k]})
    prompt = prompt.to(dev)
    lo = normalize(torch.zeros(3, 1, 1, device=dev), prompt.mean, prompt.std)
    hi = normalize(torch.full((3, 1, 1), 255.0, device=dev), prompt.mean, prompt.std)
    h = size[0]
    grid = model.cfg.grid
    n_pos = batch_size - n_neg

    def draw_rows() -> Iterator[torch.Tensor]:
        """Positive rows: successive seeded permutations of the class's images."""
        buf = torch.zeros(0, dtype=torch.long)
        while True:
            while len(buf) < n_pos:
                buf = torch.cat([buf, torch.randperm(len(data), generator=gen)])
            yield buf[:n_pos]
            buf = buf[n_pos:]

    history: list[dict[str, Any]] = []
    model.to(dev)
    bar = None
    with frozen(model):
        if evaluate:
            prompt.info["initial_loss"] = _eval_loss(model, prompt.image.detach(), prompt.label.detach(), data,
                                                     eval_batch_size or batch_size, fg_weight, defect_color,
                                                     prompt.mean, prompt.std, precision, dev)
        opt = torch.optim.AdamW([prompt.image, prompt.label], lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        if progress:
            bar = tqdm(total=steps, desc=f"tune-prompt {class_name}", unit="step", dynamic_ncols=True, file=sys.stderr)
        rows_it = draw_rows()
        try:
            for step in range(steps):
                t0 = time.perf_counter()
                if step < warmup_steps:
                    cur_lr = lr * (step + 1) / (warmup_steps + 1)
                else:
                    t = (step - warmup_steps) / max(steps - warmup_steps, 1)
                    cur_lr = lr * 0.5 * (1.0 + math.cos(math.pi * t))
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                rows = next(rows_it)
                flips = torch.rand(n_pos, 2, generator=gen) < 0.5 if flip else None
                q_img, q_tgt, q_lbl = _batch(data, rows, True, defect_color, prompt.mean, prompt.std, flips, dev)
                if n_neg:
                    nrows = torch.randint(len(negs), (n_neg,), generator=gen)
                    nflips = torch.rand(n_neg, 2, generator=gen) < 0.5 if flip else None
                    ni, nt, nl = _batch(negs, nrows, False, defect_color, prompt.mean, prompt.std, nflips, dev)
                    q_img, q_tgt, q_lbl = torch.cat([q_img, ni]), torch.cat([q_tgt, nt]), torch.cat([q_lbl, nl])
                imgs, tgts = _stack(prompt.image, prompt.label, q_img, q_tgt)
                hidden = _hidden(grid, batch_size, mask, prompt_mask_ratio, gen, dev)
                valid = _valid(tgts.detach(), q_lbl, h, fg_weight)
                with autocast(dev, precision):
                    # valid is 0 on the prompt half: decoding only the query half gives the same loss
                    loss = model(imgs, tgts, hidden, valid, first_row=grid[0] // 2)[0]
                loss_value = loss.detach().item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"non-finite loss {loss_value} at step {step}; lower the lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if clamp:
                    with torch.no_grad():
                        for t_ in (prompt.image, prompt.label):
                            t_.copy_(torch.maximum(torch.minimum(t_, hi), lo))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                row = {"step": step + 1, "loss": loss_value, "lr": cur_lr, "seconds": time.perf_counter() - t0}
                history.append(row)
                if callback is not None:
                    callback(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{cur_lr:.3g}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        opt.zero_grad(set_to_none=True)
        del opt
        prompt.steps += steps
        if evaluate:
            prompt.final_loss = _eval_loss(model, prompt.image.detach(), prompt.label.detach(), data,
                                           eval_batch_size or batch_size, fg_weight, defect_color, prompt.mean,
                                           prompt.std, precision, dev)
        else:
            prompt.final_loss = history[-1]["loss"]
    prompt.info["seconds_per_step"] = sum(r["seconds"] for r in history) / len(history)
    prompt.image.grad = None
    prompt.label.grad = None
    return prompt, history


# ------------------------------------------------------------------------------------------
# CLI: seggpt tune-prompt
# ------------------------------------------------------------------------------------------
