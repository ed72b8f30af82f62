"""Fine-tuning SegGPT on defect pairs: config, learning-rate schedule, trainer, checkpoints.

One process: ``seggpt train --config cfg.json``. Several (DDP, gloo on CPU, NCCL on GPU):
``torchrun --nproc_per_node N -m seggpt_lib train --config cfg.json``. The pair stream is a
pure function of (seed, epoch, sample number), ranks take interleaved samples, so a run
with N ranks and batch B sees the samples of one process with batch N*B, and a resumed run
continues exactly where the saved one stopped.

Run folder ``log_dir/<run_id>/``: ``config.json``, ``metrics.csv``, TensorBoard events and
``checkpoints/{last,best,step_N}/`` (``model.safetensors``, ``trainer_state.pt`` holding only
tensors and plain values, ``config.json``, and ``checkpoint.json`` written last: a folder without
it is incomplete). ``last`` is rewritten (atomically) every ``ckpt_interval`` steps, at epoch ends,
at the end and on SIGINT/SIGTERM (the run stops after the current step); ``--resume`` continues
from ``last``, else from the highest complete ``step_N``. ``max_steps``, when set, is the length of
the run (epochs roll over); without it the run lasts ``epoch`` epochs. ``max_minutes`` is an optional
wall-clock cap on top: a run it ends depends on the machine's load, a run of ``max_steps`` does not
(the same config and seed write the same ``metrics.csv``, timing columns aside).

Validation scores the test's task (:meth:`Trainer.evaluate`): fixed positive, negative and defect-free
pairs with the query half hidden, scored by :func:`seggpt_lib.eval.metrics.evaluate` (catch, yield,
PES, mIoU). ``checkpoints/best`` is the validation with the best ``select_by`` figure (``pes``; ``miou``:
the positive mIoU, the original's rule); a validation where the model paints nothing or everything
(:func:`collapse_of`) raises a :class:`CollapseWarning`, is marked in ``metrics.csv`` (``collapse``)
and, with ``select_by`` ``pes``, is kept as ``best`` only while no validation without a collapse exists.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from seggpt_lib import data as D
from seggpt_lib.data.pairs import query_defect_weight
from seggpt_lib.eval import metrics as M
from seggpt_lib.model.checkpoint import CheckpointError, load_weights, safe_torch_load, save_weights
from seggpt_lib.model.seggpt import SegGPT, SegGPTConfig, build_seggpt
from seggpt_lib.utils.colors import IMAGENET_MEAN, IMAGENET_STD, cmap_to_lbl, defect_score, denormalize
from seggpt_lib.utils.config import ConfigError, check_fields, field_types, is_number, read_json_config, type_matches
from seggpt_lib.utils.device import autocast, precision_dtype, resolve_device, resolve_precision
from seggpt_lib.utils.masking import patch_mask_to_pixels


@dataclass
class TrainConfig:
    """Every key of a training config. The original ``configs/base.json`` keys keep their meaning."""

    # --- the original's keys
    lr: float = 1e-4
    cycle_mult: float = 1.2
    lr_decay_factor: float = 0.5
    cycle_steps: int = 5000
    warmup_steps: int = 500
    min_lr: float = 1e-8
    batch_size: int = 4
    epoch: int = 1
    log_dir: str = "runs"
    train_dataset_dir: str = ""
    val_dataset_dir: str = ""
    data_count: int | None = None  # training pairs per epoch (default: number of training images)
    mask_ratio: float = 0.75
    num_workers: int = 2
    eval_per_epoch: int = 2
    ckpt_interval: int = 0  # keep a step_N checkpoint every N steps (0: only last/best)
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    image_log_interval: int = 0  # TensorBoard image row every N steps (0: at evaluations only)
    n_classes: int = 2
    # --- new keys
    preset: str = "vit_large"
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides (official constructor names)
    init_weights: str | None = None
    max_steps: int | None = None
    max_minutes: float | None = None  # optional wall-clock cap: stop (evaluate, checkpoint) when it is spent
    precision: str = "auto"  # bf16 | fp16 | fp32 | auto (bf16 on CUDA, fp32 on CPU)
    seed: int = 0
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # 0: off
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False
    negative_target: str = "query_mask"  # or "empty" (class-aware)
    negative_share: float = 0.25
    defect_color: list[int] | None = None  # one fixed defect colour (binary sets); None: random per sample (original)
    query_mask_share: float = 0.0  # share of training samples with the whole query half hidden (the inference task)
    free_share: float = 0.0
    fg_weight: float | str = 1.0  # weight of defect pixels in the loss (1 = the original loss); "auto": auto_fg_weight
    weight_query_defects: bool | float = False  # a query's own defects its target leaves out weigh fg_weight (True) or this
    layer_decay: float = 1.0  # lr x layer_decay^(depth - layer) (1: off)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen
    augment: dict[str, Any] | None = None  # seggpt_lib.data.transforms.AugmentConfig fields; None = defaults
    val_pairs: int = 64
    val_negative_share: float = 0.25  # validation pairs: negative share (the rest: positives and defect-free)
    val_free_share: float = 0.25  # validation pairs: defect-free share
    select_by: str = "pes"  # checkpoints/best: best validation PES (the test's score) | "miou" (positive mIoU, the original)
    log_interval: int = 10
    device: str = "auto"
    compile: bool | str = False  # false | "blocks" (each block compiled, seconds) | "full"/true (whole model)
    run_id: str | None = None

    @classmethod
    def valid_keys(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """A config from (some of) its keys, the rest defaults. An unknown key, a value of the wrong
        type or out of range raise :class:`~seggpt_lib.utils.config.ConfigError` (a ValueError)
        naming ``source``, the key and the value."""
        cls.check_keys(d, source)
        cfg = cls(**d)
        cfg.check(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        """The config of a JSON file (:func:`~seggpt_lib.utils.config.read_json_config`: every
        error names the file; a missing file: ``FileNotFoundError``), updated by ``overrides``
        (checked as ``--set``)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        d = read_json_config(path, what="training config")
        cls.check_keys(d, str(path))
        if overrides:
            cls.check_keys(overrides, "--set")
            d.update(overrides)
        return cls.from_dict(d, source=str(path))

    @classmethod
    def check_keys(cls, values: Mapping[str, Any], source: str = "config", prefix: str = "") -> None:
        """Some of the keys (a partial config: a recipe, ``--set`` overrides): each must be a
        field, of the field's type and in its range (:data:`TRAIN_RANGES`); model overrides must
        be :class:`~seggpt_lib.model.seggpt.SegGPTConfig` fields of their types. Raises
        :class:`~seggpt_lib.utils.config.ConfigError` naming ``source``, the key and the value."""
        check_fields(values, cls, source, prefix, what="TrainConfig")
        for k, v in values.items():
            rule = TRAIN_RANGES.get(k)
            if rule is not None and not rule[0](v):
                raise ConfigError(f"{source}: {prefix}{k} must be {rule[1]}, got {v!r}")
        if "model" in values:
            check_fields(values["model"], SegGPTConfig, source, f"{prefix}model.", what="SegGPTConfig")

    def check(self, source: str = "config") -> None:
        self.check_keys(self.to_dict(), source)
        if not self.train_dataset_dir:
            raise ConfigError(f"{source}: train_dataset_dir is required")
        if self.negative_share + self.free_share > 1:
            raise ConfigError(f"{source}: negative_share ({self.negative_share}) + free_share ({self.free_share}) "
                              "must be <= 1")
        if self.val_negative_share + self.val_free_share > 1:
            raise ConfigError(f"{source}: val_negative_share ({self.val_negative_share}) + val_free_share "
                              f"({self.val_free_share}) must be <= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _at_least(lo: float) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and v >= lo


def _share(v: Any) -> bool:
    return is_number(v) and 0 <= v <= 1


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def _triple(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(rule(x) for x in v)


# checkpoints/best by: the validation PES (the test's score), or the positive mIoU (the original's rule)
SELECT_BY = ("pes", "miou")

# TrainConfig's ranges (types come from the annotations): key -> (test, what the message says)
TRAIN_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "cycle_mult": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "lr_decay_factor": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "cycle_steps": (_at_least(1), "an integer >= 1"),
    "warmup_steps": (_at_least(0), "an integer >= 0"),
    "min_lr": (_at_least(0), "a number >= 0"),
    "batch_size": (_at_least(1), "an integer >= 1"),
    "epoch": (_at_least(1), "an integer >= 1"),
    "data_count": (_optional(_at_least(1)), "an integer >= 1 or null"),
    "mask_ratio": (_share, "a number in [0, 1]"),
    "num_workers": (_at_least(0), "an integer >= 0"),
    "eval_per_epoch": (_at_least(0), "an integer >= 0"),
    "ckpt_interval": (_at_least(0), "an integer >= 0"),
    "image_mean": (_triple(_share), "three numbers in [0, 1] (R, G, B)"),
    "image_std": (_triple(lambda v: is_number(v) and v > 0), "three numbers > 0 (R, G, B)"),
    "image_log_interval": (_at_least(0), "an integer >= 0"),
    "n_classes": (_at_least(1), "an integer >= 1"),
    "max_steps": (_optional(_at_least(0)), "an integer >= 0 or null"),
    "max_minutes": (_optional(_at_least(0)), "a number >= 0 or null"),
    "precision": (lambda v: v in ("auto", "bf16", "fp16", "fp32"), "bf16, fp16, fp32 or auto"),
    "weight_decay": (_at_least(0), "a number >= 0"),
    "grad_clip": (_at_least(0), "a number >= 0 (0: off)"),
    "grad_accum_steps": (_at_least(1), "an integer >= 1"),
    "negative_target": (lambda v: v in ("query_mask", "empty"), "'query_mask' or 'empty'"),
    "negative_share": (_share, "a number in [0, 1]"),
    "defect_color": (_optional(_triple(lambda v: is_number(v) and 0 <= v <= 255)),
                     "three integers in [0, 255] (R, G, B) or null"),
    "query_mask_share": (_share, "a number in [0, 1]"),
    "free_share": (_share, "a number in [0, 1]"),
    "fg_weight": (lambda v: v == "auto" or (is_number(v) and v > 0), "a number > 0 or \"auto\""),
    "weight_query_defects": (lambda v: isinstance(v, bool) or (is_number(v) and v > 0), "true, false or a weight > 0"),
    "layer_decay": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "val_pairs": (_at_least(0), "an integer >= 0"),
    "val_negative_share": (_share, "a number in [0, 1]"),
    "val_free_share": (_share, "a number in [0, 1]"),
    "select_by": (lambda v: v in SELECT_BY, "'pes' or 'miou'"),
    "log_interval": (_at_least(1), "an integer >= 1"),
    "compile": (lambda v: isinstance(v, bool) or v in ("blocks", "full"), "false, \"blocks\", \"full\" or true"),
}


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs of :class:`TrainConfig` keys; values parsed as JSON where they can be
    (numbers, lists, true/null), else kept as text (also when the key takes text and the JSON
    value would not fit: ``run_id=2024``). Each key and value is checked
    (:meth:`TrainConfig.check_keys`): :class:`~seggpt_lib.utils.config.ConfigError` naming
    ``--set``, the key and the value."""
    out: dict[str, Any] = {}
    types_ = field_types(TrainConfig)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        try:
            val = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            val = v
        if k in types_ and not type_matches(val, types_[k]) and type_matches(v, types_[k]):
            val = v  # text wanted: keep it as typed
        out[k] = val
        TrainConfig.check_keys({k: val}, f"--set {item}")
    return out


# ------------------------------------------------------------------------------------------
# learning-rate schedule: cosine annealing with warm restarts (the original's)
# ------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: cycle ``i`` lasts ``cycle_steps * cycle_mult**i`` steps, peaks at
    ``lr * lr_decay_factor**i`` after a linear warm-up from ``min_lr``, then follows a cosine
    down to ``min_lr``."""
    length, start, i = float(cfg.cycle_steps), 0.0, 0
    while step >= start + int(length):
        start += int(length)
        length *= cfg.cycle_mult
        i += 1
    pos = step - start
    cycle_len = int(length)
    peak = cfg.lr * cfg.lr_decay_factor**i
    warm = min(cfg.warmup_steps, max(cycle_len - 1, 0))
    if pos < warm:
        return cfg.min_lr + (peak - cfg.min_lr) * pos / warm
    t = (pos - warm) / max(cycle_len - warm, 1)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------
# the defect weight from the data; collapse
# ------------------------------------------------------------------------------------------
AUTO_FG_SHARE = 0.4  # fg_weight "auto": the share of a defect image's loss weight its defect pixels get
AUTO_FG_RANGE = (1.0, 100.0)  # fg_weight "auto" is clipped to this range
COLLAPSE_NOTHING = 1e-3  # predicted defect share of the validation queries below this: the model paints nothing
COLLAPSE_EVERYTHING = 0.9  # above this: the model paints everything


def defect_share(cache: Any) -> float:
    """The defect share ``p`` of a set: defect pixels over all pixels of the images that hold a
    defect (defect-free images left out), read from an
    :class:`~seggpt_lib.data.cache.ImageCache`'s masks (the cache's size, before augmentation);
    NaN without a defect image. The synthetic set: about 0.023."""
    index = cache.index
    rows = np.flatnonzero(~np.asarray(index.is_free, dtype=bool))
    if not len(rows):
        return float("nan")
    hit = total = 0
    masks = getattr(cache, "masks", None)
    for lo in range(0, len(rows), 256):
        chunk = rows[lo : lo + 256]
        if masks is not None:
            m = np.asarray(masks[chunk])
            hit += int(np.count_nonzero(m))
            total += int(m.size)
        else:
            for i in chunk:
                m = np.asarray(cache.get(int(i))[1])
                hit += int(np.count_nonzero(m))
                total += int(m.size)
    return hit / total if total else float("nan")


def auto_fg_weight(p: float) -> float:
    """``fg_weight`` "auto" for a set of defect share ``p`` (:func:`defect_share`): the weight that
    gives the defect pixels of a defect image the share :data:`AUTO_FG_SHARE` (0.4) of its loss
    weight, ``w p / (w p + 1 - p) = 0.4``, i.e. ``w = 0.4 / 0.6 * (1 - p) / p``, clipped to
    :data:`AUTO_FG_RANGE`; 1 when ``p`` is 0 or unknown.

    Why a share and why 0.4: what tips a model into painting everything is the defect pixels'
    share of the weight, not the weight itself. On the synthetic set (p = 2.3 %) fg x10, x30, x60
    give them 19 %, 41 %, 59 %; x30 and x60 learned best, x10 half as well (benchmarks/README.md,
    round 3). On a steel set (p about 10 %) x30 gives them 77 % and the model painted every pixel
    (painting everything then costs less than painting nothing), x3 (25 %) learned. 0.4 is the
    measured good point and stays below one half, where painting everything and painting nothing
    cost the same: p 2.3 % -> about 28, p 10 % -> 6, p 40 % and more -> 1 (no weighting)."""
    p = float(p)
    if not (p > 0):
        return 1.0
    w = AUTO_FG_SHARE / (1.0 - AUTO_FG_SHARE) * (1.0 - p) / p
    return float(min(max(w, AUTO_FG_RANGE[0]), AUTO_FG_RANGE[1]))


class CollapseWarning(UserWarning):
    """The model paints (almost) nothing or (almost) everything on validation queries whose true
    defect share is neither: it no longer reads the images (:func:`collapse_of`). Warned at each
    such validation, marked in ``metrics.csv`` (``collapse``), ``TrainResult.collapse`` and the
    pipeline's training fragment; ``seggpt train`` prints it in capitals."""


def collapse_of(pred_share: float, true_share: float, summary: Mapping[str, Any] | None = None) -> str:
    """``"nothing"``, ``"everything"`` or ``""`` (no collapse). A collapse: the predicted defect share
    of the queries (``pred_share``) is below :data:`COLLAPSE_NOTHING` or above
    :data:`COLLAPSE_EVERYTHING` while the true share is neither; or (``summary``: the figures of
    :func:`seggpt_lib.eval.metrics.evaluate`) every headline figure equals a trivial baseline's
    (:func:`seggpt_lib.eval.metrics.trivial_baseline`)."""
    if COLLAPSE_NOTHING <= true_share <= COLLAPSE_EVERYTHING:
        if pred_share < COLLAPSE_NOTHING:
            return "nothing"
        if pred_share > COLLAPSE_EVERYTHING:
            return "everything"
    if summary is not None:
        base = M.trivial_baseline(summary)
        if base is not None:
            return {"paint_nothing": "nothing", "paint_everything": "everything"}[base]
    return ""


def collapse_message(what: str, step: int, pred_share: float, true_share: float) -> str:
    """The line a :class:`CollapseWarning` says."""
    fix = ("lower fg_weight (or fg_weight auto: it follows the set's defect share)" if what == "everything"
           else "train longer, or raise fg_weight")
    return (f"collapse at step {step}: the model paints {what} (predicted defect share {pred_share:.4f} of the "
            f"validation queries, true share {true_share:.4f}); every figure then equals the paint-{what} "
            f"baseline: {fix}")


# ------------------------------------------------------------------------------------------
# distributed helpers (torchrun environment variables)
# ------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_gather_list(items: list[Any], info: DistInfo) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order (plain Python objects)."""
    if info.world_size == 1:
        return items
    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def _all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    if info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------
# model, optimiser
# ------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> SegGPT:
    overrides = dict(cfg.model)
    if cfg.activation_checkpointing:
        overrides["use_act_checkpoint"] = True
    model = build_seggpt(cfg.preset, **overrides)
    if cfg.init_weights:
        load_weights(model, cfg.init_weights)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in cfg.freeze):
            p.requires_grad_(False)
    return model


