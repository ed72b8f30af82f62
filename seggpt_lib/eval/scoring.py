"""Predict every query of a prompt mapping and score it: the one scoring path.

``seggpt infer``, the notebooks' evaluations (:mod:`seggpt_lib.experiments.evaluation`) and the
study (:mod:`seggpt_lib.experiments.study`) all run :func:`score_mapping`::

    queries = Folder.of_dataset("data/test")
    prompts = Folder.of_dataset("data/train")
    cfg = ScoringConfig(grid=2, top_k=1, work_size=1024, tile_pairing="aligned")
    results = [s.result for s in score_mapping(predictor, queries, mapping, "positive", cfg, prompts=prompts)]
    table, summary = evaluate(results)

A mapping is ``{query file: [prompt file, ...]}``. Queries are predicted in batches (several
queries per :meth:`~seggpt_lib.predict.predictor.SegGPTPredictor.predict_batch` call, their
pairs sharing the forward passes), from the first ``top_k`` mapped prompt images, or from
learned prompts (:class:`LearnedPrompts`). Each query gives a :class:`ScoredPair`: the
:class:`~seggpt_lib.eval.metrics.PairResult` row, the prediction and the query image.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from seggpt_lib.data.layout import IGNORE_DIR, class_lookup, class_of, image_dir, read_class_names
from seggpt_lib.eval.decision import Decision, OperatingPoint, decide
from seggpt_lib.eval.metrics import KINDS, PairResult
from seggpt_lib.predict.predictor import Prediction, PromptPairs, SegGPTPredictor, load_mask_file, load_rgb

__all__ = [
    "COLUMNS",
    "Folder",
    "LearnedPrompts",
    "ScoredPair",
    "ScoringConfig",
    "default_queries_per_call",
    "pair_kind",
    "score_mapping",
]

FREE = "free"
# per-pair columns score_mapping can add to PairResult.extra
COLUMNS = ("n_prompts", "n_pairs", "seconds")
_PROMPT_CACHE = 64  # prompt images (and masks) kept decoded while scoring one mapping


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _binary_mask(path: Path) -> np.ndarray:
    return load_mask_file(path) != 0


@dataclass(frozen=True)
class Folder:
    """Where a mapping's files lie: ``images/<file>``, masks ``labels/<stem>.png`` (else a file
    of the image's name; none: no mask), and each file's class (``classes``, default: the
    file-name rule of :func:`seggpt_lib.data.layout.class_of`). ``read_mask`` reads a mask file
    as a boolean ``(H, W)`` array (default: the stored values, non-zero = defect).

    ``values`` (class-index masks, :func:`~seggpt_lib.data.layout.read_class_names` inverted):
    ``mask(file, cls)`` is then the file's pixels of class ``cls`` when it holds that class,
    else all its defect pixels (what a negative pair is scored against). ``ignore``: the folder
    of "ignore" masks (``labels_ignore/<stem>.png``, non-zero = ignore: crowd regions), whose
    pixels count neither as defect nor as background in any IoU.
    """

    images: Path
    labels: Path | None = None
    classes: Callable[[str], str] | None = None
    read_mask: Callable[[Path], np.ndarray] = _binary_mask
    values: Mapping[str, int] | None = None
    ignore: Path | None = None

    @classmethod
    def of_dataset(cls, root: str | Path, classes: Callable[[str], str] | None = None, **kw: Any) -> "Folder":
        """A dataset root: ``root/images`` (or ``root``), ``root/labels``; classes from its
        ``classes.csv`` or the file names unless given (:func:`seggpt_lib.data.layout.class_lookup`);
        its ``labels.txt`` (class-index masks) and ``labels_ignore/`` when present."""
        root = Path(root)
        names = read_class_names(root)
        kw.setdefault("values", None if names is None else {n: v for v, n in names.items()})
        kw.setdefault("ignore", root / IGNORE_DIR if (root / IGNORE_DIR).is_dir() else None)
        return cls(image_dir(root), root / "labels", classes or class_lookup(root), **kw)

    @classmethod
    def of_index(cls, index: Any, **kw: Any) -> "Folder":
        """A scanned dataset (:class:`~seggpt_lib.data.layout.DefectIndex`: its folders, its classes,
        its class-index values and ignore masks)."""
        if index.multiclass:
            kw.setdefault("values", {c: int(v) for c, v in zip(index.class_names, index.class_values) if v})
        ig = Path(index.label_dir).parent / IGNORE_DIR
        kw.setdefault("ignore", ig if ig.is_dir() else None)
        return cls(Path(index.image_dir), Path(index.label_dir), lambda f: index.class_of(index.find(f)), **kw)

    def image_path(self, file: str) -> Path:
        return self.images / file

    def label_path(self, file: str) -> Path | None:
        """``<stem>.png`` in the label folder, else a file of the same name; None when neither exists."""
        if self.labels is None:
            return None
        for cand in (self.labels / f"{Path(file).stem}.png", self.labels / file):
            if cand.is_file():
                return cand
        return None

    def class_of(self, file: str) -> str:
        return self.classes(file) if self.classes is not None else class_of(file, {})

    def mask(self, file: str, cls: str | None = None) -> np.ndarray | None:
        """The file's mask as bool ``(H, W)`` (None: it has none); with class-index ``values``
        and ``cls``, its pixels of that class when it holds it, else all its defect pixels."""
        path = self.label_path(file)
        if path is None:
            return None
        if self.values is None or cls is None or cls not in self.values:
            return self.read_mask(path)
        label = load_mask_file(path)
        own = label == self.values[cls]
        return own if own.any() else label != 0

    def classes_held(self, file: str) -> list[str]:
        """With class-index ``values``: the classes whose values the file's mask holds (else
        its class, or nothing for a defect-free mask)."""
        path = self.label_path(file)
        if path is None:
            return []
        if self.values is None:
            m = self.read_mask(path)
            return [self.class_of(file)] if m.any() else []
        present = set(np.unique(load_mask_file(path)).tolist())
        return sorted(c for c, v in self.values.items() if v in present)

    def ignore_mask(self, file: str) -> np.ndarray | None:
        """The file's "ignore" pixels as bool ``(H, W)``, or None when it has no ignore mask."""
        if self.ignore is None:
            return None
        path = self.ignore / f"{Path(file).stem}.png"
        return load_mask_file(path) != 0 if path.is_file() else None


