"""The device and precision rules, in one place.

* device ``"auto"`` (or ``None``): CUDA when available, else the CPU;
* precision ``"auto"`` (or ``None``): bf16 autocast on CUDA, fp32 elsewhere;
* :func:`autocast`: the autocast context of a precision (none for fp32).
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "precision_dtype", "resolve_device", "resolve_device_name", "resolve_precision"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; anything else as given.

    With ``local_rank`` (distributed training) a bare ``cuda`` becomes ``cuda:<local_rank>``.
    """
    if name is None or str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if local_rank is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def resolve_device_name(name: str | torch.device | None = "auto") -> str:
    """:func:`resolve_device` as a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    return str(resolve_device(name))


def resolve_precision(name: str | None, device: str | torch.device, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """``"auto"``/``None`` -> ``"bf16"`` on CUDA, ``"fp32"`` elsewhere; else ``name``, checked
    against ``allowed`` (``ValueError`` otherwise)."""
    if name is None or name == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if name not in allowed:
        raise ValueError(f"precision must be one of {allowed} or auto, got {name!r}")
    return name


def precision_dtype(precision: str) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` -> the torch dtype."""
    return _DTYPES[precision]


def autocast(device: str | torch.device, precision: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the precision's dtype on ``device``; a null context for fp32."""
    if precision is None or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])
