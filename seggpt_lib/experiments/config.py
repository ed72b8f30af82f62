"""The pipeline's parameters: the typed configuration (the one place of every default), the smoke
configuration, the notebooks and their parameters, loading and checking a config file, the model
preset they resolve to.

:class:`PipelineConfig` holds every parameter of ``seggpt reproduce`` under the flat key names the
notebooks' parameters cells, ``configs/*.json`` and ``--set`` use, grouped by the notebook that
reads them. ``configs/pipeline.json`` is :class:`PipelineConfig`'s defaults written out
(``PipelineConfig().save(path)``; ``tests/test_defaults.py`` checks that every key agrees, and
that every notebook's parameters cell agrees with it). :class:`BeyondConfig` is what
:func:`seggpt_lib.experiments.study.compare_recipes` needs (notebook 05 and ``seggpt study``).

The training recipe: :class:`~seggpt_lib.engine.trainer.TrainConfig`'s defaults are the original
project's recipe (``seggpt train`` without a key: e.g. ``fg_weight`` 1, the original loss);
:data:`PIPELINE_RECIPE` is the pipeline's recipe on top of it (``fg_weight`` 30, one fixed defect
colour, half the samples hiding the whole query half, class-aware negatives), the default of the
config's ``train`` key.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from seggpt_lib.data.layout import DATA_SOURCES
from seggpt_lib.engine.trainer import TrainConfig
from seggpt_lib.eval.metrics import CATCH_IOU, YIELD_RESPONSE
from seggpt_lib.model.checkpoint import read_state_dict
from seggpt_lib.model.seggpt import PRESETS, SegGPTConfig, preset_config
from seggpt_lib.utils.config import (
    ConfigError,
    check_fields,
    field_types,
    is_number,
    read_json_config,
    type_matches,
    type_name,
)
from seggpt_lib.utils.device import resolve_device_name

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
CONFIG_DIR = REPO_ROOT / "configs"
# the pipeline's stages, in the order seggpt reproduce runs them (numbered so); the explorer apart
NOTEBOOKS: tuple[str, ...] = ("01_data_transformation", "02_training", "03_grid_ablation", "04_pair_evaluation",
                              "05_beyond")
BEYOND_NOTEBOOK = "05_beyond"
EXPLORER_NOTEBOOK = "explorer"  # interactive, not a stage of the pipeline

# ------------------------------------------------------------------------------------------
# defaults
# ------------------------------------------------------------------------------------------
# the synthetic set of notebook 01 (data_prep.synthetic.generate_synthetic's arguments)
SYNTHETIC: dict[str, Any] = {"per_class": 40, "size": 256, "n_free": None, "seed": 0}

# the pipeline's training recipe: TrainConfig keys over TrainConfig's own defaults (the original's
# recipe). The sweep in benchmarks/README.md: a fixed defect colour, half the samples hiding the
# whole query half and defect pixels weighted up learn on a CPU where the original recipe stays
# at mIoU 0. fg_weight "auto": from the training set's defect share (trainer.auto_fg_weight: about
# 28 on the synthetic set, where x30 was measured best; 6 at 10 % defect pixels, where x30 painted
# everything); weight_query_defects: a negative's query defect weighs as much as a positive's, so
# that painting the query's own defect whatever the prompt stops paying (the original: off).
PIPELINE_RECIPE: dict[str, Any] = {
    "lr": 1e-3, "batch_size": 16, "fg_weight": "auto", "weight_query_defects": True, "defect_color": [255, 255, 255],
    "query_mask_share": 0.5, "warmup_steps": 30, "cycle_steps": 100000, "mask_ratio": 0.75, "negative_target": "empty",
    "num_workers": 0,
}


@dataclass
class PipelineConfig:
    """Every parameter of the notebook pipeline, with its default (flat keys, grouped by notebook).

    ``to_dict()`` / ``from_dict()`` (unknown keys raise :class:`PipelineError` listing the valid
    ones; values are type-checked), ``save()`` writes the JSON of ``configs/``."""

    # --- data (01) -----------------------------------------------------------------------
    data: str = "synthetic"  # synthetic | <folder> | magnetic_tile:<path> | coco:<path> | folder:<path>
    synthetic: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(SYNTHETIC))
    limit_per_class: int | None = None  # magnetic_tile: first N photos of each class
    split_seed: int = 0  # the train/val/test split (data split, not tiling)
    val: float = 0.15
    test: float = 0.15
    rebuild_data: bool = False  # False: reuse RESULTS/work/data when it was built from the same settings
    # --- model (01, 02, 05) ----------------------------------------------------------------
    preset: str = "vit_micro"  # "auto": from the checkpoint given as weights
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides (official constructor names)
    weights: str = "pretrained"  # initial weights ("pretrained": the shipped checkpoint; "": random); with steps 0 the weights evaluated
    # --- training (02, 05) -----------------------------------------------------------------
    # the training budget, in steps: the same command and seed give the same tables on any load. 500
    # steps of vit_micro at batch 16 take about 4.3 min on one core of the 2-core CPU (31 samples/s
    # measured; benchmarks/README.md)
    steps: int = 500  # training steps (0: no training)
    train_minutes: float | None = None  # optional wall-clock cap on top of steps (None/0: none); whichever comes first
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    precision: str = "auto"  # training: bf16 on CUDA, fp32 on CPU; inference likewise
    seed: int = 0
    normalize: str = "imagenet"  # imagenet (the official weights') | dataset (the training split's own mean/std)
    train: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(PIPELINE_RECIPE))  # TrainConfig keys: the recipe
    eval_every: int = 50  # validation (and a checkpoint) every N steps
    val_pairs: int = 64
    checkpoint: str = "best"  # which checkpoint the evaluation uses: best (validation PES, train.select_by) | last
    n_panels: int = 3  # rows of the five-panel figures
    # --- evaluation (03, 04) ---------------------------------------------------------------
    grids: list[int] = field(default_factory=lambda: [1, 2, 4])  # tiling: n x n tiles per image (03)
    top_k: int = 1
    extra_top_k: int = 3  # one more row in 03 at eval_grid with this many prompts (0: none)
    eval_grid: int = 2  # the tiling of 04 (the original's best)
    work_size: int | str = "auto"  # canvas of grid >= 2 (the original: 1024); auto: the test images' median side, <= 1024
    tile_pairing: str = "aligned"  # aligned: a tile with the prompts' same tile; all: with every prompt tile (the original)
    max_batch: int = 64  # pairs per forward pass
    max_queries: int | None = None  # at most N queries per run (spread over the classes); None: the whole test split
    mapping_seed: int = 0
    catch_iou: float = CATCH_IOU  # good catch: IoU >= this (the protocol's threshold)
    yield_response: float = YIELD_RESPONSE  # correct yield: response rate < this (the protocol's threshold)
    # the line's decision (04): chosen on the validation split, then applied to the test pairs
    calibration_objective: str = "max_pes"  # max_pes | max_catch_at_yield (seggpt_lib.eval.calibration)
    calibration_yield_target: float = 0.6  # max_catch_at_yield: the yield (negative and defect-free) to reach
    pretrained_baseline: bool = True  # 04: also score the shipped pretrained checkpoint without fine-tuning
    # --- beyond the original (05): the other negatives recipe, same budget, and prompt tuning
    beyond_minutes: float | None = None  # training budget of 05's model; None: train_minutes (the same as 02's)
    beyond_tune_steps: int = 30  # prompt-tuning steps per class
    beyond_max_queries: int | None = 18  # queries per kind (positive, negative, defect-free) in 05
    beyond_top_k: int = 3  # prompts of 05's ensemble row
    beyond_grid: int = 1  # 05 scores every row at this tiling (learned prompts are tuned at the model's size)
    # --- output and the runner ---------------------------------------------------------------
    results_dir: str = "results"
    kernel: str = "python3"
    html: bool = True
    heartbeat_s: float = 30  # a "still running" line every N seconds (0: none)
    echo: bool = True  # show what the notebooks print, as they print it

    # keys whose dict value is merged key by key by a config file / --set (model is replaced whole)
    MERGED: typing.ClassVar[tuple[str, ...]] = ("train", "synthetic")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "PipelineConfig":
        """A config from (some of) its keys, the rest defaults; ``train`` and ``synthetic`` merged
        over their defaults. Unknown keys and values of the wrong type raise :class:`PipelineError`."""
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise PipelineError(f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(cls.keys()))}")
        base = cls()
        kw = {}
        for k, v in d.items():
            kw[k] = {**getattr(base, k), **v} if k in cls.MERGED and isinstance(v, dict) else copy.deepcopy(v)
        cfg = cls(**kw)
        cfg.check(source)
        return cfg

    def save(self, path: str | os.PathLike, comments: Mapping[str, str] | None = None) -> Path:
        """The config as JSON (``comments``: ``_key`` entries first)."""
        p = Path(path)
        p.write_text(json.dumps({**{f"_{k}": v for k, v in (comments or {}).items()}, **self.to_dict()}, indent=2) + "\n")
        return p

    def check(self, source: str = "config") -> None:
        """Types (from the annotations) and ranges of every key, nested keys included
        (:func:`check_key`); raises :class:`PipelineError` naming ``source``, the key and the value."""
        for k, v in self.to_dict().items():
            check_key(k, v, source)

    def train_settings(self) -> TrainSettings:
        """Notebook 02's training run."""
        return TrainSettings(preset=self.preset, model=copy.deepcopy(self.model), weights=self.weights, steps=self.steps,
                             train_minutes=self.train_minutes, device=resolve_device_name(self.device),
                             precision=self.precision, seed=self.seed, normalize=self.normalize,
                             recipe=copy.deepcopy(self.train), eval_every=self.eval_every, val_pairs=self.val_pairs)

    def beyond(self) -> "BeyondConfig":
        """The :class:`BeyondConfig` of notebook 05: 02's model and recipe, 05's budget and scoring."""
        return BeyondConfig(
            preset=self.preset, model=copy.deepcopy(self.model), weights=self.weights, steps=self.steps,
            budget_minutes=self.beyond_minutes if self.beyond_minutes is not None else self.train_minutes,
            device=self.device, precision=self.precision, seed=self.seed, normalize=self.normalize,
            recipe=copy.deepcopy(self.train), eval_every=self.eval_every, val_pairs=self.val_pairs,
            checkpoint=self.checkpoint, top_k=self.beyond_top_k, grid=self.beyond_grid, work_size=self.work_size,
            tile_pairing=self.tile_pairing, max_queries=self.beyond_max_queries, mapping_seed=self.mapping_seed,
            catch_iou=self.catch_iou, yield_response=self.yield_response, tune_steps=self.beyond_tune_steps,
            max_batch=self.max_batch, calibration_objective=self.calibration_objective,
            calibration_yield_target=self.calibration_yield_target)


