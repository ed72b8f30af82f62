"""Training and evaluation data.

* :mod:`~seggpt_lib.data.layout`: the dataset layout (extensions, ``classes.csv``, class
  names, image/label readers, resizing, :class:`DefectIndex`, :func:`read_manifest`);
* :mod:`~seggpt_lib.data.cache`: :class:`ImageCache`;
* :mod:`~seggpt_lib.data.transforms`: :class:`AugmentConfig`, :func:`build_augment`;
* :mod:`~seggpt_lib.data.pairs`: :class:`PairSampler`, :class:`PairConfig`,
  :class:`PairDataset`, :func:`collate`, :func:`model_inputs`;
* :mod:`~seggpt_lib.data.stats`: :func:`compute_stats`.

The public names of these modules are re-exported here (``from seggpt_lib import data as D;
D.PairDataset``).
"""
from seggpt_lib.data.cache import ImageCache
from seggpt_lib.data.layout import (
    CLASS_INDEX_JSON,
    CLASSES_CSV,
    DATA_SOURCES,
    FREE_CLASS,
    IMAGE_EXTS,
    LABEL_NAMES,
    SPLITS,
    DatasetError,
    DatasetWarning,
    DefectIndex,
    Record,
    class_from_filename,
    class_lookup,
    class_of,
    decoded_size,
    header_size,
    image_dir,
    images_by_stem,
    is_dataset_root,
    is_split_root,
    open_image,
    read_class_names,
    read_classes_csv,
    read_label,
    read_manifest,
    read_rgb,
    resize_image,
    resize_pair,
)
from seggpt_lib.data.pairs import (
    KINDS,
    MODEL_KEYS,
    NEGATIVE_TARGETS,
    Pair,
    PairConfig,
    PairDataset,
    PairSampler,
    collate,
    fixed_pairs,
    model_inputs,
)
from seggpt_lib.data.stats import compute_stats
from seggpt_lib.data.transforms import AugmentConfig, ChannelGain, RandomResizedCrop, Resize, build_augment

__all__ = [
    "AugmentConfig", "CLASS_INDEX_JSON", "CLASSES_CSV", "LABEL_NAMES", "read_class_names", "DATA_SOURCES", "SPLITS", "is_dataset_root", "is_split_root", "ChannelGain", "DatasetError", "DatasetWarning", "DefectIndex", "FREE_CLASS",
    "IMAGE_EXTS", "ImageCache", "KINDS", "MODEL_KEYS", "NEGATIVE_TARGETS", "Pair", "PairConfig", "PairDataset",
    "PairSampler", "RandomResizedCrop", "Record", "Resize", "build_augment", "class_from_filename", "class_lookup",
    "class_of", "collate", "compute_stats", "decoded_size", "fixed_pairs", "header_size", "image_dir",
    "images_by_stem", "model_inputs", "open_image", "read_classes_csv", "read_label", "read_manifest", "read_rgb",
    "resize_image", "resize_pair",
]
