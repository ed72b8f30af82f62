"""Shared fixtures: tiny models and paths. No test downloads anything."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dataset(name: str) -> Path | None:
    """A dataset under ``../shared/datasets`` (or ``$SEGGPT_SHARED_DATASETS``), else None."""
    base = Path(os.environ.get("SEGGPT_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
    p = base / name
    return p if p.is_dir() else None


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