def _layer_id(name: str, depth: int) -> int:
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("patch_embed", "pos_embed", "mask_token", "segment_token", "type_token")):
        return 0
    return depth + 1  # final norm and decoder


def param_groups(model: SegGPT, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases and tokens; optional layer-wise lr decay."""
    depth = model.cfg.depth
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(("token", "token_x", "token_y", "pos_embed", "rel_pos_h", "rel_pos_w", "_cls", "_ins"))
        scale = cfg.layer_decay ** (depth + 1 - _layer_id(name, depth)) if cfg.layer_decay != 1.0 else 1.0
        groups.setdefault((0.0 if no_wd else cfg.weight_decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": s} for (wd, s), ps in groups.items()]


# ------------------------------------------------------------------------------------------
# checkpoints: each folder is written under ``<name>.tmp``, completed by ``checkpoint.json``
# (written last), then swapped in by rename; a crash never leaves a half-written folder in place
# ------------------------------------------------------------------------------------------
CKPT_MARKER = "checkpoint.json"
CKPT_FILES = ("model.safetensors", "trainer_state.pt", "config.json")
_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (a ``weights_only`` load reads them back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(x) for x in py_state], None if gauss is None else float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` onto ``folder``; the previous one stays as ``<name>.old`` until then."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def _fresh_tmp(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(folder: Path, model: SegGPT, state: dict[str, Any]) -> None:
    """Write ``folder`` (weights, trainer state, config, then the completion marker) atomically."""
    tmp = _fresh_tmp(folder)
    save_weights(model, tmp / "model.safetensors")
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "config.json").write_text(json.dumps(state["config"], indent=2))
    for name in CKPT_FILES:
        _fsync(tmp / name)
    marker = {"format": 2, "step": int(state["step"]), "files": list(CKPT_FILES)}
    (tmp / CKPT_MARKER).write_text(json.dumps(marker, indent=2))
    _fsync(tmp / CKPT_MARKER)
    _swap_in(tmp, folder)


def copy_checkpoint(src: Path, folder: Path) -> None:
    """``folder`` as a copy of the complete checkpoint ``src`` (hard links where the disk allows:
    checkpoint files are never modified in place, only replaced)."""
    tmp = _fresh_tmp(folder)
    for f in sorted(src.iterdir(), key=lambda f: f.name == CKPT_MARKER):  # the marker last
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    _swap_in(tmp, folder)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a COMPLETE checkpoint folder, else None. Complete: the marker and every file it
    lists are there; a folder from before the marker existed counts when weights and state are."""
    if not folder.is_dir() or not (folder / "model.safetensors").is_file() or not (folder / "trainer_state.pt").is_file():
        return None
    marker = folder / CKPT_MARKER
    if not marker.is_file():
        m = _STEP_DIR.match(folder.name)
        return int(m.group(1)) if m else -1  # an older run's folder: step known once the state is read
    try:
        info = json.loads(marker.read_text())
        if not all((folder / name).is_file() for name in info["files"]):
            return None
        return int(info["step"])
    except (ValueError, KeyError, TypeError):
        return None


def find_resume_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``--resume`` continues from: ``checkpoints/last`` when complete, else the
    complete ``step_N`` with the highest N (a ``.old`` folder stands in for one that a crash
    left missing mid-swap); None when there is none."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    for name in ("last", "last.old"):
        if checkpoint_step(ck / name) is not None:
            return ck / name
    steps: list[tuple[int, Path]] = []
    for f in ck.iterdir():
        m = _STEP_DIR.match(f.name)
        if m and not (m.group(2) and (ck / f"step_{m.group(1)}").exists()) and checkpoint_step(f) is not None:
            steps.append((int(m.group(1)), f))
    return max(steps)[1] if steps else None


_STATE_KEYS = ("step", "optimizer", "scaler", "rng")


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read with ``weights_only=True`` (tensors and plain values
    only: a file that needs more is refused with an error, never executed)."""
    path = folder / "trainer_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no trainer state in {folder} (expected {path.name}); is this a run's checkpoint folder?")
    state = safe_torch_load(path, what="trainer state", hint=(
        "written by another program or tampered with; to continue from these weights, start a new run with "
        f"init_weights={folder / 'model.safetensors'}"))
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise CheckpointError(f"{path}: not a trainer state (expected a dict with {', '.join(_STATE_KEYS)})")
    return state


# ------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------
# metrics.csv: one row per logged step. fg_frac: the predicted defect share of the training batch's
# query halves at that step; the val_* columns: the validation at that step (NaN on other rows):
# val_miou is the positive pairs' mIoU (= val_miou_pos, the earlier column), val_fg_frac the
# predicted defect share of the validation queries, val_gt_frac their true share, collapse
# "nothing" / "everything" / empty (collapse_of); val_prompt_auroc: does the prompt change what is
# painted, threshold-free (Trainer.evaluate). Timing columns: samples_per_s, elapsed_s.
METRIC_FIELDS = ["step", "epoch", "lr", "loss", "fg_frac", "val_loss", "val_miou", "val_fg_frac", "samples_per_s", "elapsed_s",
                 "val_pes", "val_catch", "val_yield_neg", "val_yield_free", "val_miou_pos", "val_miou_neg", "val_gt_frac",
                 "collapse", "val_prompt_auroc"]
VAL_FIELDS = ["val_loss", "val_miou", "val_fg_frac", "val_pes", "val_catch", "val_yield_neg", "val_yield_free",
              "val_miou_pos", "val_miou_neg", "val_gt_frac", "val_prompt_auroc"]
TIMING_FIELDS = ("samples_per_s", "elapsed_s")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    """A run: its folder, the step reached, ``metrics.csv``'s rows (``history``), and the kept
    ``best`` checkpoint: chosen by ``select_by``, its validation figures ``best_val`` (VAL_FIELDS
    and ``collapse``), ``best_miou`` (its positive mIoU; -1: no validation) and ``best_score`` (its
    ``select_by`` figure), at ``best_step``. ``collapse``: the last validation's collapse ("nothing",
    "everything", "": none), ``collapse_steps`` every validation step with one. ``fg_weight``: the
    defect weight used (``fg_weight`` "auto" resolved), ``defect_share`` the training set's."""

    run_dir: Path
    step: int
    best_miou: float
    history: list[dict[str, Any]]
    interrupted: str | None = None  # the signal (SIGINT/SIGTERM) that stopped the run early, with last saved
    select_by: str = "pes"
    best_score: float = float("nan")
    best_step: int | None = None
    best_val: dict[str, Any] = field(default_factory=dict)
    collapse: str = ""
    collapse_steps: list[int] = field(default_factory=list)
    fg_weight: float = 1.0
    defect_share: float = float("nan")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a step; ``checkpoints/last`` holds that step.

    A KeyboardInterrupt, so that callers which do not handle it stop as on any Ctrl-C;
    ``result`` is the run so far (``result.interrupted`` names the signal)."""

    def __init__(self, result: TrainResult) -> None:
        self.result = result
        super().__init__(f"{result.interrupted}: stopped at step {result.step} with {result.run_dir / 'checkpoints' / 'last'} "
                         f"saved; resume with: seggpt train --resume {result.run_dir}")


def query_rgb(pred_img: torch.Tensor, mean, std) -> torch.Tensor:
    """The painted query half ``(B, 3, H, W)`` on 0..255 from the model's normalised prediction."""
    rgb = denormalize(pred_img.float(), mean, std)
    return rgb[:, :, rgb.shape[-2] // 2:]


def _snap_query(pred_img: torch.Tensor, palette: torch.Tensor, mean, std) -> torch.Tensor:
    """Predicted query-half class indices ``(B, H, W)`` after palette snapping."""
    return cmap_to_lbl(query_rgb(pred_img, mean, std), palette)


def query_defect_score(rgb: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """The per-pixel defect score ``(B, H, W)``, 0..1, of painted query halves ``rgb``
    (:func:`query_rgb`) before snapping: how far each pixel lies from its sample's background
    colour toward its defect colour (``palette[:, 0]``, ``palette[:, 1]``;
    :func:`~seggpt_lib.utils.colors.defect_score`)."""
    return torch.stack([defect_score(rgb[j], palette[j, 1].tolist(), palette[j, 0].tolist())
                        for j in range(rgb.shape[0])])


class _StopOnSignal:
    """SIGINT/SIGTERM while training: note the signal, let the current step finish (the trainer
    then saves ``checkpoints/last`` and returns); a second Ctrl-C aborts at once without saving."""

    def __init__(self, verbose: bool = True) -> None:
        self.signum: int | None = None
        self.verbose = verbose
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving checkpoints/last "
                  "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)


def _worker_ignores_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, resume: bool = False) -> None:

        self.cfg = cfg
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.info = init_distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.dtype = precision_dtype(self.precision)
        torch.manual_seed(cfg.seed)

        self.model = build_model(cfg).to(self.device)
        self.mcfg = self.model.cfg
        self.train_index = D.DefectIndex.scan(cfg.train_dataset_dir)
        self.val_index = D.DefectIndex.scan(cfg.val_dataset_dir) if cfg.val_dataset_dir else None
        aug = D.AugmentConfig.from_dict(cfg.augment) if cfg.augment is not None else None
        auto = cfg.fg_weight == "auto"
        common = dict(
            mask_ratio=cfg.mask_ratio, negative_target=cfg.negative_target, n_classes=cfg.n_classes,
            mean=cfg.image_mean, std=cfg.image_std, seed=cfg.seed, fg_weight=1.0 if auto else float(cfg.fg_weight),
            weight_query_defects=cfg.weight_query_defects, defect_color=cfg.defect_color,
        )
        self.data_count = int(cfg.data_count or len(self.train_index))
        self.train_ds = D.PairDataset(self.train_index, D.PairConfig.for_model(
            self.mcfg, train=True, augment=aug, length=self.data_count, query_mask_share=cfg.query_mask_share,
            negative_share=cfg.negative_share, free_share=cfg.free_share, **common))
        self.val_ds = (
            D.PairDataset(self.val_index, D.PairConfig.for_model(
                self.mcfg, train=False, length=cfg.val_pairs, negative_share=cfg.val_negative_share,
                free_share=cfg.val_free_share, **common))
            if self.val_index is not None else None
        )
        # the defect weight: fixed, or ("auto") from the training set's defect share
        self.defect_share = defect_share(self.train_ds.cache)
        self.fg_weight = auto_fg_weight(self.defect_share) if auto else float(cfg.fg_weight)
        for ds in (self.train_ds, self.val_ds):
            if ds is not None:
                ds.fg_weight = self.fg_weight
        if self.info.is_main:
            how = (f"fg_weight auto = {self.fg_weight:.2f} (the training set's defect images are {100 * self.defect_share:.2f} % "
                   f"defect pixels: they get {100 * AUTO_FG_SHARE:.0f} % of the loss weight)" if auto else
                   f"fg_weight {self.fg_weight:g} (the training set's defect images are {100 * self.defect_share:.2f} % defect pixels)")
            w_query = query_defect_weight(cfg.weight_query_defects, self.fg_weight)
            if w_query != 1.0:
                how += f"; the query's own defects weigh {w_query:.3g} in every pair (weight_query_defects)"
            print(how, file=sys.stderr, flush=True)
        self.global_batch = cfg.batch_size * cfg.grad_accum_steps * self.info.world_size
        self.steps_per_epoch = max(1, self.data_count // self.global_batch)
        # an explicit max_steps is the run's length (epochs roll over); else epoch x steps per epoch
        self.total_steps = int(cfg.max_steps) if cfg.max_steps else cfg.epoch * self.steps_per_epoch

        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg), lr=cfg.lr, betas=(0.9, 0.999),
            **({"fused": True} if self.device.type == "cuda" else {}),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ddp_model: torch.nn.Module = self.model
        if self.info.world_size > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile == "blocks":
            self.model.compile_blocks()  # in place: DDP and checkpoints see the same module
        full = cfg.compile is True or cfg.compile == "full"
        self.forward_model = torch.compile(self.ddp_model) if full else self.ddp_model

        self.step = 0
        self._last_saved_step: int | None = None  # step of checkpoints/last as this trainer knows it
        self.best_miou = -1.0  # positive val mIoU of checkpoints/best (-1: none yet)
        self.best_key: tuple[float, ...] | None = None  # the select_by key of checkpoints/best (_select_key)
        self.best_step: int | None = None
        self.best_val: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        if run_dir is None:
            run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.log_dir) / run_id
        self.run_dir = Path(run_dir)
        if resume:
            self._resume()
        elif self.info.is_main:
            if (self.run_dir / "checkpoints").exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; resume it with --resume {self.run_dir} or pick another run_id")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.writer = None
        if self.info.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # tensorboard is in requirements; keep training without it
                self.writer = None

    # -- state --------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "cosine_warm_restarts", "step": self.step},
            "best_miou": self.best_miou,
            "select_by": self.cfg.select_by,
            "best_key": [float(v) for v in self.best_key] if self.best_key is not None else [],
            "best_step": -1 if self.best_step is None else int(self.best_step),
            "best_val": {k: (v if isinstance(v, str) else float(v)) for k, v in self.best_val.items()},
            "fg_weight": float(self.fg_weight),
            "defect_share": float(self.defect_share),
            "rng": _rng_state(),
            "config": self.cfg.to_dict(),
            "model_config": self.mcfg.to_dict(),
        }

    def _resume(self) -> None:
        folder = find_resume_checkpoint(self.run_dir)
        if folder is None:
            ck = self.run_dir / "checkpoints"
            there = sorted(f.name for f in ck.iterdir()) if ck.is_dir() else []
            raise FileNotFoundError(
                f"{self.run_dir}: no complete checkpoint to resume from (looked for checkpoints/last, then "
                f"checkpoints/step_N; found {there or 'none'}); start a new run instead")
        state = load_trainer_state(folder)
        load_weights(self.model, folder / "model.safetensors")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.best_miou = float(state.get("best_miou", -1.0))
            self._restore_best(state)
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{folder / 'trainer_state.pt'}: the trainer state does not fit this run "
                                  f"({type(e).__name__}: {e})") from None
        if folder.name == "last":
            self._last_saved_step = self.step
        if self.info.is_main:
            why = "" if folder.name == "last" else " (checkpoints/last is missing or incomplete)"
            print(f"resuming {self.run_dir} at step {self.step} from {folder}{why}", file=sys.stderr, flush=True)
        csv_path = self.run_dir / "metrics.csv"
        if csv_path.is_file():  # keep rows up to the checkpoint: the rest is re-done
            with open(csv_path) as f:
                reader = csv.DictReader(f)
                all_rows = list(reader)
                header = list(reader.fieldnames or [])
            rows = [r for r in all_rows if int(r["step"]) <= self.step]
            self.history = rows
            # rows past an older checkpoint go; an older run's header gains the new columns
            if (len(rows) < len(all_rows) or header != METRIC_FIELDS) and self.info.is_main:
                tmp = csv_path.with_name(csv_path.name + ".tmp")
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(rows)
                os.replace(tmp, csv_path)

    def _restore_best(self, state: Mapping[str, Any]) -> None:
        """The kept ``best`` of a saved state; one saved with another ``select_by`` (or before
        there was one) counts for ``miou`` by its mIoU and is forgotten otherwise."""
        saved_by = state.get("select_by", "miou")
        key = [float(v) for v in state.get("best_key", [])]
        if saved_by == self.cfg.select_by and key:
            self.best_key = tuple(key)
        elif self.cfg.select_by == "miou" and self.best_miou >= 0:
            self.best_key = (self.best_miou,)
        else:
            self.best_key = None
            if self.info.is_main and self.best_miou >= 0:
                print(f"select_by {self.cfg.select_by}: the saved best was chosen by {saved_by}; the next validation "
                      "starts the choice again", file=sys.stderr, flush=True)
            self.best_miou = -1.0
        step = int(state.get("best_step", -1))
        self.best_step = step if step >= 0 and self.best_key is not None else None
        self.best_val = dict(state.get("best_val", {})) if self.best_key is not None else {}

    def _save(self, name: str) -> None:
        if self.info.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / name, self.model, self._state())

    def _save_last(self) -> None:
        """``checkpoints/last`` at the current step (once per step)."""
        if self._last_saved_step != self.step:
            self._save("last")
            self._last_saved_step = self.step

    def _copy_last(self, name: str) -> None:
        if self.info.is_main:
            ck = self.run_dir / "checkpoints"
            copy_checkpoint(ck / "last", ck / name)

    # -- logging ------------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        self.history.append(row)
        path = self.run_dir / "metrics.csv"
        new = not path.exists() or len(self.history) == 1
        with open(path, "w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
                for r in self.history[:-1]:
                    w.writerow(r)
            w.writerow(row)
        if self.writer is not None:
            for k in METRIC_FIELDS[2:]:
                v = row.get(k)
                if isinstance(v, (int, float)) and v == v:
                    self.writer.add_scalar(k, v, row["step"])

    def _log_images(self, batch: dict[str, Any], pred_img: torch.Tensor, tag: str) -> None:
        """The original's row: input | masked label | label | raw prediction | snapped prediction."""
        if self.writer is None:
            return

        mean, std = self.cfg.image_mean, self.cfg.image_std
        i = 0
        img = denormalize(batch["imgs"][i : i + 1].float(), mean, std)
        tgt = denormalize(batch["tgts"][i : i + 1].float(), mean, std)
        m = patch_mask_to_pixels(batch["bool_masked_pos"][i : i + 1].cpu(), self.mcfg.grid, self.mcfg.patch_size)
        masked = tgt * (1 - m)
        raw = denormalize(pred_img[i : i + 1].detach().float().cpu(), mean, std)
        pal = batch["palette"][i]
        snapped = pal[cmap_to_lbl(raw, pal)].permute(0, 3, 1, 2).float()
        row = torch.cat([img, masked, tgt, raw, snapped], dim=3)[0] / 255.0
        self.writer.add_image(tag, row.clamp(0, 1), self.step)

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation as the test scores: the fixed validation pairs (positives, and the shares
        ``val_negative_share`` of negatives and ``val_free_share`` of defect-free queries), the query
        half hidden, the prediction snapped to the palette, scored by
        :func:`seggpt_lib.eval.metrics.evaluate` at the model's size (a positive against the query's
        pixels of the prompt's class, a negative's yield and a free query's by the predicted
        share; a negative's mIoU against the query's own defects). ``val_prompt_auroc``: the
        prompt's effect before any snapping: each positive pair scored by the defect score the model
        paints on the query's defect of the prompt's class (mean over its pixels), each negative by
        the score it paints on the query's own defects; the AUROC of positives over negatives (0.5: the prompt
        changes nothing, as for a model that ignores it; 1: it paints only what the prompt shows).

        Returns ``val_loss``, ``val_pes``, ``val_catch``, ``val_yield_neg``, ``val_yield_free``,
        ``val_miou_pos`` (also as ``val_miou``, the earlier column), ``val_miou_neg``,
        ``val_fg_frac`` (predicted defect share of the queries), ``val_gt_frac`` (their true
        share: a positive's defect, nothing elsewhere), ``val_prompt_auroc`` and ``collapse`` (:func:`collapse_of`); a
        collapse warns (:class:`CollapseWarning`). Empty without validation pairs."""

        if self.val_ds is None:
            return {}
        self.model.eval()
        ids = list(range(self.info.rank, len(self.val_ds), self.info.world_size))
        loader = DataLoader(torch.utils.data.Subset(self.val_ds, ids), batch_size=self.cfg.batch_size,
                            num_workers=0, collate_fn=D.collate)
        loss_sum, n = 0.0, 0
        mean, std = self.cfg.image_mean, self.cfg.image_std
        last = None
        rows: list[tuple[Any, ...]] = []
        for batch in loader:
            inputs = D.model_inputs(batch, self.device)
            with autocast(self.device, self.precision):
                loss, pred, _ = self.model(**inputs)
            pred_img = self.model.unpatchify(pred.float())
            lbl = _snap_query(pred_img, batch["palette"].to(self.device), mean, std).cpu()
            two_colours = batch["palette"].shape[1] == 2  # binary painting (else: no prompt AUROC)
            score = query_defect_score(query_rgb(pred_img, mean, std), batch["palette"]).cpu() if two_colours else None
            b = lbl.shape[0]
            loss_sum += loss.item() * b
            n += b
            gt = batch["query_label"]
            for j in range(b):
                kind = batch["kind"][j]
                shown = gt[j] > 0 if kind == "positive" else batch["query_defects"][j] > 0
                painted = float(score[j][shown].mean()) if score is not None and kind != "free" and shown.any() \
                    else math.nan
                rows.append((int(batch["sample"][j]), kind, batch["query_class"][j], batch["query_file"][j],
                             batch["prompt_file"][j], (lbl[j] > 0).numpy(), (gt[j] > 0).numpy(), painted))
            last = (batch, pred_img.cpu())
        loss_sum, n = _all_reduce_sum([loss_sum, n], self.device, self.info)
        rows = sorted(_all_gather_list(rows, self.info), key=lambda r: r[0])
        self.model.train()
        if last is not None:
            self._log_images(last[0], last[1], "val/prediction")
        if not rows:
            return {}
        records = [M.PairResult(query=q, prompts=[pf], kind=k, query_class=c, pred=pr, gt=g)
                   for _, k, c, q, pf, pr, g, _ in rows]
        prompt_auroc = M.auroc([r[7] for r in rows if r[1] == "positive"], [r[7] for r in rows if r[1] == "negative"])
        _, summ = M.evaluate(records)
        pred_share = float(np.mean([r[5].mean() for r in rows]))
        true_share = float(np.mean([r[6].mean() if r[1] == "positive" else 0.0 for r in rows]))
        collapse = collapse_of(pred_share, true_share, summ)
        if collapse:
            warnings.warn(collapse_message(collapse, self.step, pred_share, true_share), CollapseWarning, stacklevel=2)
        return {
            "val_loss": loss_sum / max(n, 1),
            "val_miou": summ["miou"],
            "val_fg_frac": pred_share,
            "val_pes": summ["pes"],
            "val_catch": summ["catch_rate"],
            "val_yield_neg": summ["yield_rate"],
            "val_yield_free": summ["free_yield_rate"],
            "val_miou_pos": summ["miou"],
            "val_miou_neg": summ["negative_miou"],
            "val_gt_frac": true_share,
            "val_prompt_auroc": prompt_auroc,
            "collapse": collapse,
        }

    def _select_key(self, val: Mapping[str, Any]) -> tuple[float, ...] | None:
        """How a validation ranks for ``checkpoints/best`` (higher is better; None: it cannot be
        ranked, its figure is NaN). ``miou``: the positive mIoU (the original's rule); ``pes``:
        (no collapse, PES), so a model that paints nothing (PES 0.5 by yield alone) or everything
        is kept only while no validation without a collapse exists."""
        if self.cfg.select_by == "miou":
            v = float(val.get("val_miou", float("nan")))
            return (v,) if v == v else None
        v = float(val.get("val_pes", float("nan")))
        return (0.0 if val.get("collapse") else 1.0, v) if v == v else None

    # -- training -----------------------------------------------------------------------
    def _loader(self, epoch: int, start: int) -> DataLoader:

        self.train_ds.set_epoch(epoch)
        sampler = self.train_ds.make_sampler(rank=self.info.rank, world_size=self.info.world_size, start=start, drop_last=True)
        return DataLoader(
            self.train_ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.num_workers,
            collate_fn=D.collate, pin_memory=self.device.type == "cuda", drop_last=True,
            persistent_workers=False, worker_init_fn=_worker_ignores_sigint if self.cfg.num_workers > 0 else None,
        )

    def _limits_line(self, end: int) -> str:
        """Which limit ends the run, said once at its start."""
        cfg = self.cfg
        by_epochs = cfg.epoch * self.steps_per_epoch
        if cfg.max_steps:
            why = f"max_steps={cfg.max_steps}"
            if cfg.max_steps != by_epochs:
                why += (f" (it takes precedence over epoch={cfg.epoch}, which alone would end at step {by_epochs}: "
                        f"{self.steps_per_epoch} steps per epoch)")
        else:
            why = f"epoch={cfg.epoch} x {self.steps_per_epoch} steps per epoch (set max_steps for a fixed number of steps)"
        line = f"training to step {self.total_steps}: {why}"
        if end < self.total_steps:
            line += f"; this call stops at step {end} (stop_at_step)"
        if cfg.max_minutes:
            line += (f"; or when max_minutes={cfg.max_minutes:g} is spent (a wall-clock cap: where it ends depends on "
                     "the machine's load)")
        if self.step:
            line += f"; starting at step {self.step}"
        return line

    def _no_checkpoint_hint(self) -> str:
        found = find_resume_checkpoint(self.run_dir)
        if found is None:
            return "No checkpoint has been written yet: there is nothing to resume"
        n = checkpoint_step(found)
        return f"The last good checkpoint is {found}" + (f" (step {n})" if n is not None and n >= 0 else "")

    def fit(self, stop_at_step: int | None = None, progress: bool = True) -> TrainResult:
        """Train up to ``total_steps`` (or ``stop_at_step``). SIGINT/SIGTERM end the run cleanly at
        the end of the current step with ``checkpoints/last`` written, then raise
        :class:`TrainingInterrupted` (a KeyboardInterrupt carrying the result); ``last`` is also
        written every ``ckpt_interval`` steps and at epoch ends."""
        cfg = self.cfg
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        eval_every = max(1, self.steps_per_epoch // max(cfg.eval_per_epoch, 1)) if cfg.eval_per_epoch else 0
        if self.info.is_main:
            print(self._limits_line(end), file=sys.stderr, flush=True)
        self.model.train()
        bar = None
        if self.info.is_main and progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        t_last, samples_since = t0, 0
        last_val: dict[str, float] = {}
        interrupted: str | None = None
        stop = _StopOnSignal(verbose=self.info.is_main)
        try:
            stop.install()
            while self.step < end:
                epoch = self.step // self.steps_per_epoch
                start = (self.step - epoch * self.steps_per_epoch) * self.global_batch
                it = iter(self._loader(epoch, start))
                while self.step < end and self.step // self.steps_per_epoch == epoch:
                    lr = lr_at(self.step, cfg)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                    loss_acc, fg_acc = 0.0, float("nan")
                    for micro in range(cfg.grad_accum_steps):
                        batch = next(it)
                        inputs = D.model_inputs(batch, self.device)
                        sync = micro == cfg.grad_accum_steps - 1 or self.info.world_size == 1
                        ctx = self.ddp_model.no_sync() if (not sync and hasattr(self.ddp_model, "no_sync")) else _nullcontext()
                        with ctx:
                            with autocast(self.device, self.precision):
                                loss, pred, _ = self.forward_model(**inputs)
                            self.scaler.scale(loss / cfg.grad_accum_steps).backward()
                        loss_acc += loss.detach().float().item() / cfg.grad_accum_steps
                        if micro == 0:  # measured at every step (cheap): any step may turn out to be logged
                            with torch.no_grad():
                                pred_img = self.model.unpatchify(pred.detach().float())
                                lbl = _snap_query(pred_img, batch["palette"].to(self.device), cfg.image_mean, cfg.image_std)
                                fg_acc = (lbl > 0).float().mean().item()
                            if cfg.image_log_interval and self.step % cfg.image_log_interval == 0:
                                self._log_images(batch, pred_img.cpu(), "train/prediction")
                    loss_g, fg_g = _all_reduce_sum([loss_acc, fg_acc], self.device, self.info)
                    loss_g /= self.info.world_size
                    fg_g /= self.info.world_size
                    if not math.isfinite(loss_g):
                        raise NonFiniteLoss(
                            f"loss became {loss_g} at step {self.step}; stopping (lower lr, use bf16/fp32, or check "
                            f"the data). {self._no_checkpoint_hint()}"
                        )
                    if cfg.grad_clip:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    samples_since += self.global_batch

                    if cfg.max_minutes and self.step < end:
                        time_up = (time.perf_counter() - t0) > cfg.max_minutes * 60
                        if _all_reduce_sum([float(time_up)], self.device, self.info)[0] > 0:
                            end = self.step  # every rank stops at the same step
                    do_eval = bool(eval_every) and (self.step % eval_every == 0 or self.step in (self.total_steps, end))
                    do_log = (self.step - 1) % cfg.log_interval == 0 or self.step == end or do_eval
                    if do_eval:
                        last_val = self.evaluate()
                    if do_log:
                        now = time.perf_counter()
                        sps = samples_since / max(now - t_last, 1e-9)
                        t_last, samples_since = now, 0
                        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr, "loss": loss_g,
                               "fg_frac": fg_g, "samples_per_s": sps, "elapsed_s": now - t0,
                               **{k: (last_val.get(k, float("nan")) if do_eval else float("nan")) for k in VAL_FIELDS},
                               "collapse": last_val.get("collapse", "") if do_eval else ""}
                        self._log(row)
                        if bar is not None:
                            post = {"loss": f"{loss_g:.4f}", "fg": f"{fg_g:.3f}", "sps": f"{sps:.1f}"}
                            if last_val:
                                post["pes"] = f"{last_val.get('val_pes', float('nan')):.3f}"
                                post["miou"] = f"{last_val.get('val_miou', float('nan')):.3f}"
                                if last_val.get("collapse"):
                                    post["COLLAPSE"] = last_val["collapse"]
                            bar.set_postfix(post)
                    key = self._select_key(last_val) if do_eval and last_val else None
                    if key is not None and (self.best_key is None or key >= self.best_key):  # ties: keep the later
                        self.best_key, self.best_step = key, self.step
                        self.best_val = {k: last_val.get(k, float("nan")) for k in VAL_FIELDS}
                        self.best_val["collapse"] = last_val.get("collapse", "")
                        v = float(last_val.get("val_miou", float("nan")))
                        self.best_miou = v if v == v else -1.0
                        self._save("best")
                    if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0:
                        self._save_last()
                        self._copy_last(f"step_{self.step}")
                    if bar is not None:
                        bar.update(1)
                    if self.step < end:  # a signal (on any rank): every rank stops after this step
                        if _all_reduce_sum([float(stop.signum is not None)], self.device, self.info)[0] > 0:
                            interrupted = stop.name or "a signal to another rank"
                            end = self.step
                if self.step < end:
                    self._save_last()  # end of an epoch
            self._save_last()
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        if self.writer is not None:
            self.writer.flush()
        result = self._result(interrupted)
        if interrupted:
            raise TrainingInterrupted(result)
        return result

    def _result(self, interrupted: str | None = None) -> TrainResult:
        collapse_steps, collapse = [], ""
        for r in self.history:
            if _is_number_text(r.get("val_pes")) or _is_number_text(r.get("val_loss")):  # a validation row
                collapse = str(r.get("collapse") or "")
                if collapse:
                    collapse_steps.append(int(r["step"]))
        score = self.best_key[-1] if self.best_key else float("nan")
        return TrainResult(self.run_dir, self.step, self.best_miou, self.history, interrupted, select_by=self.cfg.select_by,
                           best_score=score, best_step=self.best_step, best_val=dict(self.best_val), collapse=collapse,
                           collapse_steps=collapse_steps, fg_weight=self.fg_weight, defect_share=self.defect_share)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_number_text(v: Any) -> bool:
    """A metrics value that holds a number (a float, or a CSV cell of a resumed run), not NaN/empty."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: TrainConfig | dict[str, Any], run_dir: str | os.PathLike[str] | None = None,
          stop_at_step: int | None = None, progress: bool = True) -> TrainResult:
    """Train from a config (object or dict); returns the run folder, final step and history."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    trainer = Trainer(cfg, Path(run_dir) if run_dir else None)
    try:
        return trainer.fit(stop_at_step=stop_at_step, progress=progress)
    finally:
        trainer.close()


def resume(run_dir: str | os.PathLike[str], stop_at_step: int | None = None, progress: bool = True,
           overrides: dict[str, Any] | None = None) -> TrainResult:
    """Continue a run at its saved step: from ``checkpoints/last``, else the highest complete ``step_N``."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    trainer = Trainer(TrainConfig.from_json(cfg_path, overrides), run_dir, resume=True)
    try:
        return trainer.fit(stop_at_step=stop_at_step, progress=progress)
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------
# CLI: seggpt train --config FILE [--set key=value ...] [--resume RUN_DIR]
# ------------------------------------------------------------------------------------------
