#!/usr/bin/env python
"""This SegGPT against ``transformers.SegGptForImageSegmentation``: speed, memory, TFLOP/s.

    python benchmarks/bench_model.py                      # CPU: vit_tiny at depth 4, fp32
    python benchmarks/bench_model.py --device cuda --json # GPU: ViT-L, bf16 autocast
    python benchmarks/bench_model.py --attention          # the attention implementations alone

Same as ``seggpt bench``; the code lives in :mod:`seggpt_lib.cli.bench` (see its docstring for what
is measured and how). Run from a checkout without installing: the repository root is put on
``sys.path``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seggpt_lib.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
