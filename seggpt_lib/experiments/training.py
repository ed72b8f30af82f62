"""Notebook 02's calls: the model configuration, the training run, its curves and checkpoints."""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch

from seggpt_lib.data.pairs import PairConfig, PairDataset
from seggpt_lib.data.stats import compute_stats
from seggpt_lib.engine.trainer import TrainConfig, build_model, train
from seggpt_lib.experiments.config import PipelineError, TrainSettings, resolve_device_name, resolve_preset, resolve_weights
from seggpt_lib.experiments.dataset import has_positive_pairs, scan_index, split_roots
from seggpt_lib.model.checkpoint import save_weights


def training_config(split_root: str | os.PathLike, run_dir: str | os.PathLike, settings: TrainSettings,
                    mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
                    log: Callable[[str], None] = print) -> TrainConfig:
    """The :class:`~seggpt_lib.engine.trainer.TrainConfig` of a pipeline run.

    ``settings.recipe`` is the recipe (TrainConfig keys over :data:`PIPELINE_RECIPE`); the pipeline
    sets the data folders, the model, the device, ``max_steps = steps`` (the budget: the same
    steps and seed give the same run), ``max_minutes = train_minutes`` (an optional wall-clock cap,
    None by default: a run it ends depends on the machine's load), and sizes an epoch to
    ``eval_every`` steps so that validation (and the ``last``/``best`` checkpoints) come every
    ``eval_every`` steps. With ``normalize`` ``dataset``
    the training split's ``mean_std`` (computed when not given). Without a class holding two
    defect images in ``val`` there is no validation (said in the log)."""
    s = settings
    roots = split_roots(split_root)
    if "train" not in roots:
        raise PipelineError(f"{split_root}: no train/ split")
    name, ov = resolve_preset(s.weights, s.preset, s.model)
    d = s.full_recipe()
    bs = int(d.get("batch_size", 4)) * int(d.get("grad_accum_steps", 1))
    eval_every = max(1, int(s.eval_every))
    steps = int(s.steps)
    val_dir = ""
    if "val" in roots and has_positive_pairs(roots["val"]):
        val_dir = str(roots["val"])
    else:
        log("no validation: the val split has no class with two defect images")
    if s.normalize == "dataset":
        if mean_std is None:
            mean_std = compute_stats(roots["train"], size=256)
        d["image_mean"], d["image_std"] = [float(v) for v in mean_std[0]], [float(v) for v in mean_std[1]]
    d.update(
        preset=name, model=ov, init_weights=resolve_weights(s.weights) or None, train_dataset_dir=str(roots["train"]),
        val_dataset_dir=val_dir, device=resolve_device_name(s.device), precision=s.precision, seed=int(s.seed),
        max_steps=steps, max_minutes=float(s.train_minutes) if s.train_minutes else None,
        log_dir=str(Path(run_dir).parent), run_id=Path(run_dir).name, val_pairs=int(s.val_pairs),
        data_count=eval_every * bs, epoch=max(1, math.ceil(steps / eval_every)), eval_per_epoch=1 if val_dir else 0,
    )
    d.setdefault("log_interval", min(10, eval_every))
    return TrainConfig.from_dict(d, source="pipeline training config")


def initial_model(cfg):
    """The model exactly as the trainer initialises it (same seed, same weights)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg)


def panel_dataset(cfg, split_root: str | os.PathLike, n: int = 4, mcfg=None):
    """Fixed evaluation pairs (query half hidden) for the five-panel rows: val, else test."""
    roots = split_roots(split_root)
    root = next((roots[s] for s in ("val", "test") if s in roots and has_positive_pairs(roots[s])), roots["train"])
    return PairDataset(scan_index(root), PairConfig.for_model(
        mcfg, train=False, negative_target=cfg.negative_target, mean=cfg.image_mean, std=cfg.image_std, seed=cfg.seed,
        length=max(1, n), negative_share=cfg.negative_share, defect_color=getattr(cfg, "defect_color", None)))


# run_training's keys beyond run_dir / steps_done / wall_s, as a run without training has them
NO_TRAINING: dict[str, Any] = {
    "best_val_miou": math.nan, "best_val_pes": math.nan, "best_val_catch": math.nan, "best_val_yield": math.nan,
    "best_val_prompt_auroc": math.nan, "best_step": None, "select_by": None, "collapse": None, "collapse_steps": [], "fg_weight": None,
    "defect_share": None,
}


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def run_summary(res) -> dict[str, Any]:
    """A :class:`~seggpt_lib.engine.trainer.TrainResult`'s figures as :func:`run_training` returns
    them: the kept ``best`` checkpoint's validation (``best_val_miou``, ``best_val_pes``,
    ``best_val_catch``, ``best_val_yield`` (negative pairs), ``best_val_prompt_auroc`` (does the
    prompt change what is painted: 0.5 no, 1 completely), ``best_step``, chosen by
    ``select_by``), the last validation's ``collapse`` ("nothing" / "everything", None: none)
    with every ``collapse_steps``, the ``fg_weight`` used and the training set's ``defect_share``."""
    b = res.best_val
    return {
        "best_val_miou": res.best_miou if res.best_miou >= 0 else math.nan,
        "best_val_pes": _num(b.get("val_pes")), "best_val_catch": _num(b.get("val_catch")),
        "best_val_yield": _num(b.get("val_yield_neg")), "best_val_prompt_auroc": _num(b.get("val_prompt_auroc")),
        "best_step": res.best_step, "select_by": res.select_by,
        "collapse": res.collapse or None, "collapse_steps": list(res.collapse_steps), "fg_weight": float(res.fg_weight),
        "defect_share": float(res.defect_share),
    }


