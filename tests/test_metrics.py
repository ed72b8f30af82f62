import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from seggpt_lib.eval import metrics as M
from seggpt_lib.eval.metrics import PairResult

# The original project's published per-image figures: (positive IoU, negative response rate).
PUBLISHED = {
    "front": (0.843, 0.000719),
    "impurities": (0.777, 0.001883),
    "mouse_bite": (0.424, 0.000169),
    "open_circuit": (0.562, 0.000237),
    "Porosity": (0.419, 0.000706),
    "RCS": (0.623, 0.000431),
    "short": (0.608, 0.000596),
    "spur": (0.508, 0.000362),
    "spurious_copper": (0.609, 0.000482),
    "thunderbolt": (0.534, 0.021971),
    "torn_apart": (0.044, 0.000618),
}


def test_published_figures():
    ious = [v[0] for v in PUBLISHED.values()]
    resp = [v[1] for v in PUBLISHED.values()]
    assert sum(M.is_catch(i) for i in ious) == 10
    assert sum(M.is_yield(r) for r in resp) == 2
    c, y = M.catch_rate(ious), M.yield_rate(resp)
    assert c == pytest.approx(10 / 11)
    assert y == pytest.approx(2 / 11)
    assert round(c, 3) == 0.909 and round(y, 3) == 0.182
    assert M.pes(c, y) == pytest.approx(6 / 11)
    assert round(M.pes(c, y), 4) == 0.5455
    assert round(M.mean_iou(ious), 3) == 0.541
    # the escape and the two yields are the right images
    assert [k for k, v in PUBLISHED.items() if not M.is_catch(v[0])] == ["torn_apart"]
    assert [k for k, v in PUBLISHED.items() if M.is_yield(v[1])] == ["mouse_bite", "open_circuit"]


def test_thresholds_are_inclusive_for_catch_strict_for_yield():
    assert M.is_catch(0.3) and not M.is_catch(0.2999)
    assert not M.is_yield(0.000239) and M.is_yield(0.000238)
    assert M.is_catch(0.5, thr=0.5) and not M.is_catch(0.49, thr=0.5)
    assert not M.is_catch(math.nan) and not M.is_yield(math.nan)


def test_iou_hand_made():
    g = np.zeros((4, 4), np.uint8)
    g[0:2, 0:2] = 255  # 4 pixels
    p = np.zeros((4, 4), bool)
    p[0:2, 1:3] = True  # 4 pixels, 2 overlap
    assert M.iou(p, g) == pytest.approx(2 / 6)
    assert M.iou(g, g) == 1.0
    assert M.iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0  # documented convention
    assert M.iou(p, np.zeros((4, 4))) == 0.0
    assert M.iou(np.zeros((4, 4)), g) == 0.0
    # label values other than 1 still count as defect
    assert M.iou((g // 255) * 3, g.astype(np.float32)) == 1.0


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16)) > 0.6
    b = rng.random((16, 16)) > 0.5
    expected = M.iou(a, b)
    assert M.iou(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected)
    assert M.iou(torch.from_numpy(a).float(), b.astype(np.int64)) == pytest.approx(expected)
    assert M.iou(torch.from_numpy(a).to(torch.bfloat16), b) == pytest.approx(expected)
    assert M.response_rate(torch.from_numpy(a).to(torch.uint8)) == pytest.approx(a.mean())


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        M.iou(np.zeros((4, 4)), np.zeros((4, 5)))


def test_response_rate():
    p = np.zeros((100, 100), np.uint8)
    p[0, :3] = 1
    assert M.response_rate(p) == pytest.approx(3e-4)
    assert not M.is_yield(M.response_rate(p))
    p[0, 2] = 0
    assert M.is_yield(M.response_rate(p))  # 2e-4 < 2.39e-4


def test_rates_exclude_nan_and_empty_is_nan():
    assert M.catch_rate([0.5, math.nan, 0.1]) == 0.5
    assert M.yield_rate([0.0, math.nan, 1.0, 0.0]) == pytest.approx(2 / 3)
    assert math.isnan(M.catch_rate([]))
    assert math.isnan(M.mean_iou([math.nan]))
    assert M.mean_iou([0.2, math.nan, 0.4]) == pytest.approx(0.3)


