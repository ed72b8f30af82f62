"""Ablation grids: ``seggpt ablate --config configs/ablations/NAME.json`` (``make ablate NAME=...``).

An ablation file (:class:`AblationSpec`) names a base pipeline config (``base``, plus ``set`` and
``budget`` overrides), a grid over any :class:`~seggpt_lib.experiments.config.PipelineConfig` key
(``grid``: the cartesian product of value lists; ``variants``: named sets of values; both: every
variant crossed with the product; dotted keys such as ``train.mask_ratio`` address nested ones),
``seeds``, the ``notebooks`` each cell runs and how (``executor``). :func:`plan` turns it into
:class:`Cell` s, every one resolved and checked by the pipeline's own checker before anything runs.

Each cell runs its notebooks with papermill into ``<results_dir>/ablations/NAME/<cell>/`` (its own
``summary.json``, reports, tables, figures, ``cell.log``). The cell's folder name is a slug of its
varied values and seed plus a short hash of its resolved config, and a cell is finished when its
``summary.json`` says ``complete`` for that hash: a rerun skips finished cells (an interrupted
ablation resumes where it stopped; a changed base config gets new cells). A failing cell is
reported with its log and the others go on.

Executors: ``local`` (cells one after another, or ``jobs`` at a time in subprocesses, each with
its share of the cores through ``OMP_NUM_THREADS``), ``slurm`` (through submitit: partition, GPUs
per cell, time limit, one array job), and submitit's ``submitit-local`` / ``submitit-debug``
(the SLURM path on this machine). A cell with ``train_procs`` > 1 (default: ``gpus_per_cell``)
trains with ``torchrun`` inside its job, then notebook 02 evaluates the trained weights.

The aggregate (:mod:`seggpt_lib.experiments.ablate_report`): ``index.html``, tables and figures of
every metric as mean ± standard deviation over seeds. submitit is imported only by the submitit
executors; papermill, nbconvert and jupytext only where a cell runs.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from seggpt_lib.experiments.config import (
    NOTEBOOKS,
    REPO_ROOT,
    PipelineConfig,
    PipelineError,
    load_config,
)
from seggpt_lib.utils.config import check_fields, is_number, read_json_config

# ------------------------------------------------------------------------------------------
# the ablation file
# ------------------------------------------------------------------------------------------
EXECUTORS: tuple[str, ...] = ("local", "slurm", "submitit-local", "submitit-debug")
_SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}
# the headline figures aggregated by default (summary.json's headline, then its top-level keys)
DEFAULT_METRICS: tuple[str, ...] = ("positive_miou", "catch_rate", "yield_rate", "free_yield_rate", "pes",
                                    "best_val_miou")
DEFAULT_NOTEBOOKS: tuple[str, ...] = ("01_data_transformation", "02_training", "03_grid_ablation", "04_pair_evaluation")
# keys a cell sets itself: never varied by a grid
_CELL_KEYS = ("results_dir",)
# keys that do not change what a cell computes (left out of its hash)
_NOT_HASHED = ("results_dir", "kernel", "html", "heartbeat_s", "echo")


class AblationError(PipelineError):
    """The ablation file or its grid is wrong (raised before any cell runs), or the ablation failed."""


@dataclass
class ExecutorSpec:
    """How the cells run (the ``executor`` object of an ablation file)."""

    kind: str = "local"  # local | slurm | submitit-local | submitit-debug
    jobs: int = 1  # local: cells at a time
    threads: int | None = None  # torch / OpenMP threads per cell (default: the cores / jobs)
    gpus_per_cell: int = 0  # slurm: GPUs per job (> 1: torchrun inside the job)
    train_procs: int | None = None  # torchrun processes of the training (default: gpus_per_cell when > 1, else 1)
    cpus_per_cell: int | None = None  # slurm: cpus per task
    mem_gb: int | None = None
    partition: str | None = None  # slurm partition
    time_minutes: float | None = None  # slurm time limit per cell (default: the ablation's timeout_minutes, else 24 h)
    array_parallelism: int | None = None  # slurm: array tasks at a time
    poll_s: float = 2.0  # how often the submitit executors look at their jobs
    submitit: dict[str, Any] = field(default_factory=dict)  # more submitit parameters (slurm_account, slurm_qos...)


@dataclass
class AblationSpec:
    """An ablation file (``configs/ablations/NAME.json``; ``_``-prefixed keys are comments)."""

    name: str = ""  # default: the file's name
    base: str | None = "../pipeline.json"  # pipeline config (relative to the ablation file); null: the defaults
    smoke: bool = False  # start from the smoke settings (seggpt reproduce --smoke)
    set: dict[str, Any] = field(default_factory=dict)  # base overrides (dotted keys for nested ones)
    budget: dict[str, Any] = field(default_factory=dict)  # every cell's budget (steps, train_minutes...), after set
    grid: dict[str, list] = field(default_factory=dict)  # key -> values: the cartesian product
    variants: dict[str, dict] = field(default_factory=dict)  # name -> {key: value}: an explicit list
    seeds: int | list[int] = 1  # N (seeds 0..N-1) or the seeds
    seed_keys: list[str] = field(default_factory=lambda: ["seed"])  # the config keys a seed sets
    notebooks: list[str | int] = field(default_factory=lambda: list(DEFAULT_NOTEBOOKS))  # names, numbers 1-5, .py/.ipynb paths
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    lower_is_better: list[str] = field(default_factory=list)  # metrics where less is better
    timeout_minutes: float | None = None  # wall-clock limit of one cell (null: none)
    executor: dict[str, Any] = field(default_factory=dict)  # ExecutorSpec keys
    quick: dict[str, Any] = field(default_factory=dict)  # --quick: these keys replace the file's
    description: str = ""


@dataclass
class Cell:
    """One point of the grid at one seed: its resolved pipeline config and where it runs."""

    name: str  # the folder name: slug of the varied values, seed, hash
    group: str  # the grid point (the name without seed and hash): cells of one group differ by seed only
    variant: str | None
    values: dict[str, Any]  # the varied keys' values (as given)
    seed: int
    config: dict[str, Any]  # the resolved pipeline config (results_dir: the cell's folder)
    config_hash: str
    notebooks: list[str]  # pipeline notebook names or absolute notebook paths
    dir: Path
    train_procs: int = 1
    threads: int | None = None
    timeout_minutes: float | None = None

    def record(self) -> dict[str, Any]:
        """``cell.json``: what the cell's process needs, and what its summary records."""
        return {"name": self.name, "group": self.group, "variant": self.variant, "values": self.values,
                "seed": self.seed, "config_hash": self.config_hash, "notebooks": self.notebooks,
                "train_procs": self.train_procs, "threads": self.threads, "config": self.config}


