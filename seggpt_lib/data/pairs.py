"""Prompt/query pairs for SegGPT: pair sampling, the pair dataset, batching.

Pipeline::

    index   = DefectIndex.scan(root)                    # compact, O(n) records, checked
    config  = PairConfig.for_model(model.cfg, train=True, seed=0, length=20_000)
    dataset = PairDataset(index, config)
    sampler = dataset.make_sampler(rank, world_size)    # disjoint per-rank pair streams
    loader  = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=4, pin_memory=True,
                         collate_fn=collate)
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: model(**model_inputs(batch))

Every sample is a pure function of ``(seed, epoch, sample index)``: the pair, the palette, the
patch mask and the augmentation are drawn from counter-based generators seeded by those three
numbers, so a sample is the same with any number of loader workers, any DDP world size and
after a resume (``start``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision import tv_tensors

from seggpt_lib.data.cache import ImageCache
from seggpt_lib.data.layout import DatasetError, DatasetWarning, DefectIndex
from seggpt_lib.data.transforms import AugmentConfig, build_augment
from seggpt_lib.utils.colors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    fixed_palette,
    label_to_color,
    normalize,
    random_palette,
)
from seggpt_lib.utils.masking import query_half_mask, random_patch_mask

__all__ = [
    "KINDS",
    "MODEL_KEYS",
    "NEGATIVE_TARGETS",
    "Pair",
    "PairConfig",
    "PairDataset",
    "PairSampler",
    "collate",
    "fixed_pairs",
    "model_inputs",
]

KINDS = ("positive", "negative", "free")
NEGATIVE_TARGETS = ("query_mask", "empty")
_KIND_POS, _KIND_NEG, _KIND_FREE = 0, 1, 2


# ==========================================================================================
# counter-based random numbers: a sample's draws depend on (seed, epoch, sample) only
# ==========================================================================================
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 arrays (wrap-around arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keys(seed: int, epoch: int, samples: np.ndarray) -> np.ndarray:
    base = _mix(np.array([(int(seed) & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))
    base = _mix(base ^ np.uint64(int(epoch) & 0xFFFFFFFFFFFFFFFF))
    return _mix(base ^ np.asarray(samples, dtype=np.uint64))


def _uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per key, independent across ``stream`` numbers."""
    with np.errstate(over="ignore"):
        x = _mix(keys + _GOLDEN * np.uint64(stream + 1))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _sample_seed(seed: int, epoch: int, sample: int, stream: int) -> int:
    """A 63-bit seed for torch generators of one sample."""
    key = _keys(seed, epoch, np.array([sample], dtype=np.uint64))
    with np.errstate(over="ignore"):
        return int(_mix(key + _GOLDEN * np.uint64(1000 + stream))[0] & np.uint64(0x7FFFFFFFFFFFFFFF))


