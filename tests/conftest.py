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


@pytest.fixture
def needs_compiler() -> None:
    """Skip where torch.compile cannot build CPU kernels (inductor needs a C++ compiler)."""
    import shutil

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
