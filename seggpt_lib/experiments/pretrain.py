"""The shipped pretrained in-context checkpoint: its recipe, its training run and its export.

The real workflow starts from a model that already segments *in context* (the official SegGPT)
and fine-tunes it on the user's defects. The project ships a small stand-in trained by its own
code on a generic set that has nothing to do with defects (:mod:`data_prep.shapes`: sixteen
shape and texture classes in random colours, two to four per image), so that the default
pipeline can follow that workflow on a CPU: fine-tune the shipped checkpoint on the defect set,
and evaluate it one-shot, without fine-tuning, on defect classes it never saw.

* :class:`PretrainConfig`: the whole recipe (saved as JSON beside the weights);
* :func:`pretrain_train_config`: the trainer's config for it;
* :func:`run_pretraining`: train, or continue an interrupted run from its newest complete
  checkpoint (``make pretrained`` is resumable at any point);
* :func:`export_pretrained`: the weights as safetensors, their SHA-256, the command, the recipe
  and the training curve, written beside each other in ``pretrained/``;
* :func:`shipped_checkpoint`: the committed file, its hash checked against the one recorded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from seggpt_lib.engine.trainer import TrainConfig, checkpoint_step, find_resume_checkpoint, resume, train
from seggpt_lib.model.checkpoint import build_from_checkpoint

__all__ = [
    "PRETRAINED_DIR",
    "SHIPPED_NAME",
    "PretrainConfig",
    "PretrainedError",
    "export_pretrained",
    "file_sha256",
    "pretrain_train_config",
    "run_pretraining",
    "shipped_checkpoint",
    "shipped_info",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PRETRAINED_DIR = REPO_ROOT / "pretrained"  # where the shipped checkpoint lives (committed)
SHIPPED_NAME = "vit_micro_shapes"  # PRETRAINED_DIR / f"{SHIPPED_NAME}.safetensors" and .json, _metrics.csv


class PretrainedError(RuntimeError):
    """The shipped checkpoint is missing or does not match its recorded hash."""


def _write_text(path: Path, text: str) -> None:
    """Write aside, then move into place (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class PretrainConfig:
    """The pretraining recipe: data (the shapes set), model, budget in steps, pairs and loss.

    Pairs are class-aware in-context tasks over multi-class images: the prompt shows one class of
    its image, the query's target is its pixels of that class (positives), or nothing when it
    holds other classes only (negatives, ``negative_target`` "empty") or none (defect-free
    queries). Painted white on black, as the pipeline's fine-tuning paints defects."""

    images: int = 6000  # training images of the shapes set (two to four classes each)
    val_images: int = 300
    image_size: int = 128  # rendered size (resized to the model's 64 x 64)
    data_seed: int = 0
    class_colours: bool = False  # each shape class in its own colours (data_prep.shapes.class_palette)
    preset: str = "vit_micro"
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides (e.g. loss_beta)
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    negative_share: float = 0.3
    free_share: float = 0.1
    negative_target: str = "empty"
    fg_weight: float = 8.0  # a class covers about 8 % of an image: its pixels get about 40 % of the loss weight (x3 painted nothing)
    # off: a query's shapes the target leaves out weigh 1. On (fg x8, 4000 steps) the model still painted
    # nothing on validation at step 2000: with 2-4 classes per image, painting nothing costs less than
    # painting every shape, so it never started to paint. Fine-tuning on defects turns it on (pipeline).
    weight_query_defects: bool | float = False
    mask_ratio: float = 0.75
    query_mask_share: float = 0.5
    defect_color: list[int] = field(default_factory=lambda: [255, 255, 255])
    eval_every: int = 500  # validation and checkpoints (last, best, step_N) every N steps
    val_pairs: int = 128
    seed: int = 0
    num_workers: int = 0
    init_weights: str = ""  # start from these weights ("" = random initialisation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pretraining keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


def pretrain_train_config(cfg: PretrainConfig, train_dir: str | os.PathLike, val_dir: str | os.PathLike,
                          run_dir: str | os.PathLike, device: str = "auto") -> TrainConfig:
    """The :class:`~seggpt_lib.engine.trainer.TrainConfig` of a pretraining run: one cosine
    decay over ``steps`` after ``warmup_steps``, validation and checkpoints every ``eval_every``."""
    run_dir = Path(run_dir)
    return TrainConfig.from_dict(dict(
        preset=cfg.preset, model=dict(cfg.model), train_dataset_dir=str(train_dir), val_dataset_dir=str(val_dir),
        log_dir=str(run_dir.parent), run_id=run_dir.name, max_steps=int(cfg.steps), batch_size=int(cfg.batch_size),
        lr=float(cfg.lr), warmup_steps=int(cfg.warmup_steps), cycle_steps=int(cfg.steps), min_lr=float(cfg.min_lr),
        weight_decay=float(cfg.weight_decay), negative_share=float(cfg.negative_share),
        free_share=float(cfg.free_share), negative_target=cfg.negative_target, fg_weight=float(cfg.fg_weight),
        weight_query_defects=cfg.weight_query_defects,
        mask_ratio=float(cfg.mask_ratio), query_mask_share=float(cfg.query_mask_share),
        defect_color=list(cfg.defect_color), data_count=int(cfg.eval_every) * int(cfg.batch_size),
        epoch=max(1, math.ceil(cfg.steps / cfg.eval_every)), eval_per_epoch=1, ckpt_interval=int(cfg.eval_every),
        val_pairs=int(cfg.val_pairs), seed=int(cfg.seed), num_workers=int(cfg.num_workers), device=device,
        precision="auto", log_interval=50, init_weights=cfg.init_weights or None,
    ), source="pretraining config")


def run_pretraining(cfg: PretrainConfig, train_dir: str | os.PathLike, val_dir: str | os.PathLike,
                    run_dir: str | os.PathLike, device: str = "auto", progress: bool = True,
                    log: Callable[[str], None] = print, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train the pretraining run in ``run_dir``, or continue it from its newest complete
    checkpoint when it has one (a run with another recipe there is an error, never overwritten).
    ``stop_at_step``: stop there (checkpointed) for now. Returns ``run_dir``, ``steps`` done,
    ``wall_s`` of this call, ``resumed`` and ``interrupted``."""
    run_dir = Path(run_dir)
    tcfg = pretrain_train_config(cfg, train_dir, val_dir, run_dir, device)
    recipe_file = run_dir / "pretrain.json"
    t0 = time.perf_counter()
    if find_resume_checkpoint(run_dir) is not None:
        if not (run_dir / "config.json").is_file() or not recipe_file.is_file():
            raise ValueError(f"{run_dir} holds checkpoints but no config.json or pretrain.json: not a pretraining "
                             "run this command wrote; give another --run-dir, or remove the folder to start over")
        old = {**PretrainConfig().to_dict(), **json.loads(recipe_file.read_text())}  # newer keys: their defaults
        if old != cfg.to_dict():
            changed = sorted(k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
            raise ValueError(f"{run_dir} holds a pretraining run with another recipe (differs in {changed}); "
                             "give another --run-dir or remove it")
        log(f"continuing the pretraining run in {run_dir} from {find_resume_checkpoint(run_dir).name}")
        res = resume(run_dir, stop_at_step=stop_at_step, progress=progress, overrides={"device": device})
        resumed = True
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            if not recipe_file.is_file():
                raise ValueError(f"{run_dir} exists and holds files of something else (no pretrain.json): "
                                 "give another --run-dir; nothing there was touched")
            shutil.rmtree(run_dir)  # a run of ours that never wrote a complete checkpoint: nothing to keep
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text(recipe_file, json.dumps(cfg.to_dict(), indent=2) + "\n")
        log(f"pretraining {cfg.preset} for {cfg.steps} steps (batch {cfg.batch_size}) in {run_dir}")
        res = train(tcfg, run_dir=run_dir, stop_at_step=stop_at_step, progress=progress)
        resumed = False
    return {"run_dir": str(run_dir), "steps": int(res.step), "wall_s": time.perf_counter() - t0, "resumed": resumed,
            "interrupted": bool(getattr(res, "interrupted", False))}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_pretrained(run_dir: str | os.PathLike, cfg: PretrainConfig, command: str, out_dir: str | os.PathLike = PRETRAINED_DIR,
                      name: str | None = None, which: str = "last", wall_s: float | None = None) -> dict[str, Any]:
    """Write ``out_dir/<name>.safetensors`` (the run's ``which`` checkpoint, weights only),
    ``<name>_metrics.csv`` (the run's curve) and ``<name>.json`` (``name`` default
    ``<preset>_shapes``) (the command, the recipe, the
    step, the file's SHA-256 and size, the machine). Each file is written aside and moved into
    place, so an interrupted export never leaves a half-written checkpoint. Returns the JSON."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    name = name or f"{cfg.preset}_shapes"
    src = run_dir / "checkpoints" / which / "model.safetensors"
    if not src.is_file():
        raise PretrainedError(f"{src}: no {which} checkpoint to export (train first: make pretrained)")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_from_checkpoint(src)  # loads strictly: a broken checkpoint is never exported
    weights = out_dir / f"{name}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, weights)
    metrics = run_dir / "metrics.csv"
    curve = pd.read_csv(metrics) if metrics.is_file() else pd.DataFrame()
    if len(curve):
        tmp_csv = out_dir / f"{name}_metrics.csv.tmp"
        curve.to_csv(tmp_csv, index=False)
        os.replace(tmp_csv, out_dir / f"{name}_metrics.csv")
    step = checkpoint_step(src.parent)
    val = curve.dropna(subset=["val_miou"]) if "val_miou" in curve else pd.DataFrame()

    def final(column: str) -> float | None:  # the last validation's value (None: none, or not logged then)
        v = val[column].iloc[-1] if len(val) and column in val else None
        return float(v) if v is not None and pd.notna(v) else None

    info = {
        "file": weights.name, "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
        "preset": cfg.preset, "parameters": int(sum(p.numel() for p in model.parameters())),
        "steps": int(step or 0), "checkpoint": which,
        "command": command, "recipe": cfg.to_dict(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads",
        "wall_s_last_call": wall_s,
        "final_val_miou": final("val_miou"),
        "final_val_prompt_auroc": final("val_prompt_auroc"),
        "curve": f"{name}_metrics.csv",
    }
    if cfg.init_weights:  # what the run started from, so the file can be rebuilt from the same start
        start = Path(cfg.init_weights)
        info["init_weights_sha256"] = file_sha256(start) if start.is_file() else None
    _write_text(out_dir / f"{name}.json", json.dumps(info, indent=2) + "\n")
    return info


def shipped_info(out_dir: str | os.PathLike | None = None, name: str = SHIPPED_NAME) -> dict[str, Any]:
    """The JSON recorded beside the shipped checkpoint (:class:`PretrainedError` when absent);
    ``out_dir`` None: :data:`PRETRAINED_DIR` (read at call time)."""
    path = Path(out_dir if out_dir is not None else PRETRAINED_DIR) / f"{name}.json"
    if not path.is_file():
        raise PretrainedError(f"{path}: no shipped pretrained checkpoint here (make pretrained builds it)")
    return json.loads(path.read_text())


def shipped_checkpoint(out_dir: str | os.PathLike | None = None, name: str = SHIPPED_NAME, verify: bool = True) -> Path:
    """The shipped checkpoint's path, its SHA-256 checked against the recorded one (``verify``);
    ``out_dir`` None: :data:`PRETRAINED_DIR` (read at call time, so tests can point it elsewhere)."""
    out_dir = Path(out_dir if out_dir is not None else PRETRAINED_DIR)
    info = shipped_info(out_dir, name)
    path = out_dir / info["file"]
    if not path.is_file():
        raise PretrainedError(f"{path}: recorded in {name}.json but missing")
    if verify and file_sha256(path) != info["sha256"]:
        raise PretrainedError(f"{path}: SHA-256 {file_sha256(path)} differs from the recorded {info['sha256']} "
                              "(the file changed: rebuild it with make pretrained, or restore it)")
    return path
