"""The pipeline's parameters: defaults, the smoke configuration, the notebooks and their parameters, loading and checking a config file, the model preset they resolve to."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
import copy
import json
import os
import torch

from seggpt_lib.model.checkpoint import read_state_dict
from seggpt_lib.model.seggpt import PRESETS, preset_config

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS: tuple[str, ...] = ("01_data_transformation", "02_training", "03_split_ablation", "04_pair_evaluation",
                              "06_beyond")
BEYOND_NOTEBOOK = "06_beyond"
EXPLORER_NOTEBOOK = "05_explorer"

# ------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    # data (01)
    "data": "synthetic",  # synthetic | <folder> | magnetic_tile:<path> | coco:<path> | folder:<path>
    "synthetic": {"per_class": 40, "size": 256, "n_free": None, "seed": 0},
    "limit_per_class": None,  # magnetic_tile: first N photos of each class
    "split_seed": 0,
    "val": 0.15,
    "test": 0.15,
    "rebuild_data": False,  # False: reuse RESULTS/work/data when it was built from the same settings
    # model and training (02)
    "preset": "vit_micro",  # "auto": from the checkpoint given as weights
    "model": {},  # preset overrides (official constructor names)
    "weights": "",  # initial weights; with steps 0 the weights evaluated
    "steps": 100000,  # training steps (0: no training)
    "train_minutes": 4.5,  # wall-clock budget of the training loop (None/0: none); whichever comes first
    "device": "cpu",  # cpu | cuda | auto
    "precision": "auto",  # training: bf16 on CUDA, fp32 on CPU; inference likewise
    "seed": 0,
    "normalize": "imagenet",  # imagenet (the official weights') | dataset (the training split's own mean/std)
    "train": {  # any seggpt_lib.engine.trainer.TrainConfig keys: the recipe
        "lr": 1e-3, "batch_size": 16, "fg_weight": 30.0, "defect_color": [255, 255, 255], "query_mask_share": 0.5,
        "warmup_steps": 30, "cycle_steps": 100000, "mask_ratio": 0.75, "negative_target": "empty", "num_workers": 0,
    },
    "eval_every": 50,  # validation (and a checkpoint) every N steps
    "val_pairs": 64,
    "checkpoint": "best",  # which checkpoint the evaluation uses: best (val mIoU) | last
    "n_panels": 3,  # rows of the five-panel figures
    # evaluation (03, 04)
    "splits": [1, 2, 4],
    "top_k": 1,
    "extra_top_k": 3,  # one more row in 03 at eval_split with this many prompts (0: none)
    "eval_split": 2,  # the split of 04 (the original's best)
    "work_size": "auto",  # canvas of split >= 2 (the original: 1024); auto: the test images' median side, <= 1024
    "tile_pairing": "aligned",  # aligned: a tile with the prompts' same tile; all: with every prompt tile (the original)
    "max_batch": 64,  # pairs per forward pass
    "max_queries": None,  # at most N queries per run (spread over the classes); None: the whole test split
    "mapping_seed": 0,
    "catch_iou": 0.3,
    "yield_response": 0.000239,
    # beyond the original (06): the other negatives recipe, trained with the same budget, and prompt tuning
    "beyond_minutes": None,  # training budget of 06's model; None: train_minutes (the same as 02's)
    "beyond_tune_steps": 30,  # prompt-tuning steps per class
    "beyond_max_queries": 18,  # queries per kind (positive, negative, defect-free) in 06
    "beyond_top_k": 3,  # prompts of 06's ensemble row
    "beyond_split": 1,  # 06 scores every row at this split
    # where things go
    "results_dir": "results",
    "kernel": "python3",
    "html": True,
    "heartbeat_s": 30,  # a "still running" line every N seconds (0: none)
    "echo": True,  # show what the notebooks print, as they print it
}

# a one-minute check of the whole pipeline (seggpt reproduce --smoke; the tests use it): a tiny
# synthetic set (64 px, 7 images per class) and a 235 k-parameter model trained 3 steps
SMOKE: dict[str, Any] = {
    "data": "synthetic",
    "synthetic": {"per_class": 7, "size": 64, "n_free": None, "seed": 0},
    "val": 0.3,
    "test": 0.15,
    "preset": "vit_micro",
    "model": {"img_size": [64, 32], "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "out_indices": [2],
              "merge_index": 1, "decoder_embed_dim": 16, "pretrain_img_size": 32},
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

# which parameters each notebook takes (the rest of its parameters cell keeps its defaults)
NOTEBOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01_data_transformation": ("results_dir", "source", "source_path", "synthetic", "limit_per_class", "split_seed",
                               "val", "test", "rebuild_data", "preset", "model", "weights", "seed", "train"),
    "02_training": ("results_dir", "preset", "model", "weights", "steps", "train_minutes", "device", "precision", "seed",
                    "normalize", "train", "eval_every", "val_pairs", "checkpoint", "n_panels"),
    "03_split_ablation": ("results_dir", "device", "precision", "splits", "top_k", "extra_top_k", "eval_split",
                          "work_size", "tile_pairing", "max_batch", "max_queries", "mapping_seed", "catch_iou",
                          "n_panels"),
    "04_pair_evaluation": ("results_dir", "device", "precision", "eval_split", "top_k", "work_size", "tile_pairing",
                           "max_batch", "max_queries", "mapping_seed", "catch_iou", "yield_response", "n_panels"),
    "05_explorer": ("results_dir", "device", "precision", "work_size", "tile_pairing", "max_batch"),
    "06_beyond": ("results_dir", "preset", "model", "weights", "steps", "train_minutes", "beyond_minutes", "device",
                  "precision", "seed", "normalize", "train", "eval_every", "val_pairs", "checkpoint",
                  "beyond_tune_steps", "beyond_max_queries", "beyond_top_k", "beyond_split", "work_size",
                  "tile_pairing", "max_batch", "mapping_seed", "catch_iou", "yield_response", "n_panels"),
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


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | Sequence[str] | None = None,
                smoke: bool = False) -> dict[str, Any]:
    """:data:`DEFAULTS`, updated by the JSON file ``path`` (keys starting with ``_`` are
    comments), then (``smoke``) by :data:`SMOKE`, then by ``overrides`` (a dict, or
    ``key=value`` strings). Unknown top-level keys raise :class:`PipelineError` listing the
    valid ones. The result records the keys set explicitly by ``overrides`` in ``_explicit``."""
    cfg = copy.deepcopy(DEFAULTS)
    sources: list[tuple[str, dict[str, Any]]] = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise PipelineError(f"pipeline config not found: {p}")
        try:
            file_cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise PipelineError(f"{p}: not valid JSON: {e}") from None
        if not isinstance(file_cfg, dict):
            raise PipelineError(f"{p}: expected a JSON object")
        sources.append((str(p), {k: v for k, v in file_cfg.items() if not k.startswith("_")}))
    if smoke:
        sources.append(("smoke", copy.deepcopy(SMOKE)))
    if overrides:
        ov = parse_set(overrides) if not isinstance(overrides, dict) else dict(overrides)
        sources.append(("--set", ov))
    explicit: list[str] = []
    for name, src in sources:
        for key, value in src.items():
            top = key.split(".")[0]
            if top not in DEFAULTS:
                raise PipelineError(f"{name}: unknown key {top!r}; valid keys: {', '.join(sorted(DEFAULTS))}")
            if "." in key:
                _apply(cfg, key, value)
            elif isinstance(DEFAULTS[top], dict) and isinstance(value, dict) and top != "model":
                cfg[top] = {**cfg[top], **value}  # train, synthetic: merged key by key
            else:
                cfg[key] = value
            if name == "--set":
                explicit.append(top)
    cfg["_explicit"] = sorted(set(explicit))
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict[str, Any]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise PipelineError(f"config: {msg}")

    need(isinstance(cfg["steps"], int) and cfg["steps"] >= 0, f"steps must be an integer >= 0, got {cfg['steps']!r}")
    tm = cfg["train_minutes"]
    need(tm is None or (isinstance(tm, (int, float)) and tm >= 0), f"train_minutes must be a number >= 0 or null, got {tm!r}")
    bm = cfg["beyond_minutes"]
    need(bm is None or (isinstance(bm, (int, float)) and bm >= 0),
         f"beyond_minutes must be a number >= 0 or null (null: train_minutes), got {bm!r}")
    need(isinstance(cfg["beyond_tune_steps"], int) and cfg["beyond_tune_steps"] >= 1,
         f"beyond_tune_steps must be an integer >= 1, got {cfg['beyond_tune_steps']!r}")
    need(isinstance(cfg["splits"], list) and cfg["splits"] and all(isinstance(s, int) and s >= 1 for s in cfg["splits"]),
         f"splits must be a list of integers >= 1, got {cfg['splits']!r}")
    need(isinstance(cfg["top_k"], int) and cfg["top_k"] >= 1, f"top_k must be an integer >= 1, got {cfg['top_k']!r}")
    need(cfg["tile_pairing"] in ("all", "aligned"), f"tile_pairing must be 'all' or 'aligned', got {cfg['tile_pairing']!r}")
    need(cfg["checkpoint"] in ("best", "last"), f"checkpoint must be 'best' or 'last', got {cfg['checkpoint']!r}")
    need(cfg["normalize"] in ("imagenet", "dataset"), f"normalize must be 'imagenet' or 'dataset', got {cfg['normalize']!r}")
    need(cfg["device"] in ("cpu", "cuda", "auto") or str(cfg["device"]).startswith("cuda:"),
         f"device must be cpu, cuda, cuda:N or auto, got {cfg['device']!r}")
    ws = cfg["work_size"]
    need(ws == "auto" or (isinstance(ws, int) and ws >= 8), f"work_size must be 'auto' or an integer >= 8, got {ws!r}")
    need(isinstance(cfg["train"], dict), "train must be an object of TrainConfig keys")
    need(isinstance(cfg["model"], dict), "model must be an object of preset overrides")


# ------------------------------------------------------------------------------------------
# 01: data
# ------------------------------------------------------------------------------------------
DATA_SOURCES = ("synthetic", "coco", "magnetic_tile", "folder")


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


def resolve_preset(weights: str = "", preset: str | None = "auto", model: dict | None = None) -> tuple[str, dict[str, Any]]:
    """``(preset, overrides)`` of the model: the given preset, or (``auto``) the architecture the
    checkpoint ``weights`` records (our safetensors, HF folders) or its tensor shapes imply
    (the official pickle)."""
    model = dict(model or {})
    if preset and preset != "auto":
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


def resolve_device_name(name: str) -> str:
    if name == "auto":

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