@dataclass
class Ablation:
    """A checked ablation: the file, its cells, where they go, how they run."""

    spec: AblationSpec
    source: Path
    name: str
    root: Path  # <results_dir>/ablations/<name>
    cells: list[Cell]
    varied: list[str]  # the varied keys (grid and variants), in order
    executor: ExecutorSpec
    quick: bool = False


def _fail(source: Any, msg: str) -> AblationError:
    return AblationError(f"{source}: {msg}")


def _relabel(e: PipelineError, label: str) -> str:
    msg = str(e)
    for prefix in ("--set: ", "smoke: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return f"{label}: {msg}"


def _flat(d: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides with the merged keys' objects (``train``, ``synthetic``) as dotted keys, so that
    later sources override single sub-keys rather than whole objects."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in PipelineConfig.MERGED and isinstance(v, dict):
            for sk, sv in v.items():
                out[f"{k}.{sk}"] = copy.deepcopy(sv)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _lookup(cfg: Mapping[str, Any], key: str) -> Any:
    d: Any = cfg
    for part in key.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return None
        d = d[part]
    return d


def _value_text(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(_value_text(x) for x in v) or "empty"
    if isinstance(v, dict):
        return "-".join(f"{k}{_value_text(x)}" for k, x in v.items()) or "empty"
    return str(v)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe piece of a cell name."""
    s = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.")
    return (s[:limit].rstrip("_.") or "x")


def config_hash(config: Mapping[str, Any], notebooks: Sequence[str], train_procs: int = 1) -> str:
    """8 hex digits of the resolved config (what the cell computes; output settings left out)."""
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_HASHED}
    text = json.dumps({"config": keep, "notebooks": list(notebooks), "train_procs": train_procs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _resolve_path(p: str, source: Path) -> Path:
    q = Path(p).expanduser()
    if q.is_absolute():
        return q
    for base in (source.parent, Path.cwd(), REPO_ROOT):
        if (base / q).exists():
            return (base / q).resolve()
    return (source.parent / q).resolve()


def _notebook_entry(entry: Any, source: Path) -> str:
    """A pipeline notebook's name (also by number, 1-5), or a notebook file's absolute path."""
    names = list(NOTEBOOKS)
    if isinstance(entry, int) and not isinstance(entry, bool):
        entry = str(entry)
    if not isinstance(entry, str) or not entry.strip():
        raise _fail(source, f"notebooks: {entry!r} is no notebook (a name: {', '.join(names)}; a number 1-"
                            f"{len(names)}; or a .py / .ipynb path)")
    e = entry.strip()
    if e.isdigit() and 1 <= int(e) <= len(names):
        return names[int(e) - 1]
    if e in names:
        return e
    if e.endswith((".py", ".ipynb")):
        p = _resolve_path(e, source)
        if not p.is_file():
            raise _fail(source, f"notebooks: {e} not found ({p})")
        return str(p)
    raise _fail(source, f"notebooks: unknown notebook {e!r} (pipeline notebooks: {', '.join(names)}, or 1-"
                        f"{len(names)}; or a path to a .py / .ipynb notebook)")


def _check_spec_values(spec: AblationSpec, source: Path) -> None:
    if not isinstance(spec.grid, dict):
        raise _fail(source, f"grid must be an object {{key: [values]}}, got {spec.grid!r}")
    for k, vals in spec.grid.items():
        if not isinstance(vals, list):
            raise _fail(source, f"grid {k!r}: the values must be a list, got {vals!r}")
        if not vals:
            raise _fail(source, f"grid {k!r}: an empty list of values (give at least one)")
    if not isinstance(spec.variants, dict) or not all(isinstance(v, dict) for v in spec.variants.values()):
        raise _fail(source, "variants must be an object {name: {key: value, ...}, ...}")
    slugs = [slug(n) for n in spec.variants]
    if len(set(slugs)) != len(slugs):
        raise _fail(source, f"variants: two names give the same folder name ({', '.join(spec.variants)})")
    for k in (*spec.grid, *itertools.chain.from_iterable(spec.variants.values())):
        if k.split(".")[0] in _CELL_KEYS:
            raise _fail(source, f"{k} is set per cell by the ablation (<results_dir>/ablations/NAME/<cell>); "
                                "it cannot be varied")
    seeds = spec.seeds
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise _fail(source, f"seeds must be a number >= 1 or a non-empty list of seeds, got {seeds!r}")
    elif not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _fail(source, f"seeds must be a number >= 1 or a non-empty list of integers >= 0, got {seeds!r}")
    elif len(set(seeds)) != len(seeds):
        raise _fail(source, f"seeds: a seed given twice in {seeds!r}")
    if not spec.seed_keys:
        raise _fail(source, "seed_keys: give at least one config key the seed sets (e.g. seed)")
    for k in spec.seed_keys:
        try:
            load_config(None, {k: 0})
        except PipelineError as e:
            raise AblationError(_relabel(e, f"{source}: seed_keys {k!r}")) from None
        if k in spec.grid or any(k in v for v in spec.variants.values()):
            raise _fail(source, f"{k} is set by the seeds (seed_keys); it cannot be varied by the grid too")
    if not spec.notebooks:
        raise _fail(source, "notebooks: an empty list (give the notebooks each cell runs)")
    if not spec.metrics or not all(isinstance(m, str) and m for m in spec.metrics):
        raise _fail(source, f"metrics must be a non-empty list of summary keys, got {spec.metrics!r}")
    if spec.timeout_minutes is not None and not (is_number(spec.timeout_minutes) and spec.timeout_minutes > 0):
        raise _fail(source, f"timeout_minutes must be a number > 0 or null, got {spec.timeout_minutes!r}")


def _executor(spec: AblationSpec, source: Path, overrides: Mapping[str, Any] | None) -> ExecutorSpec:
    d = {**(spec.executor or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    check_fields(d, ExecutorSpec, str(source), "executor.", error=AblationError, what="executor")
    ex = ExecutorSpec(**d)
    if ex.kind not in EXECUTORS:
        raise _fail(source, f"executor.kind must be one of {', '.join(EXECUTORS)}, got {ex.kind!r}")
    for k in ("jobs", "poll_s"):
        if not (is_number(getattr(ex, k)) and getattr(ex, k) > 0):
            raise _fail(source, f"executor.{k} must be > 0, got {getattr(ex, k)!r}")
    for k in ("threads", "train_procs", "cpus_per_cell", "mem_gb", "array_parallelism"):
        v = getattr(ex, k)
        if v is not None and v < 1:
            raise _fail(source, f"executor.{k} must be >= 1 or null, got {v!r}")
    if ex.gpus_per_cell < 0:
        raise _fail(source, f"executor.gpus_per_cell must be >= 0, got {ex.gpus_per_cell!r}")
    return ex


def read_spec(path: str | os.PathLike, quick: bool = False) -> AblationSpec:
    """The ablation file ``path`` as an :class:`AblationSpec` (``quick``: its ``quick`` keys
    replace the file's). Unknown keys and values of the wrong type raise :class:`AblationError`."""
    source = Path(path)
    d = read_json_config(source, what="ablation file", error=AblationError, drop_comments=True)
    check_fields(d, AblationSpec, str(source), error=AblationError, what="ablation")
    if quick:
        q = d.get("quick") or {}
        if not q:
            raise _fail(source, "--quick: the file has no quick variant (a \"quick\" object of keys to replace)")
        check_fields(q, AblationSpec, f"{source} (quick)", error=AblationError, what="ablation")
        if "quick" in q:
            raise _fail(source, "quick: a quick variant cannot hold another")
        d = {**d, **q}
    return AblationSpec(**d)


def plan(path: str | os.PathLike, quick: bool = False, overrides: Mapping[str, Any] | Sequence[str] | None = None,
         executor: Mapping[str, Any] | None = None, results_dir: str | os.PathLike | None = None) -> Ablation:
    """Read and check the ablation file ``path`` and resolve every cell: the base config (its
    ``base`` file, ``smoke``, ``set``, ``budget``), then the cell's variant and grid values, then
    its seed, checked by the pipeline's checker (:func:`~seggpt_lib.experiments.config.load_config`).
    ``overrides`` (``--set``) apply to the base; ``executor``: ExecutorSpec keys over the file's.
    Every problem raises :class:`AblationError` before anything runs."""
    source = Path(path)
    spec = read_spec(source, quick)
    _check_spec_values(spec, source)
    name = slug(spec.name or source.stem, 60) + ("_quick" if quick else "")
    ex = _executor(spec, source, executor)
    notebooks = [_notebook_entry(e, source) for e in spec.notebooks]
    base_path = _resolve_path(spec.base, source) if spec.base else None
    if base_path is not None and not base_path.is_file():
        raise _fail(source, f"base config not found: {spec.base} ({base_path})")
    if overrides is not None and not isinstance(overrides, Mapping):
        from seggpt_lib.experiments.config import parse_set

        overrides = parse_set(overrides)
    base_ov = {**_flat(spec.set), **_flat(spec.budget), **_flat(overrides or {})}
    try:
        base = load_config(base_path, base_ov, smoke=spec.smoke)
    except PipelineError as e:
        raise AblationError(_relabel(e, f"{source}: base config (base, set, budget, --set)")) from None
    # each grid value and variant on its own first: the message names the entry
    for k, vals in spec.grid.items():
        for v in vals:
            try:
                load_config(None, {k: v})
            except PipelineError as e:
                raise AblationError(_relabel(e, f"{source}: grid {k}={json.dumps(v)}")) from None
    for vname, vset in spec.variants.items():
        try:
            load_config(None, vset)
        except PipelineError as e:
            raise AblationError(_relabel(e, f"{source}: variant {vname!r}")) from None
    root = Path(results_dir or base["results_dir"]).expanduser().resolve() / "ablations" / name
    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else list(spec.seeds)
    varied = list(dict.fromkeys([*itertools.chain.from_iterable(spec.variants.values()), *spec.grid]))
    shorts = _short_names(list(spec.grid))
    variants = list(spec.variants.items()) or [(None, {})]
    points = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())] or [{}]
    threads = ex.threads or (max(1, _cpu_count() // int(ex.jobs)) if ex.kind == "local" else ex.cpus_per_cell)
    train_procs = ex.train_procs or (ex.gpus_per_cell if ex.gpus_per_cell > 1 else 1)
    cells: list[Cell] = []
    base_clean = {k: v for k, v in base.items() if not k.startswith("_")}
    for seed in seeds:
        for vname, vset in variants:
            for point in points:
                parts = ([slug(vname)] if vname is not None else []) + \
                        [f"{shorts[k]}-{slug(_value_text(v), 24)}" for k, v in point.items()]
                group = "__".join(parts) or "base"
                ov = {**_flat(base_clean), **_flat(vset), **_flat(point), **{k: seed for k in spec.seed_keys}}
                label = f"{source}: cell {group}, seed {seed}"
                try:
                    cfg = load_config(None, ov)
                except PipelineError as e:
                    raise AblationError(_relabel(e, label)) from None
                cfg["_explicit"] = sorted(set(base.get("_explicit", [])))
                h = config_hash(cfg, [n if n in NOTEBOOKS else Path(n).name for n in notebooks], train_procs)
                cell_name = f"{group}__seed-{seed}__{h}"
                cell_dir = root / cell_name
                cfg["results_dir"] = str(cell_dir)
                values = {**({"variant": vname} if vname is not None else {}), **point}
                cells.append(Cell(name=cell_name, group=group, variant=vname, values=values, seed=seed, config=cfg,
                                  config_hash=h, notebooks=notebooks, dir=cell_dir, train_procs=train_procs,
                                  threads=threads, timeout_minutes=spec.timeout_minutes))
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _fail(source, f"two cells of the grid are the same ({dup[0]}): a value or variant given twice")
    return Ablation(spec=spec, source=source, name=name, root=root, cells=cells, varied=varied, executor=ex,
                    quick=quick)


def _short_names(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# one cell
# ------------------------------------------------------------------------------------------
def read_summary(cell_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(cell_dir) / "summary.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def is_finished(cell: Cell) -> bool:
    """The cell's ``summary.json`` exists, says ``complete`` and records this cell's config hash."""
    s = read_summary(cell.dir)
    return bool(s) and s.get("status") == "complete" and (s.get("ablation") or {}).get("config_hash") == cell.config_hash


def prepare_cell(cell: Cell, root: Path) -> Path:
    """A fresh folder for a cell that is not finished (a partial earlier attempt removed), with
    its ``cell.json``; returns the ``cell.json`` path."""
    d = cell.dir.resolve()
    if d.parent != root.resolve():  # never outside the ablation's folder
        raise AblationError(f"cell folder {d} is not inside {root}")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    p = d / "cell.json"
    p.write_text(json.dumps(cell.record(), indent=2) + "\n")
    return p


def declared_parameters(path: str | os.PathLike) -> list[str]:
    """The names assigned in a notebook file's ``parameters`` cell (none: no such cell)."""
    import ast

    import jupytext  # lazy: only where a cell runs

    nb = jupytext.read(str(path))
    for c in nb.cells:
        if c.cell_type == "code" and "parameters" in (c.metadata.get("tags") or []):
            names: list[str] = []
            for node in ast.parse(c.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                    node, (ast.AnnAssign, ast.AugAssign)) else []
                names += [t.id for t in targets if isinstance(t, ast.Name)]
            return names
    return []


def _parameters(entry: str, config: dict[str, Any]) -> tuple[str, Path | None, dict[str, Any]]:
    """(name, notebooks folder or None, papermill parameters) of one of a cell's notebooks."""
    from seggpt_lib.experiments.runner import notebook_parameters

    if entry in NOTEBOOKS:
        return entry, None, notebook_parameters(entry, config)
    p = Path(entry)
    params = {k: copy.deepcopy(config[k]) for k in declared_parameters(p) if k in config}
    if "results_dir" in params:
        params["results_dir"] = str(Path(config["results_dir"]).resolve())
    return p.stem, p.parent, params


def _run_logged(cmd: list[str], log: Callable[[str], None], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with its output into this process's stdout (the cell's log)."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
        return subprocess.run(cmd, stdout=fd, stderr=subprocess.STDOUT, env=env).returncode
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (captured)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log(res.stdout + res.stderr)
        return res.returncode


def train_distributed(config: dict[str, Any], procs: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The cell's training with ``torchrun --nproc_per_node procs`` (``seggpt train``, DDP) into
    the run folder notebook 02 would use; returns the weights to evaluate and the run's figures."""
    import math

    import pandas as pd

    from seggpt_lib.experiments import training as TR
    from seggpt_lib.experiments.results import DataFragment, load_fragment
    from seggpt_lib.experiments.runner import training_run_dir

    root = Path(config["results_dir"])
    data = load_fragment(root, DataFragment)
    settings = PipelineConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")}).train_settings()
    run_dir = training_run_dir(root)
    tc = TR.training_config(data.split_root, run_dir, settings, mean_std=data.mean_std(), log=log)
    cfg_path = root / "work" / "train_distributed.json"
    cfg_path.write_text(json.dumps(tc.to_dict(), indent=1) + "\n")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "seggpt_lib", "train", "--config", str(cfg_path), "--no-progress"]
    log(f"training with torchrun, {procs} processes: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    rc = _run_logged(cmd, log)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise PipelineError(f"torchrun training failed (exit {rc}); see the cell's log")
    metrics = TR.read_metrics(run_dir)
    vals = pd.to_numeric(metrics.get("val_miou", pd.Series(dtype=float)), errors="coerce").dropna()
    return {"procs": procs, "weights": str(TR.trained_weights(run_dir, config["checkpoint"])),
            "steps_done": int(metrics["step"].max()) if len(metrics) else 0,
            "best_val_miou": float(vals.max()) if len(vals) else math.nan, "wall_s": wall}


def run_cell(cell: Mapping[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a cell's notebooks (``cell``: its ``cell.json``) into its folder, render the reports,
    write its ``summary.json`` (with an ``ablation`` record: name, values, seed, config hash,
    status; the error where it failed) and ``index.html``. Returns the summary."""
    from seggpt_lib.experiments.report import build_summary, headline_table, write_index_html
    from seggpt_lib.experiments.results import jsonable, result_dirs, write_table
    from seggpt_lib.experiments.runner import execute_notebook, render_html

    config = copy.deepcopy(dict(cell["config"]))
    root = Path(config["results_dir"])
    dirs = result_dirs(root)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    failure: str | None = None
    ddp: dict[str, Any] | None = None
    entries = list(cell["notebooks"])
    log(f"cell {cell['name']}: {len(entries)} notebook(s) -> {root}")
    for i, entry in enumerate(entries, 1):
        t0 = time.perf_counter()
        name = Path(entry).stem
        try:
            name, nb_dir, params = _parameters(entry, config)
            if (name == "02_training" and nb_dir is None and int(cell.get("train_procs") or 1) > 1
                    and config["steps"] > 0):
                ddp = train_distributed(config, int(cell["train_procs"]), log)
                params.update(steps=0, weights=ddp["weights"])
            log(f"[{i}/{len(entries)}] {name}: started")
            out = dirs["work"] / f"{name}.ipynb"
            try:
                execute_notebook(name, out, params, kernel=config.get("kernel", "python3"), notebooks_dir=nb_dir,
                                 echo=sys.stdout if config.get("echo", True) else None)
            finally:
                if out.is_file() and config.get("html", True):
                    try:
                        render_html(out, dirs["reports"] / f"{name}.html")
                    except Exception as e:  # a partial copy may not render: the failure above still holds
                        log(f"{name}: report not rendered ({type(e).__name__}: {e})")
        except Exception as e:  # the cell fails; the ablation goes on
            times[name] = time.perf_counter() - t0
            failure = f"{name}: {e}" if isinstance(e, PipelineError) else f"{name}: {type(e).__name__}: {e}"
            log(f"[{i}/{len(entries)}] {name}: FAILED after {times[name]:.0f}s\n{failure}")
            break
        times[name] = time.perf_counter() - t0
        log(f"[{i}/{len(entries)}] {name}: done in {times[name]:.0f}s")
    wall = time.perf_counter() - t_start
    status = "complete" if failure is None else "failed"
    summary = build_summary(root, config, times, wall, status=status)
    if ddp is not None:  # notebook 02 evaluated the torchrun run's weights
        summary.update(steps=ddp["steps_done"], best_val_miou=ddp["best_val_miou"], train_wall_s=ddp["wall_s"],
                       trained=True)
    summary["ablation"] = {**{k: cell.get(k) for k in ("name", "group", "variant", "values", "seed", "config_hash",
                                                     "notebooks", "train_procs", "threads")},
                           "status": status, "error": failure, "distributed_training": ddp}
    summary = jsonable(summary)
    tmp = root / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(root / "summary.json")
    if failure is None and summary.get("headline"):
        write_table(headline_table(summary), root, "headline", title="Headline figures")
    write_index_html(root, summary)
    log(f"cell {cell['name']}: {status} in {wall:.0f}s")
    return summary


class _Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def fileno(self) -> int:
        return self.streams[0].fileno()


def run_cell_file(path: str | os.PathLike, own_log: bool = False) -> int:
    """Run the cell described by ``cell.json`` at ``path`` (a cell's process: the local executor's
    subprocess, a submitit job); 0 when it completed, 1 when it failed. Never raises (a submitit
    debug job would open a debugger). ``own_log``: append this process's output to the cell's
    ``cell.log`` (the local executor redirects the subprocess's output there itself)."""
    path = Path(path)
    log_file = None
    saved = sys.stdout, sys.stderr
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        cell = json.loads(path.read_text())
        if own_log:
            log_file = open(path.parent / "cell.log", "a", encoding="utf-8", buffering=1)
            sys.stdout = sys.stderr = log_file
        if cell.get("threads"):  # the notebooks' kernels inherit the environment
            for k in saved_env:
                os.environ[k] = str(cell["threads"])

        def log(msg: str) -> None:
            print(msg, flush=True)

        summary = run_cell(cell, log=log)
        return 0 if summary.get("status") == "complete" else 1
    except Exception:
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    finally:
        sys.stdout, sys.stderr = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if log_file is not None:
            log_file.close()


# ------------------------------------------------------------------------------------------
# executors
# ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """A cell's run: whether it completed, how long it took, why it failed (and where its log is)."""

    cell: Cell
    ok: bool
    seconds: float
    error: str | None = None

    @property
    def log(self) -> Path:
        return self.cell.dir / "cell.log"


def _failure_text(cell: Cell, fallback: str = "") -> str:
    s = read_summary(cell.dir) or {}
    err = (s.get("ablation") or {}).get("error")
    if err:
        return str(err)
    p = cell.dir / "cell.log"
    tail = ""
    if p.is_file():
        lines = p.read_text(errors="replace").strip().splitlines()
        tail = "\n".join(lines[-15:])
    return (fallback + ("\n" if fallback and tail else "") + tail).strip() or "no summary.json and no log"


def _cell_env(cell: Cell) -> dict[str, str]:
    env = dict(os.environ)
    if cell.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cell.threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    pp = env.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return env


_CELL_MAIN = "import sys; from seggpt_lib.experiments.ablate import run_cell_file; sys.exit(run_cell_file(sys.argv[1]))"


def _run_local_cell(cell: Cell, cell_json: Path, stop: threading.Event) -> Outcome:
    t0 = time.perf_counter()
    limit = cell.timeout_minutes * 60 if cell.timeout_minutes else None
    with open(cell.dir / "cell.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-c", _CELL_MAIN, str(cell_json)], stdout=logf,
                                stderr=subprocess.STDOUT, env=_cell_env(cell), start_new_session=True)
        error = None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop.is_set():
                        error = "interrupted"
                    elif limit is not None and time.perf_counter() - t0 > limit:
                        error = f"timed out after {cell.timeout_minutes:g} min (timeout_minutes)"
                    else:
                        continue
                    _kill_group(proc)
                    rc = proc.wait()
                    break
        except BaseException:
            _kill_group(proc)
            raise
    ok = rc == 0 and error is None and is_finished(cell)
    if not ok and error is None:
        error = f"exit status {rc}"
    return Outcome(cell, ok, time.perf_counter() - t0, None if ok else _failure_text(cell, error or ""))


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a cell's process and everything it started (its kernels): its own process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_local(ab: Ablation, todo: list[Cell], on_done: Callable[[Outcome], None]) -> None:
    """The local executor: ``jobs`` cells at a time, each in its own process (and process group)."""
    stop = threading.Event()
    jobs = max(1, int(ab.executor.jobs))
    paths = {c.name: prepare_cell(c, ab.root) for c in todo}
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the cells too, as Ctrl-C does

        def _term(signum, frame):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _term)
    try:
        with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(_run_local_cell, c, paths[c.name], stop): c for c in todo}
            try:
                for fut in cf.as_completed(futs):
                    on_done(fut.result())
            except BaseException:
                stop.set()
                for f in futs:
                    f.cancel()
                raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def run_submitit(ab: Ablation, todo: list[Cell], on_done: Callable[[Outcome], None]) -> None:
    """The submitit executors: ``slurm`` (one array job; partition, GPUs per cell, time limit),
    ``submitit-local`` (submitit's local executor: each cell a job process on this machine) and
    ``submitit-debug`` (in this process, one after another)."""
    try:
        import submitit  # lazy: only these executors need it
    except ImportError:
        raise AblationError(f"executor {ab.executor.kind!r} needs submitit (pip install submitit; it is in "
                            "requirements.txt)") from None
    ex_spec = ab.executor
    cluster = _SUBMITIT_CLUSTER[ex_spec.kind]
    executor = submitit.AutoExecutor(folder=ab.root / "submitit" / "%j", cluster=cluster)
    minutes = ex_spec.time_minutes or ab.spec.timeout_minutes or 24 * 60
    params: dict[str, Any] = {"name": f"ablate-{ab.name}", "timeout_min": int(max(1, round(minutes))),
                              "nodes": 1, "tasks_per_node": 1, "gpus_per_node": int(ex_spec.gpus_per_cell)}
    if ex_spec.cpus_per_cell:
        params["cpus_per_task"] = int(ex_spec.cpus_per_cell)
    if ex_spec.mem_gb:
        params["mem_gb"] = int(ex_spec.mem_gb)
    if ex_spec.partition:
        params["slurm_partition"] = ex_spec.partition
    if ex_spec.array_parallelism:
        params["slurm_array_parallelism"] = int(ex_spec.array_parallelism)
    params.update(ex_spec.submitit)
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError) as e:
        raise AblationError(f"{ab.source}: executor: submitit refused the parameters: {e}") from None
    paths = {c.name: prepare_cell(c, ab.root) for c in todo}
    t0 = {c.name: time.perf_counter() for c in todo}
    if cluster == "debug":  # in this process: run each job as it is asked for its result
        for c in todo:
            job = executor.submit(run_cell_file, str(paths[c.name]), True)
            on_done(_submitit_outcome(c, job, t0[c.name]))
        return
    with executor.batch():
        jobs = [(c, executor.submit(run_cell_file, str(paths[c.name]), True)) for c in todo]
    pending = list(jobs)
    try:
        while pending:
            for item in list(pending):
                c, job = item
                if job.done():
                    pending.remove(item)
                    on_done(_submitit_outcome(c, job, t0[c.name]))
            if pending:
                time.sleep(ex_spec.poll_s)
    except BaseException:
        for _, job in pending:
            try:
                job.cancel(check=False)
            except Exception:
                pass
        raise


def _submitit_outcome(cell: Cell, job: Any, t0: float) -> Outcome:
    err = None
    try:
        rc = job.result()
    except Exception as e:  # the job died (time limit, node failure): submitit's message has its log
        rc, err = 1, f"{type(e).__name__}: {str(e)[-3000:]}"
    ok = rc == 0 and is_finished(cell)
    if not ok and err is None:
        err = f"exit status {rc}"
    return Outcome(cell, ok, time.perf_counter() - t0, None if ok else _failure_text(cell, err or ""))


# ------------------------------------------------------------------------------------------
# the ablation
# ------------------------------------------------------------------------------------------
def _fmt_dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class AblationResult:
    root: Path
    total: int
    skipped: list[str]
    done: list[str]
    failed: list[Outcome]
    wall_s: float
    index: Path | None = None


class _Progress:
    """Cells done / total with an estimate of the time left (tqdm bar, log lines, progress.json)."""

    def __init__(self, ab: Ablation, n_skipped: int, n_todo: int, log: Callable[[str], None], bar: bool) -> None:
        from tqdm.auto import tqdm

        self.ab, self.total, self.log = ab, len(ab.cells), log
        self.done, self.failed, self.ran = n_skipped, 0, 0
        self.n_todo, self.durations = n_todo, []
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=self.total, initial=n_skipped, unit="cell", desc=ab.name, disable=not bar,
                        dynamic_ncols=True, file=sys.stderr)
        self._write()

    def eta(self) -> float | None:
        left = self.n_todo - self.ran
        if not left:
            return 0.0
        if not self.ran:
            return None
        per = (time.perf_counter() - self.t0) / self.ran  # wall per finished cell, parallelism included
        return per * left

    def _write(self) -> None:
        eta = self.eta()
        rec = {"name": self.ab.name, "total": self.total, "done": self.done, "failed": self.failed,
               "to_run": self.n_todo - self.ran, "elapsed_s": round(time.perf_counter() - self.t0, 1),
               "eta_s": None if eta is None else round(eta, 1), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            (self.ab.root / "progress.json").write_text(json.dumps(rec, indent=1) + "\n")
        except OSError:
            pass

    def update(self, o: Outcome) -> None:
        self.ran += 1
        if o.ok:
            self.done += 1
        else:
            self.failed += 1
        self.durations.append(o.seconds)
        self.bar.update(1)
        eta = self.eta()
        left = f"; about {_fmt_dur(eta)} left" if eta else ""
        state = "done" if o.ok else "FAILED"
        self.log(f"[{self.done + self.failed}/{self.total}] {o.cell.name}: {state} in {_fmt_dur(o.seconds)}{left}")
        if not o.ok:
            self.log(f"    log: {o.log}\n" + "\n".join("    " + ln for ln in (o.error or "").splitlines()[-15:]))
        self._write()

    def close(self) -> None:
        self.bar.close()
        self._write()


def run_ablation(ab: Ablation, log: Callable[[str], None] = print, progress: bool = True,
                 aggregate_only: bool = False) -> AblationResult:
    """Run the cells of ``ab`` that are not finished (the others are skipped), with its executor,
    then aggregate every finished cell into ``index.html`` and the tables and figures; the
    results index (``<results_dir>/index.html``) links to it. A failed cell is reported (its
    error, its log) and the others go on; interrupted, the finished cells are aggregated."""
    from seggpt_lib.experiments import ablate_report

    t0 = time.perf_counter()
    ab.root.mkdir(parents=True, exist_ok=True)
    (ab.root / "ablation.json").write_text(json.dumps({
        "name": ab.name, "source": str(ab.source), "quick": ab.quick, "spec": dataclasses.asdict(ab.spec),
        "executor": dataclasses.asdict(ab.executor), "varied": ab.varied,
        "cells": [{k: v for k, v in c.record().items() if k != "config"} for c in ab.cells]}, indent=1) + "\n")
    finished = [c for c in ab.cells if is_finished(c)]
    todo = [c for c in ab.cells if c not in finished] if not aggregate_only else []
    stale = sorted(p.name for p in ab.root.iterdir() if p.is_dir() and (p / "cell.json").is_file()
                   and p.name not in {c.name for c in ab.cells})
    log(f"seggpt ablate {ab.name}: {len(ab.cells)} cells ({len(finished)} finished, skipped; {len(todo)} to run) "
        f"-> {ab.root}")
    if stale:
        log(f"  {len(stale)} folder(s) of other configs left aside (not in this grid): {', '.join(stale[:3])}"
            + (" ..." if len(stale) > 3 else ""))
    failed: list[Outcome] = []
    done: list[str] = []
    prog = _Progress(ab, len(finished), len(todo), log, progress)

    def on_done(o: Outcome) -> None:
        if o.ok:
            done.append(o.cell.name)
        else:
            failed.append(o)
        prog.update(o)

    try:
        if todo:
            log(f"  executor {ab.executor.kind}"
                + (f", {ab.executor.jobs} cell(s) at a time, {todo[0].threads} thread(s) each"
                   if ab.executor.kind == "local" else "")
                + (f", training with torchrun ({todo[0].train_procs} processes)" if todo[0].train_procs > 1 else ""))
            if ab.executor.kind == "local":
                run_local(ab, todo, on_done)
            else:
                run_submitit(ab, todo, on_done)
    finally:
        prog.close()
        index = ablate_report.write_ablation(ab, wall_s=time.perf_counter() - t0,
                                             failures={o.cell.name: o for o in failed})
    wall = time.perf_counter() - t0
    if failed:
        log(f"{len(failed)} cell(s) failed: " + ", ".join(o.cell.name for o in failed))
    log(f"ablation {ab.name}: {prog.done}/{len(ab.cells)} cells complete in {_fmt_dur(wall)}: {index}")
    return AblationResult(ab.root, len(ab.cells), [c.name for c in finished], done, failed, wall, index)