@dataclass
class TrainSettings:
    """What :func:`seggpt_lib.experiments.training.training_config` needs: the model, the budget and
    the recipe of one training run (notebook 02, each model of notebook 05 and ``seggpt study``)."""

    preset: str = PipelineConfig.preset
    model: dict[str, Any] = field(default_factory=dict)
    weights: str = PipelineConfig.weights
    steps: int = PipelineConfig.steps
    train_minutes: float | None = PipelineConfig.train_minutes
    device: str = PipelineConfig.device
    precision: str = PipelineConfig.precision
    seed: int = PipelineConfig.seed
    normalize: str = PipelineConfig.normalize
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys over PIPELINE_RECIPE
    eval_every: int = PipelineConfig.eval_every
    val_pairs: int = PipelineConfig.val_pairs

    def full_recipe(self) -> dict[str, Any]:
        """:data:`PIPELINE_RECIPE` updated by ``recipe``."""
        return {**copy.deepcopy(PIPELINE_RECIPE), **copy.deepcopy(self.recipe)}


# the study's prompt-scoring methods (seggpt_lib.experiments.study.METHODS)
BEYOND_METHODS: tuple[str, ...] = ("top1", "topk", "learned")


@dataclass
class BeyondConfig:
    """What :func:`seggpt_lib.experiments.study.compare_recipes` needs: the models (trained with the
    same recipe and budget, ``negative_target`` aside) and how they are scored."""

    # --- the models
    preset: str = PipelineConfig.preset
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides
    weights: str = PipelineConfig.weights  # initial weights of the training
    steps: int = PipelineConfig.steps
    budget_minutes: float | None = PipelineConfig.train_minutes  # wall-clock budget per trained model (None: steps only)
    device: str = PipelineConfig.device
    precision: str = PipelineConfig.precision
    seed: int = PipelineConfig.seed
    normalize: str = PipelineConfig.normalize
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys over PIPELINE_RECIPE
    eval_every: int = PipelineConfig.eval_every
    val_pairs: int = PipelineConfig.val_pairs
    checkpoint: str = PipelineConfig.checkpoint
    # --- the scoring
    methods: tuple[str, ...] = BEYOND_METHODS
    top_k: int = PipelineConfig.beyond_top_k  # prompts of the ensemble row
    grid: int = PipelineConfig.beyond_grid  # tiling of every row
    work_size: int | str = PipelineConfig.work_size
    tile_pairing: str = PipelineConfig.tile_pairing
    max_queries: int | None = PipelineConfig.beyond_max_queries  # queries per kind
    mapping_seed: int = PipelineConfig.mapping_seed
    catch_iou: float = PipelineConfig.catch_iou
    yield_response: float = PipelineConfig.yield_response
    tune_steps: int = PipelineConfig.beyond_tune_steps  # prompt-tuning steps per class
    tune_lr: float = 0.1
    tune_batch: int = 4
    tune_negative_share: float = 0.25
    max_batch: int = PipelineConfig.max_batch
    # --- the line's decision: one operating point per (model, prompt method), chosen on the
    # validation split only (as notebook 04 does); None: raw rows only
    calibration_objective: str | None = PipelineConfig.calibration_objective
    calibration_yield_target: float = PipelineConfig.calibration_yield_target

    def full_recipe(self) -> dict[str, Any]:
        """The recipe both models train with: :data:`PIPELINE_RECIPE` updated by ``recipe``."""
        return {**copy.deepcopy(PIPELINE_RECIPE), **copy.deepcopy(self.recipe)}

    def train_settings(self, negative_target: str) -> TrainSettings:
        """The training run of the ``negative_target`` recipe."""
        return TrainSettings(preset=self.preset, model=copy.deepcopy(self.model), weights=self.weights, steps=self.steps,
                             train_minutes=self.budget_minutes, device=resolve_device_name(self.device),
                             precision=self.precision, seed=self.seed, normalize=self.normalize,
                             recipe={**self.full_recipe(), "negative_target": negative_target},
                             eval_every=self.eval_every, val_pairs=self.val_pairs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "BeyondConfig":
        return dataclasses.replace(self, **changes)


# type_name, type_matches: seggpt_lib.utils.config's (the one checker), imported above


DEFAULTS: dict[str, Any] = PipelineConfig().to_dict()  # derived: PipelineConfig is the one place of the defaults

# a one-minute check of the whole pipeline (seggpt reproduce --smoke; the tests use it): a tiny
# synthetic set (64 px, 7 images per class) and a 235 k-parameter model trained 3 steps
SMOKE: dict[str, Any] = {
    "data": "synthetic",
    "synthetic": {"per_class": 7, "size": 64, "n_free": None, "seed": 0},
    "val": 0.3,
    "test": 0.15,
    "preset": "vit_nano",
    "model": {},
    "weights": "",
    "steps": 3,
    "train_minutes": None,
    "device": "cpu",
    "train": {"batch_size": 4, "warmup_steps": 1},
    "eval_every": 3,
    "val_pairs": 8,
    "n_panels": 2,
    "beyond_tune_steps": 2,
    "beyond_max_queries": 4,
    "beyond_top_k": 2,
}

# which parameters each notebook takes from the pipeline config (the rest of its parameters cell
# keeps its defaults)
NOTEBOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01_data_transformation": ("results_dir", "source", "source_path", "synthetic", "limit_per_class", "split_seed",
                               "val", "test", "rebuild_data", "preset", "model", "weights", "seed", "train"),
    "02_training": ("results_dir", "preset", "model", "weights", "steps", "train_minutes", "device", "precision", "seed",
                    "normalize", "train", "eval_every", "val_pairs", "checkpoint", "n_panels"),
    "03_grid_ablation": ("results_dir", "device", "precision", "grids", "top_k", "extra_top_k", "eval_grid",
                         "work_size", "tile_pairing", "max_batch", "max_queries", "mapping_seed", "catch_iou",
                         "n_panels"),
    "04_pair_evaluation": ("results_dir", "device", "precision", "eval_grid", "top_k", "work_size", "tile_pairing",
                           "max_batch", "max_queries", "mapping_seed", "catch_iou", "yield_response",
                           "calibration_objective", "calibration_yield_target", "pretrained_baseline", "n_panels"),
    "05_beyond": ("results_dir", "preset", "model", "weights", "steps", "train_minutes", "beyond_minutes", "device",
                  "precision", "seed", "normalize", "train", "eval_every", "val_pairs", "checkpoint",
                  "beyond_tune_steps", "beyond_max_queries", "beyond_top_k", "beyond_grid", "work_size",
                  "tile_pairing", "max_batch", "mapping_seed", "catch_iou", "yield_response",
                  "calibration_objective", "calibration_yield_target", "n_panels"),
    "explorer": ("results_dir", "device", "precision", "work_size", "tile_pairing", "max_batch"),
}