@dataclass(frozen=True)
class LearnedPrompts:
    """Learned prompts (prompt pairs at model size) by class, in place of image prompts.

    A single one serves every query. With several, a positive query takes its own class's and a
    negative or defect-free query the class of its first mapped prompt (so it asks for the same
    other class as an image prompt would). ``names``: class -> the name in the ``prompts``
    column (default ``learned:<class>``).
    """

    by_class: Mapping[str, PromptPairs]
    names: Mapping[str, str] = field(default_factory=dict)

    def pick(self, kind: str, query_class: str, first_prompt_class: Callable[[], str]) -> str:
        if len(self.by_class) == 1:
            return next(iter(self.by_class))
        if kind == "auto":
            raise ValueError("kind 'auto' needs a single learned prompt (the pair kind depends on the prompt's class)")
        return query_class if kind == "positive" else first_prompt_class()

    def name(self, cls: str) -> str:
        return self.names.get(cls, f"learned:{cls}")


def pair_kind(kind: str, query_class: str, prompt_classes: Sequence[str], gt: np.ndarray | None) -> str:
    """The pair kind of one entry: ``kind`` itself unless ``"auto"``, which gives ``free`` for a
    query of class ``free`` or with an empty ground truth, ``negative`` when the query's class
    differs from every prompt's, else ``positive``."""
    if kind != "auto":
        return kind
    if query_class == FREE or (gt is not None and not gt.any()):
        return "free"
    if all(c != query_class for c in prompt_classes):
        return "negative"
    return "positive"


