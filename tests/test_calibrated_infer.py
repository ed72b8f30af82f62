"""``seggpt infer`` writes the line's decision: with an operating point (beside the weights or
``--operating-point FILE``) the masks written are the decision's (empty = pass), the per-image
CSV carries each image's score and verdict; ``--raw-masks`` and ``--operating-point none`` write
the raw snapped masks."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from seggpt_lib import build_seggpt, save_weights
from seggpt_lib.cli import main
from seggpt_lib.eval.decision import DecisionConfig, OperatingPoint, save_operating_point


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_prep.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("calinfer")
    data = generate_synthetic(root / "syn", seed=0, per_class=2, size=48, classes=("scratch", "open"),
                              n_free=1, show_progress=False)
    torch.manual_seed(0)
    (root / "w").mkdir()
    save_weights(build_seggpt("vit_nano"), root / "w" / "model.safetensors")
    mapping = {"open_000000.png": ["open_000001.png"], "scratch_000000.png": ["open_000000.png"],
               "free_000000.png": ["scratch_000001.png"]}
    (root / "map.json").write_text(json.dumps(mapping))
    return root, data, mapping


def _argv(root, data, outdir, *extra):
    return ["infer", "--weights", str(root / "w" / "model.safetensors"), "--mapping", str(root / "map.json"),
            "--prompt-img-dir", str(data / "images"), "--prompt-label-dir", str(data / "labels"),
            "--dataset-dir", str(data), "--outdir", str(outdir), "--device", "cpu", "--no-progress", *extra]


def _labels(out, mapping) -> dict[str, np.ndarray]:
    return {q: np.asarray(Image.open(out / "label" / f"{q[:-4]}.png")) for q in mapping}


def test_decision_masks_raw_masks_and_no_point(setup, tmp_path, capsys):
    root, data, mapping = setup
    beside = root / "w" / "operating_point.json"
    try:
        # a point that withdraws everything (no image reaches the image threshold): every mask empty, "pass"
        save_operating_point(OperatingPoint(DecisionConfig(image_threshold=1e9)), beside)
        assert main(_argv(root, data, tmp_path / "cal", "--no-concat")) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "masks: the line's decision from" in printed and "operating_point.json" in printed.splitlines()[0]
        for q, lab in _labels(tmp_path / "cal", mapping).items():
            assert not lab.any(), q
            assert not np.asarray(Image.open(tmp_path / "cal" / "color" / f"{q[:-4]}.png")).any()
        t = pd.read_csv(tmp_path / "cal" / "per_image.csv")
        assert list(t["verdict"]) == ["pass"] * 3 and (t["mask"] == "calibrated").all()
        assert {"image_score", "image_score_kind", "calibrated_pred_pixels"} <= set(t.columns)
        assert (t["calibrated_pred_pixels"] == 0).all()
        s = json.loads((tmp_path / "cal" / "summary.json").read_text())
        assert s["masks"] == "calibrated" and s["decision"]["n_pass"] == 3 and s["decision"]["n_defect"] == 0
        assert s["settings"]["masks"] == "calibrated" and s["calibrated"]["free_yield_rate"] == 1.0
        assert "verdict: pass" in (tmp_path / "cal" / "results.txt").read_text()

        # a point that keeps every pixel (pixel threshold 0): every mask full, "defect"; its score recorded
        point = tmp_path / "keep_all.json"
        save_operating_point(OperatingPoint(DecisionConfig(pixel_threshold=0.0)), point)
        assert main(_argv(root, data, tmp_path / "all", "--operating-point", str(point))) == 0, capsys.readouterr().err
        capsys.readouterr()
        for q, lab in _labels(tmp_path / "all", mapping).items():
            assert (lab == 255).all(), q
        t = pd.read_csv(tmp_path / "all" / "per_image.csv").set_index("file")
        assert (t["verdict"] == "defect").all()
        assert (t["image_score"] == 48 * 48).all() and (t["image_score_kind"] == "max_area").all()
        # the concat panel shows the mask written
        concat = np.asarray(Image.open(tmp_path / "all" / "concat" / "open_000000.png"))
        assert concat.shape[1] == 3 * 48 + 8

        # without an operating point: the raw snapped masks, no verdict column
        assert main(_argv(root, data, tmp_path / "raw", "--operating-point", "none")) == 0
        assert "masks: raw snapped masks (no operating point" in capsys.readouterr().out
        raw = _labels(tmp_path / "raw", mapping)
        assert "verdict" not in pd.read_csv(tmp_path / "raw" / "per_image.csv").columns
        assert json.loads((tmp_path / "raw" / "summary.json").read_text())["masks"] == "raw"
        # --raw-masks: the raw masks although a point is there; the decision still reported
        assert main(_argv(root, data, tmp_path / "rawflag", "--operating-point", str(point), "--raw-masks")) == 0
        assert "masks: raw snapped masks (--raw-masks)" in capsys.readouterr().out
        for q, lab in _labels(tmp_path / "rawflag", mapping).items():
            assert np.array_equal(lab, raw[q]), q
        assert not all(lab.all() for lab in raw.values())  # the raw masks are not the kept-everything ones
        t = pd.read_csv(tmp_path / "rawflag" / "per_image.csv")
        assert (t["verdict"] == "defect").all() and (t["mask"] == "raw").all()
        assert json.loads((tmp_path / "rawflag" / "summary.json").read_text())["masks"] == "raw"
    finally:
        beside.unlink(missing_ok=True)


def test_help_says_which_masks(capsys):
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--raw-masks" in text and "the masks written are the decision's" in text