def test_per_class_iou():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])
    out = M.per_class_iou(pred, gt, 4)
    assert out.shape == (4,)
    assert out[0] == pytest.approx(4 / 5)
    assert out[1] == pytest.approx(3 / 4)
    assert math.isnan(out[2]) and math.isnan(out[3])  # absent from both
    assert np.nanmean(out) == pytest.approx((0.8 + 0.75) / 2)
    # a class only predicted gets 0, not NaN
    pred2 = pred.copy()
    pred2[0, 0] = 3
    assert M.per_class_iou(pred2, gt, 4)[3] == 0.0
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        M.per_class_iou(pred2, gt, 2)


# ------------------------------------------------------------------ hypothesis

masks = st.integers(1, 12).flatmap(
    lambda h: st.integers(1, 12).flatmap(
        lambda w: st.tuples(arrays(bool, (h, w)), arrays(bool, (h, w)))
    )
)


@settings(max_examples=150, deadline=None)
@given(masks)
def test_iou_symmetric_and_bounded(pg):
    p, g = pg
    v = M.iou(p, g)
    assert 0.0 <= v <= 1.0
    assert v == M.iou(g, p)


@settings(max_examples=100, deadline=None)
@given(masks)
def test_iou_self_is_one(pg):
    p, _ = pg
    assert M.iou(p, p) == 1.0  # non-empty by definition, empty by convention
    assert M.iou(p, p.astype(np.uint8) * 7) == 1.0


@settings(max_examples=150, deadline=None)
@given(masks, st.data())
def test_iou_increases_when_adding_true_positive(pg, data):
    p, g = pg
    missed = np.argwhere(g & ~p)
    if len(missed) == 0:
        return
    i = data.draw(st.integers(0, len(missed) - 1))
    p2 = p.copy()
    p2[tuple(missed[i])] = True
    assert M.iou(p2, g) > M.iou(p, g)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10), st.integers(1, 10))
def test_iou_empty_conventions(h, w):
    z = np.zeros((h, w), bool)
    o = np.ones((h, w), bool)
    assert M.iou(z, z) == 1.0
    assert M.iou(o, z) == 0.0
    assert M.iou(z, o) == 0.0


# ------------------------------------------------------------------ evaluate

def _mask(h, w, box=None):
    m = np.zeros((h, w), np.uint8)
    if box:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = 1
    return m


def _records():
    H = W = 100  # 10 000 pixels: 2 pixels = 2e-4 < 2.39e-4, 3 pixels = 3e-4 overkill
    gt_a = _mask(H, W, (0, 10, 0, 10))  # 100 px
    gt_b = _mask(H, W, (50, 70, 50, 70))  # 400 px
    return [
        # catch: iou 50/100 = 0.5
        PairResult("a_1.png", ["a_2.png"], "positive", "a", _mask(H, W, (0, 5, 0, 10)), gt_a),
        # escape: iou 100/400 = 0.25
        PairResult("b_1.png", ["b_2.png"], "positive", "b", _mask(H, W, (50, 55, 50, 70)), gt_b),
        # negative: 2 px -> yield (iou against gt: 0)
        PairResult("a_1.png", ["b_2.png"], "negative", "a", _mask(H, W, (90, 91, 90, 92)), gt_a),
        # negative: 3 px -> overkill
        PairResult("b_1.png", ["a_2.png"], "negative", "b", _mask(H, W, (90, 91, 90, 93)), gt_b),
        # free: nothing painted -> yield, iou 1 by convention
        PairResult("free_1.png", ["a_2.png"], "free", "free", _mask(H, W), _mask(H, W)),
        # missing gt: excluded everywhere
        PairResult("c_1.png", ["c_2.png"], "positive", "c", _mask(H, W, (0, 50, 0, 50)), None),
    ]