def _pick(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """``floor(u * n)`` as int64, never reaching ``n``."""
    n = np.asarray(n, dtype=np.int64)
    return np.minimum((u * n).astype(np.int64), np.maximum(n - 1, 0))


# ==========================================================================================
# pair sampling
# ==========================================================================================
class Pair(NamedTuple):
    """One training/evaluation pair: positions into the index, and what kind it is.

    ``kind``: ``"positive"`` (the query holds the prompt's class), ``"negative"`` (the query
    holds other defect classes only), ``"free"`` (a defect-free query with a defect prompt; its
    target is empty). ``is_negative`` is ``kind == "negative"``. ``sample``/``epoch`` seed the
    sample's palette, patch mask and augmentation. ``cls``: the class id the prompt shows (an
    image with class-index masks may hold several); -1: the prompt image's own class.
    """

    prompt: int
    query: int
    is_negative: bool
    kind: str = "positive"
    sample: int = 0
    epoch: int = 0
    cls: int = -1


class PairSampler(Sampler):
    """An endless-looking but fixed stream of :class:`Pair` drawn on the fly, O(n) memory.

    Global sample ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: a kind drawn
    with shares ``negative_share`` (different defect classes), ``free_share`` (defect-free
    query, defect prompt) and the rest positives (same defect class, prompt != query);
    positives and negatives swap prompt and query with probability ``swap_prob``. Queries
    are uniform over images (``class_balanced=False``) or over classes, then images.

    Draws run over the index's *memberships* (image, class): one per defect image in binary
    sets, one per class an image holds with class-index masks. A negative's query never holds
    the prompt's class: such a draw is redrawn (up to 8 times, from further streams of the same
    sample key) and, in the rare case it still does, becomes the positive it is.

    DDP: rank ``r`` of ``world_size`` takes global samples ``start + r, start + r + world_size,
    ...`` so ranks draw disjoint streams whose union is the single-process stream. With
    ``drop_last`` every rank gets ``(length - start) // world_size`` samples (equal counts,
    which DDP needs); otherwise each rank takes all of its strided samples. ``start`` (a
    global sample count, e.g. ``step * batch * world_size``) resumes mid-epoch;
    ``set_epoch(e)`` moves to epoch ``e`` and resets ``start`` to 0 unless given.
    ``fixed=True`` ignores ``set_epoch`` (validation).

    Only the pools (a few int arrays over the index) are stored: no per-pair list.
    """

    def __init__(
        self,
        index: DefectIndex,
        length: int | None = None,
        seed: int = 0,
        negative_share: float = 0.25,
        free_share: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        epoch: int = 0,
        swap_prob: float = 0.5,
        class_balanced: bool = False,
        drop_last: bool = True,
        fixed: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not (0.0 <= negative_share <= 1.0 and 0.0 <= free_share <= 1.0 and negative_share + free_share <= 1.0):
            raise ValueError(f"negative_share ({negative_share}) and free_share ({free_share}) must be shares summing to <= 1")
        self.index = index
        self.length = int(len(index) if length is None else length)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start = int(start)
        self.epoch = int(epoch)
        self.swap_prob = float(swap_prob)
        self.class_balanced = bool(class_balanced)
        self.drop_last = bool(drop_last)
        self.fixed = bool(fixed)
        self.requested = (float(negative_share), float(free_share))
        self._build_pools(index)
        neg, free = self.requested
        if neg > 0 and self.n_neg_classes < 2:
            warnings.warn(f"negative_share={neg} but the index has {self.n_neg_classes} defect class(es): "
                          "no negative pairs are drawn", DatasetWarning, stacklevel=2)
            neg = 0.0
        if free > 0 and (len(self.free_idx) == 0 or len(self.def_idx) == 0):
            warnings.warn(f"free_share={free} but the index has no defect-free images (or no defect prompts): "
                          "no free pairs are drawn", DatasetWarning, stacklevel=2)
            free = 0.0
        self.negative_share, self.free_share = neg, free
        if neg + free < 1.0 and len(self.pos_pool) == 0:
            raise DatasetError(f"{index.root or 'index'}: no defect class has two images with defects, "
                               "so no positive pair can be drawn")

    def _build_pools(self, index: DefectIndex) -> None:
        self.def_idx = np.asarray(index.member_img, dtype=np.int64)  # memberships' images, sorted by class
        self.def_cls = np.asarray(index.member_cls, dtype=np.int64)  # their class ids
        n_cls = len(index.class_names)
        self.n_cls = n_cls
        # several classes in one image (class-index masks): a negative's query may hold the prompt's class
        self.multi = len(self.def_idx) > len(np.unique(self.def_idx))
        self.member_keys = np.sort(self.def_idx * max(n_cls, 1) + self.def_cls)
        counts = np.bincount(self.def_cls, minlength=n_cls).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.cls_count, self.cls_start = counts, starts
        self.neg_classes = np.flatnonzero(counts >= 1)
        self.n_neg_classes = len(self.neg_classes)
        self.pos_classes = np.flatnonzero(counts >= 2)
        pos_mask = counts[self.def_cls] >= 2
        self.pos_pool = np.flatnonzero(pos_mask).astype(np.int64)  # positions into def_idx
        self.free_idx = np.flatnonzero(index.is_free).astype(np.int64)

    # -- stream -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not self.fixed:
            self.epoch = int(epoch)
        self.start = int(start)

    def __len__(self) -> int:
        remaining = max(0, self.length - self.start)
        if self.drop_last:
            return remaining // self.world_size
        return len(range(self.start + self.rank, self.length, self.world_size))

    def sample_ids(self) -> range:
        """The global sample numbers this rank draws, in order (a lazy ``range``)."""
        first = self.start + self.rank
        return range(first, first + self.world_size * len(self), self.world_size)

    def __iter__(self) -> Iterator[Pair]:
        ids = self.sample_ids()
        for lo in range(0, len(ids), 1024):
            block = ids[lo : lo + 1024]
            yield from self.draw_many(np.arange(block.start, block.stop, block.step, dtype=np.int64))

    def draw(self, sample: int, epoch: int | None = None) -> Pair:
        """Global sample ``sample`` of ``epoch`` (default: the current one)."""
        return self.draw_many(np.array([sample], dtype=np.int64), epoch)[0]

    def draw_many(self, samples: np.ndarray, epoch: int | None = None) -> list[Pair]:
        epoch = self.epoch if epoch is None else int(epoch)
        prompt, query, kind, cls = self.draw_classes(samples, epoch)
        return [Pair(int(p), int(q), bool(k == _KIND_NEG), KINDS[k], int(s), epoch, int(c))
                for p, q, k, s, c in zip(prompt.tolist(), query.tolist(), kind.tolist(), np.asarray(samples).tolist(),
                                         cls.tolist())]

    def draw_arrays(self, samples: np.ndarray, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised draw: ``(prompt, query, kind)`` int64 arrays for global ``samples``."""
        return self.draw_classes(samples, epoch)[:3]

    def holds(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Whether each image holds the class beside it (vectorised membership test)."""
        keys = np.asarray(images, dtype=np.int64) * max(self.n_cls, 1) + np.asarray(classes, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.member_keys, keys), max(len(self.member_keys) - 1, 0))
        return (self.member_keys[pos] == keys) if len(self.member_keys) else np.zeros(len(keys), dtype=bool)

    def _negatives(self, u_q, u_p, u_c1, u_c2, swap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Negative draws from uniforms: ``(prompt, query, prompt class)``, swapped where ``swap``."""
        n_def = len(self.def_idx)
        if self.class_balanced:
            c = self.neg_classes[_pick(u_c1, self.n_neg_classes)]
            qpos = self.cls_start[c] + _pick(u_q, self.cls_count[c])
            k = _pick(u_c2, self.n_neg_classes - 1)
            rank_c = np.searchsorted(self.neg_classes, c)
            pc = self.neg_classes[k + (k >= rank_c)]
            ppos = self.cls_start[pc] + _pick(u_p, self.cls_count[pc])
        else:
            qpos = _pick(u_q, n_def)
            c = self.def_cls[qpos]
            j = _pick(u_p, n_def - self.cls_count[c])
            ppos = j + np.where(j >= self.cls_start[c], self.cls_count[c], 0)  # skip the query's class
        prompt, query, pcls = self.def_idx[ppos], self.def_idx[qpos], self.def_cls[ppos]
        return (np.where(swap, query, prompt), np.where(swap, prompt, query),
                np.where(swap, self.def_cls[qpos], pcls))

    def draw_classes(self, samples: np.ndarray, epoch: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised draw: ``(prompt, query, kind, prompt class id)`` int64 arrays for global ``samples``."""
        epoch = self.epoch if epoch is None else int(epoch)
        samples = np.asarray(samples, dtype=np.int64)
        keys = _keys(self.seed, epoch, samples)
        u_kind, u_q, u_p, u_swap, u_c1, u_c2 = (_uniform(keys, s) for s in range(6))
        n = len(samples)
        kind = np.full(n, _KIND_POS, dtype=np.int64)
        kind[u_kind < self.negative_share + self.free_share] = _KIND_NEG
        kind[u_kind < self.free_share] = _KIND_FREE
        prompt = np.zeros(n, dtype=np.int64)
        query = np.zeros(n, dtype=np.int64)
        pcls = np.full(n, -1, dtype=np.int64)
        n_def = len(self.def_idx)
        swap = (kind != _KIND_FREE) & (u_swap < self.swap_prob)

        m = kind == _KIND_POS
        if m.any():
            if self.class_balanced:
                c = self.pos_classes[_pick(u_c1[m], len(self.pos_classes))]
                qpos = self.cls_start[c] + _pick(u_q[m], self.cls_count[c])
            else:
                qpos = self.pos_pool[_pick(u_q[m], len(self.pos_pool))]
                c = self.def_cls[qpos]
            j = _pick(u_p[m], self.cls_count[c] - 1)
            j = j + (j >= qpos - self.cls_start[c])  # skip the query itself
            q, p = self.def_idx[qpos], self.def_idx[self.cls_start[c] + j]
            sw = swap[m]
            query[m], prompt[m], pcls[m] = np.where(sw, p, q), np.where(sw, q, p), c

        m = kind == _KIND_NEG
        if m.any():
            at = np.flatnonzero(m)
            prompt[at], query[at], pcls[at] = self._negatives(u_q[at], u_p[at], u_c1[at], u_c2[at], swap[at])
            if self.multi:  # the query may hold the prompt's class too: redraw those
                for r in range(8):
                    bad = at[self.holds(query[at], pcls[at])]
                    if not len(bad):
                        break
                    u = [_uniform(keys[bad], 6 + 4 * r + t) for t in range(4)]
                    prompt[bad], query[bad], pcls[bad] = self._negatives(*u, swap[bad])
                kind[at[self.holds(query[at], pcls[at])]] = _KIND_POS  # still: it is a positive

        m = kind == _KIND_FREE
        if m.any():
            query[m] = self.free_idx[_pick(u_q[m], len(self.free_idx))]
            if self.class_balanced:
                c = self.neg_classes[_pick(u_c1[m], self.n_neg_classes)]
                ppos = self.cls_start[c] + _pick(u_p[m], self.cls_count[c])
            else:
                ppos = _pick(u_p[m], n_def)
            prompt[m] = self.def_idx[ppos]
            pcls[m] = self.def_cls[ppos]
        return prompt, query, kind, pcls

    def pairs(self) -> list[Pair]:
        """This rank's pairs as a list (for small, fixed sets such as validation)."""
        return list(iter(self))


def fixed_pairs(
    index: DefectIndex,
    n_pairs: int,
    seed: int = 0,
    negative_share: float = 0.25,
    free_share: float = 0.0,
    swap_prob: float = 0.0,
    class_balanced: bool = False,
) -> list[Pair]:
    """A fixed, seeded list of ``n_pairs`` validation/test pairs (epoch 0).

    The same pairs as ``PairDataset(index, PairConfig(..., train=False, length=n_pairs, seed=seed))`` with
    the same shares draws.
    """
    return PairSampler(index, n_pairs, seed, negative_share, free_share, swap_prob=swap_prob,
                       class_balanced=class_balanced, drop_last=False, fixed=True).pairs()


# ==========================================================================================
# the dataset
# ==========================================================================================
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run a block on one torch thread, then restore the caller's setting.

    A sample is many small tensor ops: torch's intra-op pool only adds overhead to them (and
    collapses on a busy machine: 10x slower measured on 2 shared cores). Loader workers run
    on one thread already; this covers ``num_workers=0``, where the trainer's thread count
    is put back afterwards.
    """
    n = torch.get_num_threads()
    if n <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def query_defect_weight(weight_query_defects: bool | float, fg_weight: float) -> float:
    """The loss weight of a query's defect pixels its target does not paint: 1 (``False``, the
    original recipe), ``fg_weight`` (``True``: a negative's defect weighs what a positive's does)
    or the number given."""
    if isinstance(weight_query_defects, bool):
        return float(fg_weight) if weight_query_defects else 1.0
    return float(weight_query_defects)


@dataclass
class PairConfig:
    """How a :class:`PairDataset` builds its samples: everything but the index, a prebuilt
    :class:`~seggpt_lib.data.cache.ImageCache` and an explicit list of pairs.

    * sizes: ``image_size`` ``(H, W)`` of one image and ``patch_size`` (required;
      :meth:`for_model` takes both from a ``SegGPTConfig``);
    * the stream: ``train`` (random pairs per epoch, augmentation, random patch masks) or
      evaluation (fixed pairs, no augmentation, the query half masked), ``length`` (samples
      per epoch; default the index size), ``seed``, ``negative_share``, ``free_share``,
      ``swap_prob`` (default 0.5 in training, 0 in evaluation), ``class_balanced``;
    * the targets: ``n_classes``, ``negative_target`` (``query_mask`` or ``empty``),
      ``defect_color`` (a fixed RGB for binary sets instead of a random palette),
      ``fg_weight``, ``weight_query_defects``, ``mask_ratio``, ``query_mask_share``;
    * the images: ``mean``/``std`` normalisation, ``augment``
      (:class:`~seggpt_lib.data.transforms.AugmentConfig`; default on in training, always off
      in evaluation);
    * the cache built when none is given: ``cache_mode``, ``cache_dir``, ``workers``.
    """

    image_size: tuple[int, int] | None = None
    patch_size: int | None = None
    train: bool = True
    length: int | None = None
    seed: int = 0
    negative_share: float = 0.25
    free_share: float = 0.0
    swap_prob: float | None = None
    class_balanced: bool = False
    n_classes: int = 2
    negative_target: str = "query_mask"
    defect_color: Sequence[int] | None = None
    fg_weight: float = 1.0
    # fg_weight also on the query's own defect pixels where the target does not paint them (a
    # negative pair with negative_target "empty", another class in a positive's query): a defect
    # the prompt does not ask for weighs as much as one it asks for, so ignoring the prompt stops
    # paying. False: only the target's defect pixels (the original recipe)
    # True: fg_weight; a number: that weight (between the two: painting every defect and painting
    # nothing cost about the same while the model cannot yet tell the prompt's class from others)
    weight_query_defects: bool | float = False
    mask_ratio: float = 0.75
    query_mask_share: float = 0.0
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    augment: Any = None  # AugmentConfig | None
    cache_mode: str = "memory"
    cache_dir: str | os.PathLike | None = None
    workers: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PairConfig":
        """A config from keyword values; an unknown key raises ``ValueError`` listing the valid ones."""
        known = [f.name for f in fields(cls)]
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown PairConfig keys {sorted(unknown)}; valid keys: {known}")
        return cls(**d)

    @classmethod
    def for_model(cls, model_cfg: Any, **values: Any) -> "PairConfig":
        """A config whose ``image_size``/``patch_size`` default to ``model_cfg``'s (e.g. a
        ``SegGPTConfig``); ``values`` as in :meth:`from_dict`."""
        values.setdefault("image_size", getattr(model_cfg, "image_size", None))
        values.setdefault("patch_size", getattr(model_cfg, "patch_size", None))
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PairDataset(Dataset):
    """Stacked prompt/query samples for SegGPT.

    Items are dicts:

    * ``imgs`` ``(3, 2H, W)`` float: prompt on top, query below, normalised with ``mean``/``std``
    * ``tgts`` ``(3, 2H, W)`` float: the coloured label pair, normalised the same way
    * ``bool_masked_pos`` ``(L,)`` bool: ``random_patch_mask(mask_ratio)`` in training (the
      query half for a ``query_mask_share`` of the samples), the query half in evaluation
    * ``valid`` ``(3, 2H, W)`` float: 1, ``fg_weight`` on the defect pixels of the pair (the
      painted labels; with ``weight_query_defects`` also every defect pixel of the query itself,
      painted or not: a negative's query defect weighs what a positive's does), 0 on "ignore"
      pixels (``labels_ignore/``: crowd regions)
    * ``seg_type`` long 0; ``labels`` ``(2H, W)`` uint8: the painted class indices (0/1 for
      binary sets); ``query_label`` ``(H, W)`` uint8: the query's own label (ground truth)
    * ``palette`` ``(n_classes, 3)`` uint8 (row 0 black); ``prompt_class``, ``query_class``,
      ``prompt_file``, ``query_file`` (str), ``is_negative`` (bool), ``kind`` (str),
      ``sample``/``epoch`` (int)

    The query half of the target: its own label for positives; for negatives its own label
    (``negative_target="query_mask"``, the original) or nothing (``"empty"``, class-aware);
    nothing for free queries. With class-index masks (binary painting) the prompt half shows
    the pair's class only (``Pair.cls``) and a positive's query half, and its ``query_label``,
    are the query's pixels of that class and nothing else: an image holding a crack and a
    scratch prompted with a crack must paint the crack only. ``config`` (:class:`PairConfig`) says how samples are built;
    ``cache`` reuses an :class:`~seggpt_lib.data.cache.ImageCache` of ``index`` (one is built
    otherwise). Index the dataset with the :class:`Pair` objects of
    :meth:`make_sampler` (what a DataLoader does with ``sampler=``), or with an int: global
    sample ``i`` of the current epoch (``set_epoch``). ``pairs`` fixes an explicit list
    (e.g. from a mapping JSON, see :meth:`pairs_from_mapping`); then ints index that list.
    """

    def __init__(
        self,
        index: DefectIndex,
        config: PairConfig,
        cache: ImageCache | None = None,
        pairs: Sequence[Pair] | None = None,
    ) -> None:

        if not isinstance(config, PairConfig):
            raise TypeError(f"config must be a PairConfig (PairConfig.for_model(model_cfg, ...) for a model's sizes), "
                            f"got {type(config).__name__}")
        c = self.config = config
        if c.image_size is None or c.patch_size is None:
            raise ValueError("the PairConfig needs image_size and patch_size "
                             "(PairConfig.for_model(model_cfg, ...) takes them from a SegGPTConfig)")
        self.image_size = (int(c.image_size[0]), int(c.image_size[1]))
        self.patch_size = int(c.patch_size)
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        self.grid = (2 * h // self.patch_size, w // self.patch_size)
        if c.negative_target not in NEGATIVE_TARGETS:
            raise ValueError(f"negative_target must be one of {NEGATIVE_TARGETS}, got {c.negative_target!r}")
        if c.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {c.n_classes}")
        if c.n_classes > 2 and len(index) and int(index.label_max.max()) >= c.n_classes:
            worst = int(np.argmax(index.label_max))
            raise DatasetError(f"{index.label_path(worst)}: label value {int(index.label_max[worst])} "
                               f"but n_classes={c.n_classes} (values must lie in 0..{c.n_classes - 1})")
        if not 0.0 <= c.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1], got {c.mask_ratio}")
        self.index = index
        self.train = bool(c.train)
        self.mask_ratio = float(c.mask_ratio)
        if not 0.0 <= c.query_mask_share <= 1.0:
            raise ValueError(f"query_mask_share must lie in [0, 1], got {c.query_mask_share}")
        self.query_mask_share = float(c.query_mask_share)
        if c.defect_color is not None and (c.n_classes != 2 or len(c.defect_color) != 3):
            raise ValueError(f"defect_color {c.defect_color} needs a binary set (n_classes 2) and an RGB triple")
        self.defect_color = tuple(int(v) for v in c.defect_color) if c.defect_color is not None else None
        self.negative_target = c.negative_target
        self.n_classes = int(c.n_classes)
        self.mean = tuple(float(v) for v in c.mean)
        self.std = tuple(float(v) for v in c.std)
        augment = c.augment
        if augment is None:
            augment = AugmentConfig() if self.train else AugmentConfig.off()
        if not self.train:
            augment = AugmentConfig.off()
        self.augment = augment
        self.seed = int(c.seed)
        self.fg_weight = float(c.fg_weight)
        self.weight_query_defects = c.weight_query_defects
        self.epoch = 0
        self.pairs = list(pairs) if pairs is not None else None
        self.sampler_args = dict(
            length=len(index) if c.length is None else int(c.length), seed=self.seed,
            negative_share=c.negative_share, free_share=c.free_share,
            swap_prob=(0.5 if self.train else 0.0) if c.swap_prob is None else c.swap_prob,
            class_balanced=c.class_balanced,
        )
        self._sampler = None if self.pairs is not None else PairSampler(index, fixed=not self.train, **self.sampler_args)
        cache_size = augment.cache_size(self.image_size)
        if cache is None:
            cache = ImageCache(index, cache_size, mode=c.cache_mode, cache_dir=c.cache_dir, workers=c.workers)
        elif cache.index is not index and len(cache.index) != len(index):
            raise ValueError("the cache was built for another index")
        self.cache = cache
        self._transform = None  # built on first use (in each worker)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_transform"] = None  # rebuilt in the worker
        return state

    # -- pairs ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else self.sampler_args["length"]

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by int indexing (a sampler's pairs carry their own epoch)."""
        if self.train:
            self.epoch = int(epoch)

    def make_sampler(self, rank: int = 0, world_size: int = 1, start: int = 0, drop_last: bool | None = None) -> Sampler:
        """The DataLoader sampler for this dataset's stream (``Pair`` objects), one per rank."""
        if self.pairs is not None:
            ids = list(range(rank, len(self.pairs), world_size))
            return _ListSampler([self.pairs[i] for i in ids])
        return PairSampler(self.index, rank=rank, world_size=world_size, start=start, epoch=self.epoch,
                           drop_last=self.train if drop_last is None else drop_last, fixed=not self.train,
                           **self.sampler_args)

    def pair(self, i: int) -> Pair:
        if self.pairs is not None:
            return self.pairs[i]
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside 0..{len(self) - 1}")
        return self._sampler.draw(i, self.epoch if self.train else 0)

    @staticmethod
    def pairs_from_mapping(index: DefectIndex, mapping: dict[str, Sequence[str]], top_k: int | None = None) -> list[Pair]:
        """Pairs ``(prompt, query)`` from a ``{query_file: [prompt_file, ...]}`` mapping; the kind
        is ``positive`` for the same class, ``free`` for a defect-free query, else ``negative``."""
        out: list[Pair] = []
        for q_name in sorted(mapping):
            try:
                q = index.find(q_name)
            except KeyError:
                raise DatasetError(f"mapping query {q_name!r} is not in the index") from None
            prompts = list(mapping[q_name])[: top_k if top_k else None]
            for p_name in prompts:
                try:
                    p = index.find(p_name)
                except KeyError:
                    raise DatasetError(f"mapping prompt {p_name!r} (for {q_name!r}) is not in the index") from None
                if index.is_free[q]:
                    kind = "free"
                elif index.multiclass:  # the query holds the prompt's (main) class, maybe among others
                    kind = "positive" if index.class_of(p) in index.classes_in(q) else "negative"
                else:
                    kind = "positive" if index.class_ids[p] == index.class_ids[q] else "negative"
                out.append(Pair(p, q, kind == "negative", kind, len(out), 0, int(index.class_ids[p])))
        return out

    # -- items --------------------------------------------------------------------------------
    def _label(self, mask: torch.Tensor, value: int = 0) -> torch.Tensor:
        """A label as painted: binary sets 0/1 (``value`` > 0: only the pixels of that class
        index, the rest background), else the class indices (clamped to ``n_classes - 1``)."""
        if self.n_classes == 2:
            return (mask == value if value else mask != 0).to(torch.uint8)
        return mask.clamp_(max=self.n_classes - 1)

    def _view(self, i: int, aug_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One image, its label and its ignore mask (None: none) at the model size, augmented
        together with the view's own seed."""

        img_np, mask_np = self.cache.get(i)
        ig_np = self.cache.get_ignore(i) if hasattr(self.cache, "get_ignore") else None
        img = tv_tensors.Image(torch.from_numpy(np.array(img_np, dtype=np.uint8, copy=True)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.array(mask_np, dtype=np.uint8, copy=True))[None])
        ig = None if ig_np is None else tv_tensors.Mask(torch.from_numpy(np.array(ig_np, dtype=np.uint8, copy=True))[None])
        if img.shape[-2:] == self.image_size and not self.augment.enabled:
            return (img.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor)[0],
                    None if ig is None else ig.as_subclass(torch.Tensor)[0] != 0)
        if self._transform is None:

            self._transform = build_augment(self.augment, self.image_size)
        gen = torch.default_generator
        state = gen.get_state()
        try:  # v2 transforms draw from the global CPU generator: seed it for this view only
            gen.manual_seed(aug_seed)
            if ig is None:
                img, mask = self._transform(img, mask)
            else:
                img, mask, ig = self._transform(img, mask, ig)
        finally:
            gen.set_state(state)
        return (img.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor)[0].contiguous(),
                None if ig is None else ig.as_subclass(torch.Tensor)[0] != 0)

    def __getitem__(self, key: int | Pair) -> dict[str, Any]:
        with _one_thread():
            return self._item(key)

    def _item(self, key: int | Pair) -> dict[str, Any]:
        if isinstance(key, Pair):
            pair = key
        else:
            pair = self.pair(int(key))
        epoch = pair.epoch if self.train else 0
        s = pair.sample
        p_img, p_mask, p_ig = self._view(pair.prompt, _sample_seed(self.seed, epoch, s, 1))
        q_img, q_mask, q_ig = self._view(pair.query, _sample_seed(self.seed, epoch, s, 2))
        ci = self.index.class_ids
        cls = pair.cls if pair.cls >= 0 else int(ci[pair.prompt])
        value = int(self.index.class_values[cls])  # class-index masks: the prompt shows this class only
        p_lbl, q_lbl = self._label(p_mask, value), self._label(q_mask)
        if pair.kind == "positive":
            q_lbl = self._label(q_mask, value)  # the query's pixels of the prompt's class, nothing else
        if pair.kind == "free" or (pair.kind == "negative" and self.negative_target == "empty"):
            q_tgt = torch.zeros_like(q_lbl)
        else:
            q_tgt = q_lbl
        labels = torch.cat([p_lbl, q_tgt], dim=0)  # (2H, W)
        gen = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, s, 0))
        palette = random_palette(self.n_classes, generator=gen)  # drawn always: keeps the stream
        if self.defect_color is not None:
            palette = fixed_palette([[0, 0, 0], list(self.defect_color)])
        if self.train:
            if self.query_mask_share > 0 and torch.rand((), generator=gen).item() < self.query_mask_share:
                masked = query_half_mask(self.grid)[0]  # the inference task itself
            else:
                masked = random_patch_mask(self.grid, self.mask_ratio, 1, generator=gen)[0]
        else:
            masked = query_half_mask(self.grid)[0]
        imgs = normalize(torch.cat([p_img, q_img], dim=1), self.mean, self.std)
        tgts = normalize(label_to_color(labels, palette), self.mean, self.std)
        valid = torch.ones_like(tgts)
        w_query = query_defect_weight(self.weight_query_defects, self.fg_weight)
        if w_query != 1.0:  # the query's own defects, whether the target paints them or not
            valid[:, p_lbl.shape[0]:][:, q_mask != 0] = w_query
        if self.fg_weight != 1.0:
            valid[:, labels > 0] = self.fg_weight
        if p_ig is not None or q_ig is not None:  # ignore pixels (crowd regions) weigh nothing
            h = p_lbl.shape[0]
            if p_ig is not None:
                valid[:, :h][:, p_ig] = 0.0
            if q_ig is not None:
                valid[:, h:][:, q_ig] = 0.0
        return {
            "imgs": imgs,
            "tgts": tgts,
            "bool_masked_pos": masked,
            "valid": valid,
            "seg_type": torch.tensor(0, dtype=torch.long),
            "labels": labels,
            "query_label": q_lbl,
            "query_defects": (q_mask != 0).to(torch.uint8),  # every defect of the query, asked for or not
            "palette": palette,
            "prompt_class": self.index.class_names[cls],
            "query_class": self.index.class_names[ci[pair.query]],
            "prompt_file": self.index.files[pair.prompt],
            "query_file": self.index.files[pair.query],
            "is_negative": bool(pair.is_negative),
            "kind": pair.kind,
            "sample": int(s),
            "epoch": int(epoch),
        }


class _ListSampler(Sampler):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # fixed pairs: nothing changes
        pass


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: tensors are stacked, strings become lists, bools/ints tensors."""
    with _one_thread():
        return default_collate(batch)


MODEL_KEYS = ("imgs", "tgts", "bool_masked_pos", "valid", "seg_type")


def model_inputs(batch: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``SegGPT.forward`` from a batch, moved to ``device``."""
    out = {k: batch[k] for k in MODEL_KEYS}
    if device is not None:
        out = {k: v.to(device, non_blocking=non_blocking) for k, v in out.items()}
    return out


