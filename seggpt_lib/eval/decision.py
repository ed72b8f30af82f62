"""The line's decision: from a per-pixel defect score to pass / defect, with few named parameters.

::

    d = decide(prediction.score, DecisionConfig(pixel_threshold=0.5, min_area=16,
                                                image_score="max_area", image_threshold=40))
    d.defect, d.mask, d.image_score

1. ``score >= pixel_threshold`` is the candidate mask (``pixel_threshold=0.5`` is the snapped mask);
2. connected components (8-connected) smaller than ``min_area`` pixels are dropped;
3. the image score (``image_score``: ``max_area`` = largest component in pixels, ``total_area``
   = kept pixels, ``mean_score`` / ``max_score`` = mean / max score over the kept pixels; 0
   when nothing is kept) is compared with ``image_threshold``;
4. with ``consistency_threshold`` set, a prediction whose prompt consistency
   (:mod:`seggpt_lib.predict.consistency`) is below it is withdrawn (NaN or missing: kept).

The image is a defect when something is kept and every test passes; otherwise it passes and
the mask is empty. ``DecisionConfig()`` reproduces the raw snapped mask.

An :class:`OperatingPoint` (from :mod:`seggpt_lib.eval.calibration`) holds one config per
prompt class plus a default, saved as ``operating_point.json`` beside the weights.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "IMAGE_SCORES",
    "OPERATING_POINT_FILE",
    "Decision",
    "DecisionConfig",
    "OperatingPoint",
    "OperatingPointError",
    "component_areas",
    "decide",
    "image_scores",
    "keep_components",
    "label_components",
    "load_operating_point",
    "operating_point_beside",
    "save_operating_point",
]

IMAGE_SCORES = ("max_area", "total_area", "mean_score", "max_score")
OPERATING_POINT_FILE = "operating_point.json"
_VERSION = 1


@dataclass(frozen=True)
class DecisionConfig:
    """The decision's parameters (see the module docstring); the defaults keep the raw mask."""

    pixel_threshold: float = 0.5
    min_area: int = 0
    image_score: str = "max_area"
    image_threshold: float = 0.0
    consistency_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if not 0.0 <= float(self.pixel_threshold) <= 1.0:
            raise ValueError(f"pixel_threshold must lie in [0, 1], got {self.pixel_threshold}")
        if int(self.min_area) < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecisionConfig":
        known = {"pixel_threshold", "min_area", "image_score", "image_threshold", "consistency_threshold"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown decision keys {sorted(unknown)}; valid keys: {sorted(known)}")
        ct = d.get("consistency_threshold")
        return cls(float(d.get("pixel_threshold", 0.5)), int(d.get("min_area", 0)),
                   str(d.get("image_score", "max_area")), float(d.get("image_threshold", 0.0)),
                   None if ct is None else float(ct))


@dataclass(frozen=True)
class Decision:
    """One image's decision: the kept mask (empty when it passes), its image score, the verdict."""

    mask: np.ndarray
    image_score: float
    defect: bool


# ------------------------------------------------------------------------------------------
# connected components (8-connected), run-length union-find in numpy
# ------------------------------------------------------------------------------------------
def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of a 2-D bool mask: rows, starts, ends (exclusive), row-major order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows, starts, ends


def _run_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Runs and their component label ``0..n-1`` (in order of first run)."""
    rows, starts, ends = _runs(mask)
    n = len(rows)
    parent = list(range(n))
    starts_l, ends_l = starts.tolist(), ends.tolist()

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for y in range(1, mask.shape[0]):
        a, a_end, b, b_end = int(first[y - 1]), int(first[y]), int(first[y]), int(first[y + 1])
        while a < a_end and b < b_end:
            # 8-connected: [s_a, e_a) and [s_b, e_b) touch when s_b <= e_a and s_a <= e_b
            if starts_l[b] <= ends_l[a] and starts_l[a] <= ends_l[b]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends_l[a] < ends_l[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, labels = np.unique(roots, return_inverse=True)
    return rows, starts, ends, labels.reshape(-1), int(labels.max()) + 1 if n else 0


def label_components(mask: Any) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D mask: ``(labels int32 (H, W), n)``; 0 = background,
    components ``1..n``."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {m.shape}")
    rows, starts, ends, labels, n = _run_labels(m)
    out = np.zeros(m.shape, dtype=np.int32)
    for r, s, e, lab in zip(rows, starts, ends, labels):
        out[r, s:e] = lab + 1
    return out, n


def component_areas(mask: Any) -> np.ndarray:
    """Areas (pixels) of the 8-connected components of a 2-D mask, in label order."""
    m = np.asarray(mask).astype(bool)
    _, starts, ends, labels, n = _run_labels(m)
    return np.bincount(labels, weights=ends - starts, minlength=n).astype(np.int64) if n else np.zeros(0, np.int64)


def keep_components(mask: Any, min_area: int) -> np.ndarray:
    """The mask without its 8-connected components smaller than ``min_area`` pixels."""
    m = np.asarray(mask).astype(bool)
    if min_area <= 1 or not m.any():
        return m.copy()
    labels, n = label_components(m)
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_area
    keep[0] = False  # background
    return keep[labels]


# ------------------------------------------------------------------------------------------
# the decision
# ------------------------------------------------------------------------------------------
def image_scores(score: np.ndarray, kept: np.ndarray) -> dict[str, float]:
    """Every image score of :data:`IMAGE_SCORES` for a kept mask (all 0 when it is empty)."""
    if not kept.any():
        return {k: 0.0 for k in IMAGE_SCORES}
    areas = component_areas(kept)
    vals = score[kept]
    return {"max_area": float(areas.max()), "total_area": float(kept.sum()),
            "mean_score": float(vals.mean()), "max_score": float(vals.max())}


def _consistent(consistency: float | None, threshold: float | None) -> bool:
    if threshold is None or consistency is None or math.isnan(consistency):
        return True
    return consistency >= threshold


def decide(score: Any, config: DecisionConfig = DecisionConfig(), consistency: float | None = None) -> Decision:
    """Decide one image from its defect score map ``(H, W)`` on 0..1 (see the module docstring)."""
    s = np.asarray(score, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError(f"a score map must be 2-D, got shape {s.shape}")
    kept = keep_components(s >= config.pixel_threshold, config.min_area)
    value = image_scores(s, kept)[config.image_score]
    defect = bool(kept.any()) and value >= config.image_threshold and _consistent(consistency, config.consistency_threshold)
    return Decision(mask=kept if defect else np.zeros_like(kept), image_score=value, defect=defect)


# ------------------------------------------------------------------------------------------
# operating points
# ------------------------------------------------------------------------------------------
class OperatingPointError(ValueError):
    """A missing or malformed ``operating_point.json`` (the message names the file)."""


@dataclass
class OperatingPoint:
    """Decision configs chosen on validation data: one per prompt class (``per_class``) and a
    ``default`` for the others. ``objective``, ``settings`` (how the validation pairs were
    predicted) and ``validation`` (raw vs calibrated figures) are the record."""

    default: DecisionConfig
    per_class: dict[str, DecisionConfig] = field(default_factory=dict)
    objective: str = "max_pes"
    yield_target: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    def config_for(self, prompt_class: str | None) -> DecisionConfig:
        """The config for a prompt of ``prompt_class`` (the default when it has none)."""
        return self.per_class.get(prompt_class, self.default) if prompt_class is not None else self.default

    @property
    def needs_consistency(self) -> bool:
        return any(c.consistency_threshold is not None for c in [self.default, *self.per_class.values()])

    def to_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, "default": self.default.to_dict(),
                "per_class": {k: v.to_dict() for k, v in sorted(self.per_class.items())},
                "objective": self.objective, "yield_target": self.yield_target,
                "settings": self.settings, "validation": self.validation}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OperatingPoint":
        if not isinstance(d, Mapping) or "default" not in d:
            raise ValueError("expected an object with a 'default' decision")
        per = d.get("per_class") or {}
        if not isinstance(per, Mapping):
            raise ValueError("'per_class' must be an object {class: decision}")
        yt = d.get("yield_target")
        return cls(DecisionConfig.from_dict(d["default"]),
                   {str(k): DecisionConfig.from_dict(v) for k, v in per.items()},
                   str(d.get("objective", "max_pes")), None if yt is None else float(yt),
                   dict(d.get("settings") or {}), dict(d.get("validation") or {}))


def operating_point_beside(weights: str | os.PathLike) -> Path:
    """Where the operating point of ``weights`` lives: ``operating_point.json`` in the weights'
    folder (inside it, for a checkpoint folder)."""
    w = Path(weights)
    return (w if w.is_dir() else w.parent) / OPERATING_POINT_FILE


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def save_operating_point(point: OperatingPoint, path: str | os.PathLike) -> Path:
    """Write ``point`` as JSON (NaN as null) to ``path``, atomically (temporary sibling + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(point.to_dict()), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_operating_point(path: str | os.PathLike) -> OperatingPoint:
    """Read an operating point; :class:`OperatingPointError` naming the file when it is missing
    or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OperatingPointError(f"{path}: cannot read the operating point ({e.strerror or e})") from None
    try:
        return OperatingPoint.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as e:
        raise OperatingPointError(f"{path}: not a valid operating point: {e}") from None
