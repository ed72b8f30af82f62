"""The explorer with the calibrated operating point (notebook 04's): the threshold slider starts
at the calibrated pixel threshold, says so, a button goes back to it, and the verdict is the full
decision (pixel threshold, min area, image score threshold). Driven through the widget's
callbacks with a tiny random model on a small synthetic split (no smoke pipeline needed)."""
from __future__ import annotations

import json

import pytest
import torch

from seggpt_lib import build_seggpt, save_weights
from seggpt_lib.eval.decision import DecisionConfig, OperatingPoint, save_operating_point
from seggpt_lib.experiments import viz as V


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    from data_prep.split import split_dataset
    from data_prep.synthetic import generate_synthetic
    from seggpt_lib.predict.predictor import SegGPTPredictor

    base = tmp_path_factory.mktemp("calexp")
    data = generate_synthetic(base / "syn", seed=0, per_class=4, size=48, classes=("scratch", "open"), n_free=3,
                              show_progress=False)
    split = split_dataset(data, base / "split", seed=0, val=0.25, test=0.25, show_progress=False)
    torch.manual_seed(0)
    predictor = SegGPTPredictor(build_seggpt("vit_nano"), device="cpu")
    return predictor, split / "test", split / "train"


def _explorer(roots, point, **kw):
    predictor, q_root, p_root = roots
    calls = []
    predict = predictor.predict
    counting = type("Counting", (), {"predict": lambda self, *a, **k: calls.append(1) or predict(*a, **k)})()
    ex = V.Explorer(counting, q_root, p_root, work_size=48, tile_pairing="aligned", operating_point=point, **kw)
    return ex, calls


def test_slider_starts_at_the_calibrated_threshold_and_jumps_back(roots):
    point = OperatingPoint(DecisionConfig(pixel_threshold=0.7, min_area=4, image_score="max_area", image_threshold=3.0))
    ex, calls = _explorer(roots, point)
    assert ex.threshold == 0.7
    ui = ex.widget()
    row, text = ui.children[0], ui.children[2]
    assert len(row.children) == 5, "threshold slider and the calibrated button"
    slider, button = row.children[3], row.children[4]
    assert slider.value == 0.7 == point.default.pixel_threshold
    assert slider.description == "calibrated" and button.description == "calibrated (0.70)"
    assert ex.last["calibrated"] and ex.last["calibrated_threshold"] == 0.7
    assert "pixel threshold 0.70 (calibrated;" in ex.last["title"] and "(calibrated;" in text.value
    n = len(calls)
    slider.value = 0.3
    assert slider.description == "threshold" and not ex.last["calibrated"] and ex.last["threshold"] == 0.3
    assert "manual; calibrated 0.70" in ex.last["title"]
    button.click()
    assert slider.value == 0.7 and slider.description == "calibrated" and ex.last["calibrated"]
    assert len(calls) == n  # the slider and the button decide again, they do not predict again


def test_verdict_is_the_full_decision(roots):
    # every pixel over the threshold, but the image score never reaches the image threshold: PASS, empty mask
    strict = OperatingPoint(DecisionConfig(pixel_threshold=0.0, image_threshold=1e9))
    ex, _ = _explorer(roots, strict)
    q = next(f for f in ex.queries if ex.query_class(f) != "free")
    out = ex.update(query=q, figure=False)
    assert out["threshold"] == 0.0 and out["calibrated"]
    assert out["defect"] is False and out["pred_pixels"] == 0 and out["image_score"] == 48 * 48
    assert "PASS" in out["title"] and "max_area 2304 vs >= 1e+09" in out["title"]
    # the minimum area withdraws it as well
    ex2, _ = _explorer(roots, OperatingPoint(DecisionConfig(pixel_threshold=0.0, min_area=48 * 48 + 1)))
    out2 = ex2.update(query=q, figure=False)
    assert out2["defect"] is False and out2["pred_pixels"] == 0
    # the same pair without an operating point: the pixel threshold alone, everything painted
    ex3, _ = _explorer(roots, None, threshold=0.0)
    out3 = ex3.update(query=q, figure=False)
    assert out3["defect"] is True and out3["pred_pixels"] == 48 * 48 and out3["calibrated_threshold"] is None
    assert "threshold 0.00: DEFECT" in out3["title"]
    # kept by the full decision: defect, with the decision's mask
    ex4, _ = _explorer(roots, OperatingPoint(DecisionConfig(pixel_threshold=0.0, image_threshold=10.0)))
    out4 = ex4.update(query=q, figure=False)
    assert out4["defect"] is True and out4["pred_pixels"] == 48 * 48 and "DEFECT" in out4["title"]


def test_class_point_and_no_point(roots):
    predictor, q_root, p_root = roots
    point = OperatingPoint(DecisionConfig(pixel_threshold=0.6), per_class={"open": DecisionConfig(pixel_threshold=0.4)})
    ex, _ = _explorer(roots, point)
    q = next(f for f in ex.queries if ex.query_class(f) == "scratch")
    open_prompt = next(f for f in ex.prompt_files if ex.prompt_class(f) == "open")
    out = ex.update(query=q, prompts=[open_prompt], figure=False)
    assert out["kind"] == "negative" and out["calibrated_threshold"] == 0.4 and out["threshold"] == 0.6
    assert not out["calibrated"]  # the slider sits at the default's 0.6; this pair's class point says 0.4
    assert ex.update(query=q, prompts=[open_prompt], figure=False, threshold=0.4)["calibrated"]
    # no operating point: the slider as before (0.5, no button)
    plain = V.Explorer(predictor, q_root, p_root, work_size=48)
    row = plain.widget().children[0]
    assert len(row.children) == 4 and row.children[3].value == 0.5 and row.children[3].description == "threshold"


def test_results_operating_point(tmp_path):
    res = tmp_path / "results"
    (res / "work").mkdir(parents=True)
    assert V.results_operating_point(res) is None
    point = OperatingPoint(DecisionConfig(pixel_threshold=0.4, min_area=16, image_threshold=7.0), objective="max_pes")
    save_operating_point(point, res / "work" / "operating_point.json")
    frag = {"operating_point": {"path": "work/operating_point.json", "objective": "max_pes",
                                "default": point.default.to_dict(), "per_class": {}}}
    (res / "work" / "04_pair_evaluation.json").write_text(json.dumps(frag))
    assert V.results_operating_point(res).default == point.default
    # the file gone: the record the fragment keeps
    (res / "work" / "operating_point.json").unlink()
    assert V.results_operating_point(res).default == point.default
    # given weights: the file beside them, else none
    (tmp_path / "w").mkdir()
    save_weights(build_seggpt("vit_nano"), tmp_path / "w" / "m.safetensors")
    assert V.results_operating_point(res, tmp_path / "w" / "m.safetensors") is None
    other = OperatingPoint(DecisionConfig(pixel_threshold=0.8))
    save_operating_point(other, tmp_path / "w" / "operating_point.json")
    assert V.results_operating_point(res, tmp_path / "w" / "m.safetensors").default.pixel_threshold == 0.8
