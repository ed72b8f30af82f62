"""Prompt mappings: which prompt images SegGPT sees for each query image.

A mapping is the original project's JSON format::

    {"query_file_name": ["prompt_file_name", ...], ...}

Kinds built by :func:`build_mapping` (and ``seggpt make-mapping``):

* ``positive``  – each defect query gets ``k`` prompts of its own class (never itself);
* ``negative``  – each defect query gets ``k`` prompts of *other* defect classes;
* ``free``      – each defect-free query (class ``free``) gets ``k`` prompts of
  random defect classes;
* ``retrieval`` – each query gets the ``k`` defect prompts whose cheap embedding
  (normalised 32x32 grayscale thumbnail, cosine similarity) is closest to the
  query's; ``same_class`` restricts the candidates to the query's class (and then
  skips defect-free queries).

Sampling is seeded per query (from ``seed`` and the query's file name), so the
same seed always gives the same JSON, and adding a query does not change the
prompts drawn for the others. Keys are sorted.

Datasets are read with :func:`seggpt_lib.data.layout.read_manifest` (``labels=False``: no
image is decoded, labels are optional): the layout, ``classes.csv`` and the file-name class
rule are :mod:`seggpt_lib.data.layout`'s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

from seggpt_lib.data.layout import FREE_CLASS as FREE
from seggpt_lib.data.layout import IMAGE_EXTS, image_dir, read_manifest
from seggpt_lib.utils.config import read_json_config

KINDS = ("positive", "negative", "free", "retrieval")
THUMB_SIZE = 32

__all__ = [
    "FREE",
    "KINDS",
    "build_mapping",
    "validate_mapping",
    "save_mapping",
    "load_mapping",
    "thumbnail_embedding",
    "add_arguments",
    "run",
]


# --------------------------------------------------------------------------- embedding

def thumbnail_embedding(path: str | Path, size: int = THUMB_SIZE) -> np.ndarray:
    """Cheap image embedding: grayscale ``size x size`` thumbnail, zero-mean, unit norm."""
    from PIL import Image

    with Image.open(path) as im:
        thumb = im.convert("L").resize((size, size), Image.BILINEAR)
    v = np.asarray(thumb, dtype=np.float64).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


# --------------------------------------------------------------------------- mapping

def _rng(seed: int, query: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{query}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _load(root: Path, role: str):
    """The ``role`` dataset's listing; ``FileNotFoundError`` / ``ValueError`` naming the role."""
    if not root.is_dir():
        raise FileNotFoundError(f"{role} dataset folder not found: {root}")
    folder = image_dir(root)
    if not any(p.is_file() and p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir()):
        raise ValueError(f"no {role} images found in {folder} (extensions: {', '.join(IMAGE_EXTS)})")
    return read_manifest(root, labels=False)


def _sample(candidates: list[str], k: int, query: str, what: str, seed: int,
            prompt_root: Path) -> list[str]:
    if not candidates:
        raise ValueError(f"no possible {what} prompt for query {query!r} in {image_dir(prompt_root)}")
    if len(candidates) < k:
        raise ValueError(
            f"only {len(candidates)} possible {what} prompt(s) for query {query!r} in "
            f"{image_dir(prompt_root)}, k={k}"
        )
    return _rng(seed, query).sample(sorted(candidates), k)


