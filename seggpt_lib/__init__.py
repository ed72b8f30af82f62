"""SegGPT for few-shot industrial defect segmentation: model, data, training, inference, metrics."""
from seggpt_lib.model.checkpoint import CheckpointError, build_from_checkpoint, load_weights, save_weights
from seggpt_lib.model.seggpt import PRESETS, SegGPT, SegGPTConfig, build_seggpt, preset_config

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "CheckpointError",
    "SegGPT",
    "SegGPTConfig",
    "build_from_checkpoint",
    "build_seggpt",
    "load_weights",
    "preset_config",
    "save_weights",
]