def test_evaluate_table_and_summary():
    table, s = M.evaluate(_records())
    assert list(table.columns[:10]) == ["file", "class", "kind", "prompts", "iou", "catch",
                                        "response_rate", "yield", "pred_pixels", "gt_pixels"]
    assert len(table) == 6
    assert table["iou"].iloc[0] == pytest.approx(0.5)
    assert table["catch"].tolist()[:2] == [True, False]
    assert table["catch"].iloc[2] is None and table["yield"].iloc[0] is None
    assert table["yield"].tolist()[2:5] == [True, False, True]
    assert table["pred_pixels"].tolist()[:5] == [50, 100, 2, 3, 0]
    assert table["gt_pixels"].iloc[1] == 400
    missing = table.iloc[5]
    assert missing["gt_missing"] and math.isnan(missing["iou"]) and missing["catch"] is None

    assert s["n_positive"] == 2 and s["n_catch"] == 1 and s["catch_rate"] == 0.5
    assert s["miou"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["n_negative"] == 2 and s["n_yield"] == 1 and s["yield_rate"] == 0.5
    assert s["negative_miou"] == 0.0
    assert s["n_free"] == 1 and s["free_yield_rate"] == 1.0
    assert s["pes"] == pytest.approx(0.5) and s["pes_yield_source"] == "negative"
    assert s["n_missing_gt"] == 1 and s["n_pairs"] == 6
    assert s["catch_iou"] == 0.3 and s["yield_response"] == 0.000239

    nothing = s["baselines"]["paint_nothing"]
    assert nothing["catch_rate"] == 0.0 and nothing["yield_rate"] == 1.0
    assert nothing["pes"] == 0.5 and nothing["miou"] == 0.0
    assert nothing["free_yield_rate"] == 1.0
    every = s["baselines"]["paint_everything"]
    # computed on the same ground truths: iou = |G| / N
    assert every["miou"] == pytest.approx((100 / 10000 + 400 / 10000) / 2)
    assert every["catch_rate"] == 0.0 and every["yield_rate"] == 0.0 and every["pes"] == 0.0


def test_paint_everything_baseline_matches_iou_function():
    recs = _records()[:2]
    _, s = M.evaluate(recs, catch_iou=0.03)
    ious = [M.iou(np.ones_like(r.gt), r.gt) for r in recs]
    assert s["baselines"]["paint_everything"]["miou"] == pytest.approx(np.mean(ious))
    assert s["baselines"]["paint_everything"]["catch_rate"] == 0.5  # 0.04 >= 0.03 > 0.01


def test_evaluate_thresholds_change_outcome():
    _, s = M.evaluate(_records(), catch_iou=0.2, yield_response=0.001)
    assert s["n_catch"] == 2 and s["n_yield"] == 2 and s["pes"] == 1.0


def test_pes_falls_back_to_free_yield():
    recs = [r for r in _records() if r.kind != "negative"]
    _, s = M.evaluate(recs)
    assert s["n_negative"] == 0 and math.isnan(s["yield_rate"])
    assert s["pes_yield_source"] == "free"
    assert s["pes"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert "yield from free" in M.summary_markdown(s)


def test_evaluate_rejects_shape_mismatch_and_bad_kind():
    with pytest.raises(ValueError, match="q.png"):
        M.evaluate([PairResult("q.png", ["p.png"], "positive", "a", np.zeros((4, 4)), np.zeros((4, 5)))])
    with pytest.raises(ValueError, match="kind"):
        PairResult("q.png", ["p.png"], "positve", "a", np.zeros((4, 4)), np.zeros((4, 4)))


def test_evaluate_empty():
    table, s = M.evaluate([])
    assert len(table) == 0 and s["n_pairs"] == 0
    assert math.isnan(s["pes"]) and s["pes_yield_source"] == "none"
    M.summary_markdown(s)


def test_summary_markdown():
    _, s = M.evaluate(_records())
    md = M.summary_markdown(s)
    lines = md.splitlines()
    assert lines[0].startswith("| | mIoU | catch | yield")
    assert any(l.startswith("| model | 0.375 | 0.500 | 0.500 | 1.000 | 0.5000 |") for l in lines)
    assert any(l.startswith("| paint nothing |") and "0.5000" in l for l in lines)
    assert any(l.startswith("| paint everything |") for l in lines)
    assert "catches 1/2" in md and "1 pair(s) without ground truth" in md