def build_mapping(
    query_root: str | Path,
    prompt_root: str | Path,
    kind: str,
    k: int = 1,
    seed: int = 0,
    same_class: bool = False,
) -> dict[str, list[str]]:
    """Build a ``{query_file: [prompt_file, ...]}`` mapping of the given ``kind``.

    See the module docstring for the kinds. A prompt never has the query's file
    name. Raises ``ValueError`` (naming the folder) for an empty folder, a folder
    without queries of the requested kind, or a query with fewer than ``k``
    possible prompts.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query_root, prompt_root = Path(query_root), Path(prompt_root)
    queries = _load(query_root, "query")
    prompts = _load(prompt_root, "prompt")
    p_class = dict(zip(prompts["file"], prompts["class"]))
    defect_prompts = [f for f, c in p_class.items() if c != FREE]

    if kind == "free" or (kind == "retrieval" and not same_class):
        wanted = queries if kind == "retrieval" else queries[queries["class"] == FREE]
    else:
        wanted = queries[queries["class"] != FREE]
    if wanted.empty:
        what = "defect-free (class 'free')" if kind == "free" else "defect"
        raise ValueError(f"no {what} query images in {image_dir(query_root)}")

    mapping: dict[str, list[str]] = {}
    if kind == "retrieval":
        cache: dict[Path, np.ndarray] = {}

        def emb(path: Path) -> np.ndarray:
            if path not in cache:
                cache[path] = thumbnail_embedding(path)
            return cache[path]

        p_dir = image_dir(prompt_root)
        q_dir = image_dir(query_root)
        for q, qc in zip(wanted["file"], wanted["class"]):
            cands = [f for f in defect_prompts if f != q and (not same_class or p_class[f] == qc)]
            what = f"class {qc!r}" if same_class else "defect"
            if len(cands) < k:
                _sample(cands, k, q, what, seed, prompt_root)  # raises the clear error
            qv = emb(q_dir / q)
            sims = [(float(np.dot(qv, emb(p_dir / f))), f) for f in cands]
            sims.sort(key=lambda t: (-t[0], t[1]))  # most similar first, ties by name
            mapping[q] = [f for _, f in sims[:k]]
    else:
        for q, qc in zip(wanted["file"], wanted["class"]):
            if kind == "positive":
                cands = [f for f in defect_prompts if p_class[f] == qc and f != q]
                what = f"class {qc!r}"
            else:  # negative: other defect classes; free: any defect class
                cands = [f for f in defect_prompts if p_class[f] != qc and f != q]
                what = "other-class defect" if kind == "negative" else "defect"
            mapping[q] = _sample(cands, k, q, what, seed, prompt_root)
    return {q: mapping[q] for q in sorted(mapping)}


def _shape_problems(mapping: Any) -> list[str]:
    """What is wrong with a mapping's shape (``{query: [prompt, ...]}``, names non-empty text)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"a mapping must be a JSON object {{query: [prompts]}}, got {type(mapping).__name__}")
    problems = []
    for q, ps in mapping.items():
        if not isinstance(q, str) or not q.strip():
            problems.append(f"{q!r}: a query must be a file name")
        elif not isinstance(ps, list) or not all(isinstance(p, str) and p.strip() for p in ps):
            problems.append(f"{q!r}: prompts must be a list of file names, got {ps!r}")
        elif not ps:
            problems.append(f"{q!r}: empty prompt list")
    return problems


def validate_mapping(mapping: Any, query_dir: str | Path, prompt_dir: str | Path) -> None:
    """Check a mapping before any work starts.

    ``query_dir`` / ``prompt_dir`` are dataset roots or image folders (images are
    looked up in ``DIR/images`` when it exists, else in ``DIR``). Raises ONE
    ``FileNotFoundError`` listing every missing query and prompt file, or a
    ``ValueError`` listing every malformed entry.
    """
    problems = _shape_problems(mapping)
    if problems:
        raise ValueError("invalid mapping:\n  " + "\n  ".join(problems))
    q_dir, p_dir = image_dir(query_dir), image_dir(prompt_dir)
    missing_q = sorted(q for q in mapping if not (q_dir / q).is_file())
    missing_p = sorted({p for ps in mapping.values() for p in ps if not (p_dir / p).is_file()})
    if missing_q or missing_p:
        lines = []
        if missing_q:
            lines.append(f"{len(missing_q)} query image(s) missing from {q_dir}:")
            lines += [f"  {f}" for f in missing_q]
        if missing_p:
            lines.append(f"{len(missing_p)} prompt image(s) missing from {p_dir}:")
            lines += [f"  {f}" for f in missing_p]
        raise FileNotFoundError("mapping refers to missing files:\n" + "\n".join(lines))


def save_mapping(mapping: dict[str, list[str]], path: str | Path) -> None:
    """Write a mapping as JSON with sorted keys (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mapping, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_mapping(path: str | Path) -> dict[str, list[str]]:
    """Read a mapping JSON file: a non-empty object ``{query: [prompt, ...]}`` of file names.
    A missing file raises ``FileNotFoundError``; anything else wrong (unreadable, not UTF-8,
    not JSON, a duplicate query, the wrong shape) a ``ValueError`` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mapping not found: {p}")
    mapping = read_json_config(p, what="mapping", error=ValueError)
    if not mapping:
        raise ValueError(f"{p}: a mapping must be a non-empty JSON object {{query: [prompts]}}")
    problems = _shape_problems(mapping)
    if problems:
        raise ValueError(f"{p}: invalid mapping:\n  " + "\n  ".join(problems))
    return mapping


# --------------------------------------------------------------------------- CLI