# notebook parameters that are not config keys, and why (tests/test_defaults.py: every other
# parameter of a parameters cell is a config key with the config's default)
NOTEBOOK_ONLY_PARAMETERS: dict[str, str] = {
    "source": "01: the data source, derived from the config's data by parse_data_spec",
    "source_path": "01: the data folder, derived from the config's data by parse_data_spec",
    "split_dir": "explorer: a split dataset folder of one's own (default: notebook 01's)",
    "query": "explorer: the query shown first",
    "grid": "explorer: the tiling of the first prediction shown",
}

# parameters named like a config key that mean something else in the notebooks that do not take
# that key from the config (NOTEBOOK_PARAMETERS), and why (tests/test_defaults.py)
NOTEBOOK_OWN_MEANING: dict[str, str] = {
    "weights": "03, 04 and the explorer: weights to evaluate in place of notebook 02's (empty: 02's), "
               "not the config's initial weights",
}


class PipelineError(RuntimeError):
    """A stage failed or the configuration is wrong; the message says which and where to look."""


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings -> dict; values parsed as JSON where possible, else kept as text;
    dotted keys (``train.lr``) address nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise PipelineError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise PipelineError(f"--set {item!r}: empty key")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out[k] = val
    return out


def _apply(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    d = cfg
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config JSON file's keys (``_``-prefixed keys are comments and left out); every problem
    (missing, unreadable, not JSON, not an object) raises :class:`PipelineError` naming the file
    (:func:`seggpt_lib.utils.config.read_json_config`)."""
    return read_json_config(path, what="pipeline config", error=PipelineError, drop_comments=True)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | Sequence[str] | None = None,
                smoke: bool = False) -> dict[str, Any]:
    """:class:`PipelineConfig`'s defaults, updated by the JSON file ``path`` (keys starting with
    ``_`` are comments), then (``smoke``) by :data:`SMOKE`, then by ``overrides`` (a dict, or
    ``key=value`` strings). Unknown keys raise :class:`PipelineError` listing the valid ones;
    the result is checked by :meth:`PipelineConfig.check` and returned as a dict of its keys,
    plus ``_explicit``: the keys set explicitly by ``overrides``."""
    cfg = PipelineConfig().to_dict()
    sources: list[tuple[str, dict[str, Any]]] = []
    if path:
        sources.append((str(path), read_config_file(path)))
    if smoke:
        sources.append(("smoke", copy.deepcopy(SMOKE)))
    if overrides:
        ov = parse_set(overrides) if not isinstance(overrides, dict) else dict(overrides)
        sources.append(("--set", ov))
    explicit: list[str] = []
    for name, src in sources:
        touched: list[str] = []
        for key, value in src.items():
            top = key.split(".")[0]
            if top not in cfg:
                raise PipelineError(f"{name}: unknown key {top!r}; valid keys: {', '.join(sorted(PipelineConfig.keys()))}")
            if "." in key:
                if top not in _NESTED:
                    raise PipelineError(f"{name}: unknown key {key!r}: {top} has no sub-keys "
                                        f"(keys with sub-keys: {', '.join(_NESTED)})")
                _apply(cfg, key, value)
            elif top in PipelineConfig.MERGED and isinstance(value, dict):
                cfg[top] = {**cfg[top], **value}  # train, synthetic: merged key by key
            else:
                cfg[key] = copy.deepcopy(value)
            touched.append(top)
            if name == "--set":
                explicit.append(top)
        for top in dict.fromkeys(touched):  # each value checked where it was given: the file, smoke or --set
            check_key(top, cfg[top], name)
    out = PipelineConfig.from_dict(cfg).to_dict()
    out["_explicit"] = sorted(set(explicit))
    return out


def notebook_config(name: str, namespace: Mapping[str, Any]) -> PipelineConfig:
    """The :class:`PipelineConfig` of a notebook's parameters: the config keys notebook ``name``
    takes (:data:`NOTEBOOK_PARAMETERS`) from ``namespace`` (its ``globals()``), the rest defaults."""
    keys = [k for k in NOTEBOOK_PARAMETERS[name] if k in PipelineConfig.keys() and k in namespace]
    return PipelineConfig.from_dict({k: namespace[k] for k in keys}, source=f"notebook {name}")


def _at_least(lo: float, optional: bool = False):
    return lambda v: (optional and v is None) or (is_number(v) and v >= lo)


def _one_of(*choices: Any):
    return lambda v: isinstance(v, str) and v in choices


def _share(v: Any) -> bool:
    return is_number(v) and 0 <= v <= 1


# PipelineConfig's ranges (types come from the annotations): key -> (test, what the message says)
PIPELINE_RANGES: dict[str, tuple[Any, str]] = {
    "val": (lambda v: is_number(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    "test": (lambda v: is_number(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    "limit_per_class": (_at_least(0, optional=True), "an integer >= 0 or null"),
    "split_seed": (_at_least(0), "an integer >= 0"),
    "preset": (lambda v: v == "auto" or v in PRESETS, f"'auto' or a preset ({', '.join(PRESETS)})"),
    "steps": (_at_least(0), "an integer >= 0"),
    "train_minutes": (_at_least(0, optional=True), "a number >= 0 or null"),
    "device": (lambda v: v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()),
               "cpu, cuda, cuda:N or auto"),
    "precision": (_one_of("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
    "seed": (_at_least(0), "an integer >= 0"),
    "normalize": (_one_of("imagenet", "dataset"), "'imagenet' or 'dataset'"),
    "eval_every": (_at_least(1), "an integer >= 1"),
    "val_pairs": (_at_least(0), "an integer >= 0"),
    "checkpoint": (_one_of("best", "last"), "'best' or 'last'"),
    "n_panels": (_at_least(0), "an integer >= 0"),
    "grids": (lambda v: bool(v) and all(is_number(s) and s >= 1 for s in v), "a list of integers >= 1"),
    "top_k": (_at_least(1), "an integer >= 1"),
    "extra_top_k": (_at_least(0), "an integer >= 0 (0: none)"),
    "eval_grid": (_at_least(1), "an integer >= 1"),
    "work_size": (lambda v: v == "auto" or (is_number(v) and v >= 8), "'auto' or an integer >= 8"),
    "tile_pairing": (_one_of("all", "aligned"), "'all' or 'aligned'"),
    "max_batch": (_at_least(1), "an integer >= 1"),
    "max_queries": (_at_least(1, optional=True), "an integer >= 1 or null"),
    "mapping_seed": (_at_least(0), "an integer >= 0"),
    "catch_iou": (_share, "a number in [0, 1]"),
    "yield_response": (_share, "a number in [0, 1]"),
    "calibration_objective": (_one_of("max_pes", "max_catch_at_yield"), "'max_pes' or 'max_catch_at_yield'"),
    "calibration_yield_target": (_share, "a number in [0, 1]"),
    "beyond_minutes": (_at_least(0, optional=True), "a number >= 0 or null (null: train_minutes)"),
    "beyond_tune_steps": (_at_least(1), "an integer >= 1"),
    "beyond_max_queries": (_at_least(1, optional=True), "an integer >= 1 or null"),
    "beyond_top_k": (_at_least(1), "an integer >= 1"),
    "beyond_grid": (_at_least(1), "an integer >= 1"),
    "heartbeat_s": (_at_least(0), "a number >= 0 (0: none)"),
}

# the synthetic set's keys (generate_synthetic's arguments): key -> (type, test, what the message says)
SYNTHETIC_KEYS: dict[str, tuple[Any, Any, str]] = {
    "per_class": (int, _at_least(0), "an integer >= 0"),
    "size": (int, _at_least(32), "an integer >= 32"),
    "n_free": (int | None, _at_least(0, optional=True), "an integer >= 0 or null (null: per_class)"),
    "seed": (int, _at_least(0), "an integer >= 0"),
}
assert set(SYNTHETIC_KEYS) == set(SYNTHETIC)

# the keys whose value is an object of sub-keys (``train.lr``, ``synthetic.size``, ``model.depth``)
_NESTED: tuple[str, ...] = ("train", "synthetic", "model")


def check_key(key: str, value: Any, source: str = "config") -> None:
    """One :class:`PipelineConfig` key: known, of its annotation's type, in its range
    (:data:`PIPELINE_RANGES`); ``train``'s keys are TrainConfig's (:func:`check_recipe`),
    ``model``'s :class:`~seggpt_lib.model.seggpt.SegGPTConfig`'s, ``synthetic``'s
    :data:`SYNTHETIC_KEYS`. Raises :class:`PipelineError` naming ``source``, the key and the value."""
    types_ = field_types(PipelineConfig)
    if key not in types_:
        raise PipelineError(f"{source}: unknown key {key!r}; valid keys: {', '.join(sorted(types_))}")
    if not type_matches(value, types_[key]):
        raise PipelineError(f"{source}: {key} must be {type_name(types_[key])}, got {value!r}")
    rule = PIPELINE_RANGES.get(key)
    if rule is not None and not rule[0](value):
        raise PipelineError(f"{source}: {key} must be {rule[1]}, got {value!r}")
    if key == "train":
        check_recipe(value, source)
    elif key == "model":
        check_fields(value, SegGPTConfig, source, "model.", error=PipelineError, what="SegGPTConfig (model)")
    elif key == "synthetic":
        unknown = sorted(set(value) - set(SYNTHETIC_KEYS))
        if unknown:
            raise PipelineError(f"{source}: unknown synthetic key 'synthetic.{unknown[0]}' "
                                f"(valid keys: {', '.join(SYNTHETIC_KEYS)})")
        for k, v in value.items():
            tp, test, what = SYNTHETIC_KEYS[k]
            if not (type_matches(v, tp) and test(v)):
                raise PipelineError(f"{source}: synthetic.{k} must be {what}, got {v!r}")


def check_recipe(recipe: Mapping[str, Any], source: str = "config") -> None:
    """A training recipe's keys are :class:`~seggpt_lib.engine.trainer.TrainConfig` fields and its
    values fit their types and ranges (:meth:`TrainConfig.check_keys`, the same check as
    ``seggpt train``'s); :class:`PipelineError` naming ``source`` and ``train.<key>``."""
    try:
        TrainConfig.check_keys(recipe, source, prefix="train.")
    except ConfigError as e:
        raise PipelineError(str(e)) from None


# ------------------------------------------------------------------------------------------
# 01: data
# ------------------------------------------------------------------------------------------


def parse_data_spec(data: str, base: str | os.PathLike | None = None) -> tuple[str, str]:
    """``synthetic`` | ``coco:<path>`` | ``magnetic_tile:<path>`` | ``folder:<path>`` | ``<path>``
    -> ``(source, absolute path or "")``."""
    data = (data or "synthetic").strip()
    if data == "synthetic":
        return "synthetic", ""
    source, path = "folder", data
    for prefix in ("coco", "magnetic_tile", "magnetic-tile", "folder"):
        if data.startswith(prefix + ":"):
            source, path = prefix.replace("-", "_"), data[len(prefix) + 1:]
            break
    if not path:
        raise PipelineError(f"data {data!r}: no path given")
    p = Path(path).expanduser()
    if not p.is_absolute():
        rel = p
        p = Path(base or os.getcwd()) / rel
        if base is None and not p.exists() and (REPO_ROOT / rel).exists():
            p = REPO_ROOT / rel  # a path relative to the repository (configs/magnetic_tile.json)
    if not p.exists():
        raise PipelineError(f"data {data!r}: {p} not found")
    return source, str(p.resolve())


# ------------------------------------------------------------------------------------------
# 02: model and training
# ------------------------------------------------------------------------------------------
def _match_preset(cfg) -> tuple[str, dict[str, Any]]:
    mine = cfg.to_dict()

    def diff(name: str) -> dict[str, Any]:
        ref = preset_config(name).to_dict()
        return {k: v for k, v in mine.items() if ref.get(k) != v}

    best = min(PRESETS, key=lambda name: len(diff(name)))  # the closest preset, plus overrides
    return best, diff(best)


PRETRAINED_WEIGHTS = "pretrained"  # weights "pretrained": the shipped checkpoint (seggpt_lib.experiments.pretrain)


def resolve_weights(weights: str | os.PathLike | None) -> str:
    """A ``weights`` value as a file: ``"pretrained"`` is the shipped pretrained checkpoint
    (``pretrained/vit_micro_shapes.safetensors``, its SHA-256 checked; ``make pretrained``
    rebuilds it), anything else is returned as given ("" / None: no initial weights)."""
    if not weights:
        return ""
    if str(weights) == PRETRAINED_WEIGHTS:
        from seggpt_lib.experiments.pretrain import PretrainedError, shipped_checkpoint
        try:
            return str(shipped_checkpoint())
        except PretrainedError as e:
            raise PipelineError(f"weights \"pretrained\": {e}") from None
    return str(weights)


def resolve_preset(weights: str = "", preset: str | None = "auto", model: dict | None = None) -> tuple[str, dict[str, Any]]:
    """``(preset, overrides)`` of the model: the given preset, or (``auto``) the architecture the
    checkpoint ``weights`` records (our safetensors, HF folders) or its tensor shapes imply
    (the official pickle). ``weights`` "pretrained": the shipped checkpoint (:func:`resolve_weights`)."""
    model = dict(model or {})
    shipped = str(weights) == PRETRAINED_WEIGHTS
    weights = resolve_weights(weights)
    if preset and preset != "auto":
        if shipped:
            from seggpt_lib.experiments.pretrain import shipped_info
            own = shipped_info().get("preset")
            if own and own != preset:
                raise PipelineError(f"weights \"pretrained\" is the shipped {own} checkpoint, preset is {preset}: "
                                    f"give preset {own} (or auto), or weights of a {preset} (--set weights= trains "
                                    "from scratch)")
        return preset, model
    if not weights:
        raise PipelineError("preset 'auto' needs weights to read the architecture from; give a preset (e.g. vit_micro)")
    sd, cfg = read_state_dict(weights)
    if cfg is not None:
        name, ov = _match_preset(cfg)
        return name, {**ov, **model}
    dim = int(sd["pos_embed"].shape[-1]) if "pos_embed" in sd else None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for name in PRESETS:
        p = preset_config(name)
        if (p.embed_dim, p.depth) == (dim, depth):
            return name, model
    raise PipelineError(f"{weights}: embed_dim {dim}, depth {depth} match no preset ({', '.join(PRESETS)}); give preset=...")


def model_config(preset: str = "vit_micro", model: dict | None = None, weights: str = ""):
    """The :class:`~seggpt_lib.model.seggpt.SegGPTConfig` of a preset (``auto``: from ``weights``)."""
    name, ov = resolve_preset(weights, preset, model)
    return preset_config(name, **ov)

