"""Notebook 05 and the study with the line's decision: each compared model and prompt gets a raw
and a calibrated row, the operating point chosen on the validation split only (notebook 04's
functions), the calibrated PES set against the paint-nothing floor (0.5)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from seggpt_lib import build_seggpt, save_weights
from seggpt_lib.experiments import config as CFG
from seggpt_lib.experiments import results as RES
from seggpt_lib.experiments import study as S

TINY = {"preset": CFG.SMOKE["preset"], "budget_minutes": None, "recipe": {"batch_size": 4, "warmup_steps": 1},
        "steps": 1, "eval_every": 1, "val_pairs": 4, "top_k": 2, "max_queries": 3, "tune_steps": 1}
DECISION_RATES = ["catch_rate", "yield_rate", "free_yield_rate", "PES"]


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """3 defect classes x 6 images + 3 defect-free, 48 px; a validation split with two or more
    images per class (positive validation pairs)."""
    from data_prep.split import split_dataset
    from data_prep.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("calbeyond")
    root = generate_synthetic(base / "syn", seed=0, per_class=6, size=48, classes=("pit", "stain", "scratch"),
                              n_free=3, show_progress=False)
    return split_dataset(root, base / "split", seed=0, val=0.4, test=0.3, show_progress=False)


def _weights(tmp_path: Path) -> dict[str, str]:
    out = {}
    for seed, nt in enumerate(("query_mask", "empty")):
        torch.manual_seed(seed)
        save_weights(build_seggpt(TINY["preset"]), tmp_path / f"{nt}.safetensors")
        out[nt] = str(tmp_path / f"{nt}.safetensors")
    return out


def _check_decision(dec: pd.DataFrame, targets=("query_mask", "empty"), methods=("top1", "topk", "learned")) -> None:
    assert list(dec.columns[:4]) == ["recipe", "negative_target", "prompt", "decision"]
    for nt in targets:
        for m in methods:
            rows = dec[(dec["negative_target"] == nt) & (dec["method"] == m)]
            assert list(rows["decision"]) == ["raw", "calibrated"], (nt, m)
    base = dec.iloc[-1]
    assert base["prompt"] == "paint nothing" and base["PES"] == S.PAINT_NOTHING_PES == 0.5
    assert (dec["decision"] == "calibrated").sum() == len(targets) * len(methods)
    scored = dec.dropna(subset=["PES"])
    assert np.allclose(scored["PES_over_floor"], scored["PES"] - 0.5)
    assert np.allclose(scored["PES"], 0.5 * scored["catch_rate"] + 0.5 * scored["yield_rate"])
    for c in DECISION_RATES:
        vals = [v for v in scored[c] if not math.isnan(v)]
        assert vals and all(0.0 <= v <= 1.0 for v in vals), c


def test_compare_recipes_raw_and_calibrated_rows_on_val_only(split, tmp_path):
    cfg = CFG.BeyondConfig(**TINY)
    reuse = _weights(tmp_path)
    res = S.compare_recipes(split, cfg, reuse=reuse, work_dir=tmp_path / "work", results_dir=tmp_path / "res",
                            table_name="cmp", log=lambda m: None)
    dec = res["decision"]
    _check_decision(dec)
    assert len(res["table"]) == 7  # the raw table as it was: 2 models x 3 prompts + paint nothing
    for nt, pts in res["operating_points"].items():
        assert set(pts) == {"top1", "topk", "learned"}
        for m, p in pts.items():
            assert p is not None, (nt, m)  # the validation split has positive pairs for every prompt method
            assert Path(p.settings["val_dir"]).name == "val"
    # the table written, its note sets the calibrated PES against the floor
    md = (tmp_path / "res" / "tables" / "cmp_decision.md").read_text()
    assert "| calibrated |" in md and "| raw |" in md and "paint-nothing floor 0.5" in md
    assert len(pd.read_csv(tmp_path / "res" / "tables" / "cmp_decision.csv")) == len(dec)
    floor = S.floor_summary(dec)
    assert set(floor["models"]) == {"query_mask", "empty"} and floor["floor"] == 0.5
    for v in floor["models"].values():
        assert math.isclose(v["over_floor"], v["pes"] - 0.5) and v["above"] == (v["pes"] > 0.5)
    json.dumps(S.decision_rows(dec), allow_nan=False)
    assert S.decision_figure(dec) is not None

    # the test split is not read for the operating points: other test labels, the same points
    other = tmp_path / "split2"
    shutil.copytree(split, other)
    for f in (other / "test" / "labels").iterdir():
        if not f.name.startswith("free"):
            m = np.asarray(Image.open(f))
            Image.fromarray(np.full(m.shape, m.max(), m.dtype)).save(f)
    again = S.compare_recipes(other, cfg.replace(methods=("top1", "learned")), reuse=reuse,
                              work_dir=tmp_path / "work2", log=lambda m: None)
    for nt in reuse:
        for m in ("top1", "learned"):
            a, b = again["operating_points"][nt][m], res["operating_points"][nt][m]
            assert (a.default, a.per_class) == (b.default, b.per_class), (nt, m)
            assert a.validation["calibrated"] == b.validation["calibrated"]
    assert not again["table"]["mIoU"].iloc[:2].equals(res["table"]["mIoU"].iloc[:2])  # the test figures did change


def test_no_calibration_keeps_the_raw_rows(split, tmp_path):
    cfg = CFG.BeyondConfig(**TINY).replace(calibration_objective=None, methods=("top1",))
    res = S.compare_recipes(split, cfg, reuse={"empty": _weights(tmp_path)["empty"]}, negative_targets=("empty",),
                            work_dir=tmp_path / "work", log=lambda m: None)
    assert len(res["decision"]) == 0 and res["operating_points"] == {"empty": {}} and len(res["table"]) == 2
    assert S.floor_sentence(res["decision"]).startswith("No calibrated rows")


def test_study_reports_raw_and_calibrated_rows(split, tmp_path):
    """run_study on a prepared split (the magnetic-tile data stand-in): its summary and tables carry
    the decision rows and the calibrated PES against the paint-nothing floor."""
    st = S.StudySettings(preset=TINY["preset"], steps=1, minutes=None, eval_every=1, val_pairs=4, tune_steps=1,
                         max_queries=2, top_k=2, pretrained=None, train={"batch_size": 4, "warmup_steps": 1, "num_workers": 0})
    prepared = {"work": str(tmp_path / "work"), "convert_s": 0.0, "source": str(split),
                "protocols": {"seen": {"split_root": str(split), "eval_root": str(split), "holdout_classes": [],
                                       "split_s": 0.0}}}
    s = S.run_study(prepared, tmp_path / "out", st, device="cpu", log=lambda m: None)
    p = s["protocols"]["seen"]
    assert len(p["rows"]) == 7  # the raw rows, as before
    _check_decision(pd.DataFrame(p["decision_rows"]))
    assert set(p["operating_points"]) == {f"{nt}/{m}" for nt in ("query_mask", "empty")
                                          for m in ("top1", "topk", "learned")}
    cvf = p["calibrated_vs_floor"]
    assert cvf["floor"] == 0.5 and set(cvf["models"]) == {"query_mask", "empty"}
    assert "paint-nothing floor" in cvf["sentence"]
    assert s["settings"]["calibration_objective"] == "max_pes"
    assert (tmp_path / "out" / "tables" / "study_seen_decision.md").is_file()
    assert (tmp_path / "out" / "figures" / "study_seen_decision.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["protocols"]["seen"]["decision_rows"][1]["decision"] == "calibrated"


def test_smoke_notebook_05_fragment_has_raw_and_calibrated_rows(results):
    """The smoke pipeline's notebook 05 (``seggpt reproduce --smoke``): a raw and a calibrated row
    per compared model and prompt, calibrated on the validation split, the table and figure written."""
    frag = RES.load_fragment(results, RES.BeyondFragment)
    dec = pd.DataFrame(frag.decision_rows)
    targets = tuple(dict.fromkeys(r["negative_target"] for r in frag.training))
    _check_decision(dec.astype({c: float for c in DECISION_RATES + ["PES_over_floor"]}), targets=targets)
    assert frag.calibration_objective == "max_pes" and Path(frag.val_dir).name == "val"
    assert len(frag.rows) == len(targets) * 3 + 1  # the raw rows, unchanged
    assert set(frag.operating_points) == {f"{nt}/{m}" for nt in targets for m in ("top1", "topk", "learned")}
    assert (results / "tables" / "05_beyond_decision.csv").is_file()
    assert (results / "figures" / "05_decision.png").read_bytes()[:4] == b"\x89PNG"
    assert frag.seconds is not None


def test_study_settings_calibration_objective():
    assert S.FULL.calibration_objective == CFG.PipelineConfig.calibration_objective
    assert S.QUICK.beyond("cpu", 0, {}).calibration_objective == "max_pes"
    assert S.FULL.with_overrides({"calibration_objective": None}).beyond("cpu", 0, {}).calibration_objective is None
    with pytest.raises(ValueError, match="calibration_objective must be one of"):
        S.FULL.with_overrides({"calibration_objective": "max_yield"})