# ------------------------------------------------------------------------------------------
# options and results
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoringConfig:
    """How queries are predicted and what each row carries.

    ``grid``: ``grid x grid`` tiles of the ``work_size`` canvas (1: no tiling); ``top_k``: the
    first ``top_k`` mapped prompts (None: all); ``tile_pairing``, ``seam_pass``, ``ensemble``:
    see :mod:`seggpt_lib.predict.predictor`; ``keep_raw``: keep the raw output in the
    predictions; ``queries_per_call``: queries per ``predict_batch`` call (None:
    :func:`default_queries_per_call`). Each row's ``extra`` holds ``extra`` (fixed columns, in
    order) then ``columns`` (per pair, from :data:`COLUMNS`: prompts used, model pairs,
    seconds per query).
    """

    grid: int = 1
    top_k: int | None = None
    work_size: int = 1024
    tile_pairing: str = "all"
    seam_pass: bool = False
    ensemble: bool = True
    keep_raw: bool = False
    queries_per_call: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    columns: tuple[str, ...] = ("seconds",)
    # the line's decision (seggpt_lib.eval.decision): each pair also gets a calibrated row
    # (ScoredPair.calibrated) decided with the config of its first prompt's class
    operating_point: OperatingPoint | None = None
    consistency: bool = False  # measure the prompt consistency (Prediction.consistency)

    def __post_init__(self) -> None:
        unknown = [c for c in self.columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; choose from {COLUMNS}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class ScoredPair:
    """One query of the mapping: its row, its prediction and the query image."""

    result: PairResult
    prediction: Prediction
    image: np.ndarray
    prompt_class: str | None = None  # class of the first prompt (learned: its class)
    decision: Decision | None = None  # with an operating point
    calibrated: PairResult | None = None  # the row of the decision's mask (raw row unchanged)


def default_queries_per_call(predictor: SegGPTPredictor, n_prompts: int, config: ScoringConfig) -> int:
    """As many queries as fit one forward pass (``max_batch`` pairs), 1 to 16."""
    per_query = predictor.pairs_per_query(n_prompts, config.grid, config.tile_pairing, config.seam_pass)
    return max(1, min(16, predictor.max_batch // max(1, per_query)))


class _Progress:
    """A tqdm bar (``True``), a callback ``(done, total)``, or nothing."""

    def __init__(self, progress: bool | Callable[[int, int], None], total: int, desc: str) -> None:
        self.total, self.done = total, 0
        self.callback = progress if callable(progress) else None
        self.bar = tqdm(total=total, desc=desc, unit="img") if progress is True else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------
# the scoring loop
# ------------------------------------------------------------------------------------------
def score_mapping(
    predictor: SegGPTPredictor,
    queries: Folder,
    mapping: Mapping[str, Sequence[str]],
    kind: str,
    config: ScoringConfig | None = None,
    *,
    prompts: Folder | None = None,
    learned: LearnedPrompts | None = None,
    progress: bool | Callable[[int, int], None] = False,
    desc: str = "score",
) -> Iterator[ScoredPair]:
    """Predict every query of ``mapping`` (in its order) and yield a :class:`ScoredPair` each.

    Prompts are the first ``config.top_k`` mapped files in ``prompts``, or ``learned`` (then
    the mapping's prompt lists matter only for the class of a negative query's learned prompt).
    ``kind``: the pair kind of every row (``positive``, ``negative``, ``free``) or ``"auto"``
    (:func:`pair_kind`). ``progress``: a tqdm bar (``True``) or a callback ``(done, total)``.
    Ground truths come from ``queries``' masks (a query without one is kept, unscored).
    """
    cfg = config or ScoringConfig()
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    if learned is None and prompts is None:
        raise ValueError("give the prompt folder, or learned prompts")
    names = list(mapping)
    if learned is not None:
        n_prompts = 1
    else:
        n_prompts = cfg.top_k or max((len(ps) for ps in mapping.values()), default=1)
    per_call = cfg.queries_per_call or default_queries_per_call(predictor, n_prompts, cfg)
    kw = dict(grid=cfg.grid, ensemble=cfg.ensemble, tile_pairing=cfg.tile_pairing, seam_pass=cfg.seam_pass,
              work_size=cfg.work_size, keep_raw=cfg.keep_raw)
    op = cfg.operating_point
    if cfg.consistency or (op is not None and op.needs_consistency):
        kw["consistency"] = True
    cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def prompt(f: str) -> tuple[np.ndarray, np.ndarray]:
        if f in cache:
            cache.move_to_end(f)
        else:
            mask = prompts.mask(f, prompts.class_of(f))  # class-index masks: the prompt shows its class only
            if mask is None:
                raise FileNotFoundError(f"no mask for prompt {f} in {prompts.labels}")
            cache[f] = (load_rgb(prompts.image_path(f)), mask)
            if len(cache) > _PROMPT_CACHE:
                cache.popitem(last=False)
        return cache[f]

    bar = _Progress(progress, len(names), desc)
    try:
        for start in range(0, len(names), per_call):
            chunk = names[start : start + per_call]
            images = [load_rgb(queries.image_path(q)) for q in chunk]
            q_classes = [queries.class_of(q) for q in chunk]
            if learned is not None:
                keys = [learned.pick(kind, qc, lambda q=q: prompts.class_of(mapping[q][0]))
                        for q, qc in zip(chunk, q_classes)]
                used = [[learned.name(k)] for k in keys]
                p_classes = [[k] for k in keys]
                first_classes = keys
                preds = predictor.predict_batch(images, prompt_pairs=[learned.by_class[k] for k in keys], **kw)
            else:
                used = [list(mapping[q][: cfg.top_k]) for q in chunk]
                pairs = [[prompt(f) for f in fs] for fs in used]
                p_classes = [[prompts.class_of(f) for f in fs] for fs in used] if kind == "auto" else [[]] * len(chunk)
                first_classes = [prompts.class_of(fs[0]) if fs else None for fs in used]
                preds = predictor.predict_batch(images, [[a for a, _ in pp] for pp in pairs],
                                                [[m for _, m in pp] for pp in pairs], **kw)
            for q, image, qc, ps, pcs, pred, pc in zip(chunk, images, q_classes, used, p_classes, preds, first_classes):
                gt = queries.mask(q, pc)
                if kind == "auto" and queries.values is not None:  # class-index masks: what the query holds
                    held = queries.classes_held(q)
                    pair = ("free" if not held or (gt is not None and not gt.any())
                            else "positive" if any(c in held for c in pcs) else "negative")
                else:
                    pair = pair_kind(kind, qc, pcs, gt)
                ignore = queries.ignore_mask(q)

                def scored_mask(m: np.ndarray | None) -> np.ndarray | None:  # ignore pixels count nowhere
                    return m if m is None or ignore is None else np.where(ignore, False, m)

                extra = dict(cfg.extra)
                for c in cfg.columns:
                    extra[c] = {"n_prompts": len(ps), "n_pairs": pred.n_pairs, "seconds": pred.timing["total_s"]}[c]
                gt = scored_mask(gt)
                result = PairResult(query=q, prompts=ps, kind=pair, query_class=qc,
                                    pred=scored_mask(pred.mask), gt=gt, extra=extra)
                scored = ScoredPair(result, pred, image, prompt_class=pc)
                if op is not None:
                    scored.decision = decide(pred.score, op.config_for(pc), pred.consistency)
                    scored.calibrated = PairResult(query=q, prompts=ps, kind=result.kind, query_class=qc,
                                                   pred=scored_mask(scored.decision.mask), gt=gt, extra=dict(extra))
                yield scored
            bar.update(len(chunk))
    finally:
        bar.close()