def run_training(cfg, run_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (a fresh run in ``run_dir``, an older one there is removed); returns the run's
    ``run_dir``, ``steps_done``, ``wall_s`` and :func:`run_summary`'s keys (``best_val_miou``,
    ``best_val_pes``, ``collapse``, ``fg_weight``...). A collapse is said in the log in capitals."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else ""
    log(f"training {cfg.preset} on {cfg.device}: {cfg.max_steps} steps{budget}, batch {cfg.batch_size}, lr {cfg.lr:g}, "
        f"fg_weight {cfg.fg_weight}, best checkpoint by validation {cfg.select_by}")
    t0 = time.perf_counter()
    res = train(cfg, run_dir=run_dir, progress=False)
    wall = time.perf_counter() - t0
    out = run_summary(res)
    log(f"trained {res.step} steps in {wall / 60:.1f} min (fg_weight {out['fg_weight']:.2f}, defect share "
        f"{100 * out['defect_share']:.2f} %); best checkpoint (step {out['best_step']}): val PES {out['best_val_pes']:.4f}, "
        f"catch {out['best_val_catch']:.3f}, yield {out['best_val_yield']:.3f}, mIoU {out['best_val_miou']:.4f}, "
        f"prompt AUROC {out['best_val_prompt_auroc']:.3f}")
    if out["collapse"]:
        log(collapse_banner(out["collapse"], out["collapse_steps"]))
    return {"run_dir": str(run_dir), "steps_done": int(res.step), "wall_s": wall, **out}


def collapse_banner(collapse: str, steps: Sequence[int]) -> str:
    """The loud line of a collapsed run (the CLI and the notebooks print it)."""
    return (f"WARNING: COLLAPSE: at its last validation the model paints {collapse.upper()} (validation steps with a "
            f"collapse: {', '.join(map(str, steps)) or 'none'}): its figures equal the paint-{collapse} baseline. "
            + ("Lower fg_weight (fg_weight auto follows the set's defect share)." if collapse == "everything"
               else "Train longer or raise fg_weight."))


def train_or_take(cfg: TrainConfig, run_dir: str | os.PathLike, initial, checkpoint: str = "best",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Notebook 02's run: with ``cfg.max_steps > 0`` train (:func:`run_training`) and evaluate the
    ``checkpoint`` weights; with 0 steps take ``cfg.init_weights`` as they are, or (none given) the
    initial model ``initial`` saved beside the run for the evaluation notebooks. Returns
    :func:`run_training`'s keys plus ``weights`` (the file the evaluation uses) and ``trained``."""
    run_dir = Path(run_dir)
    if cfg.max_steps > 0:
        res = run_training(cfg, run_dir, log=log)
        return {**res, "weights": trained_weights(run_dir, checkpoint), "trained": True}
    weights = Path(cfg.init_weights) if cfg.init_weights else save_weights(initial, run_dir.parent / "init.safetensors")
    log(f"no training (steps = 0): evaluating {weights}")
    return {"run_dir": None, "steps_done": 0, "wall_s": 0.0, **NO_TRAINING, "collapse_steps": [], "weights": weights,
            "trained": False}


def training_table(cfg: TrainConfig, run: dict[str, Any], metrics: pd.DataFrame, n_parameters: int) -> pd.DataFrame:
    """Notebook 02's one-row summary: the model, the budget used, the kept checkpoint's validation
    (PES, catch, yield, mIoU), a collapse, the defect weight."""
    return pd.DataFrame([{
        "preset": cfg.preset, "parameters_M": n_parameters / 1e6, "device": cfg.device, "trained": run["trained"],
        "steps": run["steps_done"], "minutes": run["wall_s"] / 60, "best_val_mIoU": run["best_val_miou"],
        "best_val_PES": run.get("best_val_pes", math.nan), "best_val_catch": run.get("best_val_catch", math.nan),
        "best_val_yield": run.get("best_val_yield", math.nan),
        "best_val_prompt_AUROC": run.get("best_val_prompt_auroc", math.nan), "collapse": run.get("collapse") or "none",
        "fg_weight": run.get("fg_weight"),
        "final_loss": float(metrics["loss"].iloc[-1]) if len(metrics) else math.nan,
        "lr": cfg.lr, "batch_size": cfg.batch_size,
        "init_weights": Path(cfg.init_weights).name if cfg.init_weights else "random",
    }])


def trained_weights(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """``checkpoints/<which>/model.safetensors`` of a run (``best`` falls back to ``last``)."""
    ck = Path(run_dir) / "checkpoints"
    for name in ((which, "last") if which == "best" else (which,)):
        p = ck / name / "model.safetensors"
        if p.is_file():
            return p
    raise PipelineError(f"{ck}: no {which} checkpoint")


def read_metrics(run_dir: str | os.PathLike):
    """A run's ``metrics.csv`` as a DataFrame (empty when there is none)."""
    p = Path(run_dir) / "metrics.csv"
    return pd.read_csv(p) if p.is_file() else pd.DataFrame(columns=["step", "loss", "lr", "fg_frac", "val_miou"])
