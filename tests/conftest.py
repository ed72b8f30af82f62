"""Shared fixtures: tiny models and paths. No test downloads anything."""
from __future__ import annotations

import json
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


def smoke_results(base: Path) -> Path:
    """One tiny ``seggpt reproduce --smoke`` run per test session, in the session's base temp
    folder (shared by the notebook, pipeline and explorer tests)."""
    from seggpt_lib import cli

    d = base / "smoke_results"
    if not (d / "summary.json").is_file() or json.loads((d / "summary.json").read_text()).get("status") != "complete":
        rc = cli.main(["reproduce", "--smoke", "--set", f"results_dir={d}", "--set", "heartbeat_s=0"])
        assert rc == 0, "seggpt reproduce --smoke failed (see the output above)"
    return d


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    """The smoke pipeline's results folder (:func:`smoke_results`)."""
    return smoke_results(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A small synthetic dataset: 3 classes x 6 images, 64 px (the training tests' data)."""
    from data_prep.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "set"
    generate_synthetic(root, seed=0, per_class=6, size=64, classes=["pit", "scratch", "stain"], show_progress=False)
    return root
