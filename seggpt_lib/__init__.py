"""SegGPT for few-shot industrial defect segmentation: model, data, training, inference, metrics."""
__version__ = "0.1.0"
