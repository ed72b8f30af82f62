"""The line's decision: defect score, decision, prompt consistency, calibration, ``seggpt calibrate``."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seggpt_lib import build_seggpt, save_weights
from seggpt_lib.cli import main
from seggpt_lib.eval.calibration import (
    CalibrationGrid,
    PairScore,
    calibrate,
    catch_yield_curve,
    decision_figures,
)
from seggpt_lib.eval.decision import (
    DecisionConfig,
    OperatingPoint,
    OperatingPointError,
    decide,
    keep_components,
    label_components,
    load_operating_point,
    save_operating_point,
)
from seggpt_lib.predict.consistency import prompt_consistency
from seggpt_lib.predict.predictor import SegGPTPredictor, forward_grouped
from seggpt_lib.utils.colors import cmap_to_lbl, defect_score
from seggpt_lib.utils.masking import query_half_mask


# ------------------------------------------------------------------------------------------ score
@pytest.mark.parametrize("colour", [(255, 255, 255), (255, 0, 0), (40, 200, 90)])
def test_score_and_snapping_agree_at_half(colour):
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(3, 64, 64, generator=g) * 255
    score = defect_score(raw, colour)
    assert score.shape == (64, 64) and float(score.min()) >= 0 and float(score.max()) <= 1
    snapped = cmap_to_lbl(raw, torch.tensor([(0, 0, 0), colour], dtype=torch.uint8)) != 0
    away = (score - 0.5).abs() > 1e-5
    assert away.float().mean() > 0.99
    assert torch.equal(snapped[away], (score >= 0.5)[away])
    assert float(defect_score(torch.tensor(colour, dtype=torch.float32).view(3, 1, 1), colour)) == 1.0
    assert float(defect_score(torch.zeros(3, 1, 1), colour)) == 0.0


def test_predictor_score_equals_mask_exactly():
    torch.manual_seed(0)
    pred = SegGPTPredictor(build_seggpt("vit_nano"))
    rng = np.random.default_rng(0)
    q = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    p = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    m = np.zeros((40, 40), bool)
    m[5:20, 5:25] = True
    r = pred.predict(q, [p], [m], grid=2, work_size=64, consistency=True)
    assert r.score.shape == r.mask.shape == (40, 50) and r.score.dtype == np.float32
    assert np.array_equal(r.score >= 0.5, r.mask)
    assert r.consistency is not None
    r0 = pred.predict(q, [p], [m], grid=2, work_size=64)
    assert np.array_equal(r0.mask, r.mask) and r0.consistency is None  # asking for it changes nothing else


# ------------------------------------------------------------------------------------------ decision
def _brute_components(m):
    from collections import deque
    lab, n = np.zeros(m.shape, int), 0
    for y, x in zip(*np.nonzero(m)):
        if lab[y, x]:
            continue
        n += 1
        lab[y, x] = n
        dq = deque([(y, x)])
        while dq:
            a, b = dq.popleft()
            for c in range(a - 1, a + 2):
                for d in range(b - 1, b + 2):
                    if 0 <= c < m.shape[0] and 0 <= d < m.shape[1] and m[c, d] and not lab[c, d]:
                        lab[c, d] = n
                        dq.append((c, d))
    return lab, n


def test_components_match_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(100):
        m = rng.random((rng.integers(1, 16), rng.integers(1, 16))) < rng.random()
        lab, n = label_components(m)
        ref, n_ref = _brute_components(m)
        assert n == n_ref
        assert len(set(zip(lab[m].tolist(), ref[m].tolist()))) == n  # the same partition


def _map(blobs, shape=(64, 64), value=0.9):
    s = np.zeros(shape, np.float32)
    for t, l, h, w in blobs:
        s[t : t + h, l : l + w] = value
    return s


def test_decide_defaults_keep_the_snapped_mask():
    s = _map([(5, 5, 3, 3)], value=0.6)
    d = decide(s)
    assert d.defect and np.array_equal(d.mask, s >= 0.5) and d.image_score == 9
    assert not decide(np.zeros((8, 8), np.float32)).defect


def test_decide_empties_below_thresholds_and_keeps_above():
    s = _map([(2, 2, 10, 10), (40, 40, 2, 2)])  # a 100-pixel blob and a 4-pixel speck
    kept = decide(s, DecisionConfig(min_area=5))
    assert kept.defect and kept.mask.sum() == 100 and not kept.mask[40:42, 40:42].any()
    assert decide(s, DecisionConfig(min_area=101)).mask.sum() == 0
    above = decide(s, DecisionConfig(image_threshold=100))
    assert above.defect and above.mask.sum() == 104
    below = decide(s, DecisionConfig(image_threshold=101))
    assert not below.defect and not below.mask.any() and below.image_score == 100
    assert not decide(s, DecisionConfig(pixel_threshold=0.95)).mask.any()
    assert decide(s, DecisionConfig(image_score="mean_score", image_threshold=0.85)).defect
    assert not decide(s, DecisionConfig(image_score="mean_score", image_threshold=0.95)).defect
    c = DecisionConfig(consistency_threshold=0.1)
    assert not decide(s, c, consistency=0.05).mask.any()
    assert decide(s, c, consistency=0.2).defect and decide(s, c, consistency=float("nan")).defect
    assert keep_components(s >= 0.5, 0).sum() == 104


# ------------------------------------------------------------------------------------------ consistency
def test_consistency_separates_matching_from_non_matching():
    torch.manual_seed(0)
    d = 16
    defect, background, other = torch.randn(3, d)
    feats = background.repeat(2, 8, 4, 1).clone()  # (N=2, Hp=8, Wp=4, D)
    feats += 0.05 * torch.randn_like(feats)
    prompt_w = torch.zeros(2, 4, 4)
    prompt_w[:, 1:3, 1:3] = 1
    feats[:, 1:3, 1:3] += defect - background  # the prompt's defect
    query_w = torch.zeros(2, 4, 4)
    query_w[:, 2:4, 0:2] = 1  # predicted region of the query (rows 4.. of the pair)
    feats[0, 6:8, 0:2] += defect - background  # sample 0: the painted region looks like the defect
    feats[1, 6:8, 0:2] += other - background  # sample 1: it looks like something else
    c = prompt_consistency(feats, prompt_w, query_w)
    assert c[0] > 0.5 and c[1] < c[0] - 0.5
    assert torch.isnan(prompt_consistency(feats, prompt_w, torch.zeros_like(query_w))).all()


def test_forward_grouped_features_change_nothing():
    torch.manual_seed(0)
    model = build_seggpt("vit_nano").eval()
    h, w = model.cfg.img_size
    imgs, tgts = torch.randn(3, 3, h, w), torch.randn(3, 3, h, w)
    mask = query_half_mask(model.cfg.grid, batch_size=3)
    gi = torch.tensor([0, 0, 1])
    with torch.no_grad():
        a = forward_grouped(model, imgs, tgts, mask, gi, query_only=True)
        b, feats = forward_grouped(model, imgs, tgts, mask, gi, query_only=True, return_features=True)
    assert torch.equal(a, b) and feats.shape == (3, *model.cfg.grid, model.cfg.embed_dim)


# ------------------------------------------------------------------------------------------ calibration
def _pairs():
    """Positives paint a 100-pixel blob on the true defect; negatives and defect-free queries a
    30-pixel blob: the best max-area threshold lies in (30, 100]."""
    out = []
    for i in range(6):
        gt = _map([(10, 10, 10, 10)]) > 0
        out.append(PairScore(f"p{i}.png", "positive", "a", "a", _map([(10, 10, 10, 10)]), gt, 0.3))
        out.append(PairScore(f"n{i}.png", "negative", "b", "a", _map([(30, 30, 5, 6)]), np.zeros((64, 64), bool), -0.2))
        out.append(PairScore(f"f{i}.png", "free", "free", "a", _map([(40, 40, 5, 6)], value=0.7),
                             np.zeros((64, 64), bool), float("nan")))
    return out


def test_calibration_recovers_the_known_threshold_and_is_deterministic():
    pairs = _pairs()
    grid = CalibrationGrid(pixel_thresholds=(0.5,), min_areas=(0,), image_scores=("max_area",), consistency_quantiles=())
    point = calibrate(pairs, "max_pes", grid=grid)
    assert point.default == DecisionConfig(0.5, 0, "max_area", 100.0, None)
    assert point.validation["raw"]["yield_rate"] == 0 and point.validation["raw"]["catch_rate"] == 1
    cal = point.validation["calibrated"]
    assert (cal["catch_rate"], cal["yield_rate"], cal["free_yield_rate"], cal["pes"]) == (1.0, 1.0, 1.0, 1.0)
    assert calibrate(list(pairs), "max_pes", grid=grid).to_dict() == point.to_dict()
    full = calibrate(pairs, "max_catch_at_yield", yield_target=0.6)  # the default grid also finds a perfect point
    assert full.validation["calibrated"]["pes"] == 1.0 and full.validation["sweep"]["feasible"]
    assert calibrate(pairs, "max_catch_at_yield", yield_target=0.6).to_dict() == full.to_dict()
    assert decision_figures(pairs, full.default)["pes"] == 1.0


def test_calibration_per_class_and_curve():
    pairs = _pairs()
    point = calibrate(pairs, "max_pes", min_class_pairs=6)
    assert set(point.per_class) == {"a"} and point.validation["per_class"]["a"]["own_point"]
    assert calibrate(pairs, "max_pes", min_class_pairs=7).per_class == {}
    curve = catch_yield_curve(pairs, DecisionConfig(), by_class=True)
    assert curve["auc_negative"] == pytest.approx(1.0) and curve["auc_free"] == pytest.approx(1.0)
    assert len(curve["thresholds"]) == len(curve["catch"]) == len(curve["yield_negative"])
    assert set(curve["per_class"]) == {"a"}


def test_calibration_uses_consistency_when_it_separates():
    pairs = _pairs()
    for p in pairs:  # make areas useless: every pair paints the same blob
        if p.kind != "positive":
            p.score = _map([(10, 10, 10, 10)])
            p.consistency = -0.2
    grid = CalibrationGrid(pixel_thresholds=(0.5,), min_areas=(0,), image_scores=("max_area",))
    point = calibrate(pairs, "max_pes", grid=grid)
    assert point.default.consistency_threshold is not None and -0.2 < point.default.consistency_threshold <= 0.3
    assert point.validation["calibrated"]["yield_rate"] == 1.0 and point.validation["calibrated"]["catch_rate"] == 1.0


def test_operating_point_round_trip_and_malformed(tmp_path):
    point = OperatingPoint(DecisionConfig(0.6, 16, "mean_score", 0.7, 0.1), {"crack": DecisionConfig(min_area=4)},
                           "max_catch_at_yield", 0.6, {"grid": 2}, {"raw": {"pes": float("nan")}})
    path = save_operating_point(point, tmp_path / "operating_point.json")
    back = load_operating_point(path)
    assert back.default == point.default and back.per_class == point.per_class and back.settings == {"grid": 2}
    assert back.config_for("crack").min_area == 4 and back.config_for("open") == point.default
    for text in ("{not json", json.dumps({"per_class": {}}), json.dumps({"default": {"min_area": -1}}),
                 json.dumps({"default": {"pixel_thrshold": 0.5}})):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(OperatingPointError, match="bad.json"):
            load_operating_point(bad)
    with pytest.raises(OperatingPointError, match="missing.json"):
        load_operating_point(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from data_prep.split import split_dataset
    from data_prep.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("cal")
    data = generate_synthetic(root / "syn", seed=0, per_class=6, size=48, classes=("scratch", "open"),
                              n_free=4, show_progress=False)
    out = split_dataset(data, root / "split", seed=0, val=0.4, test=0.3, show_progress=False)
    torch.manual_seed(0)
    (root / "w").mkdir()
    save_weights(build_seggpt("vit_nano"), root / "w" / "model.safetensors")
    return root, out


def _cal(root, split_root, *extra):
    return ["calibrate", "--weights", str(root / "w" / "model.safetensors"), "--data", str(split_root),
            "--device", "cpu", "--no-progress", "--pixel-thresholds", "0.4,0.5", "--min-areas", "0,8",
            "--image-thresholds", "8", *extra]


def test_calibrate_end_to_end_never_reads_test(split, tmp_path, capsys):
    root, split_root = split
    default = root / "w" / "operating_point.json"
    assert main(_cal(root, split_root)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "chosen point" in printed and "raw" in printed and "calibrated" in printed
    first = json.loads(default.read_text())
    assert first["settings"]["val_dir"].endswith("val") and first["validation"]["n_pairs"] > 0
    assert main(_cal(root, split_root)) == 2 and "exists" in capsys.readouterr().err.lower()  # no --overwrite
    for f in (split_root / "test" / "images").iterdir():  # poison the test split
        f.write_bytes(b"not an image")
    for f in (split_root / "test" / "labels").iterdir():
        f.write_bytes(b"")
    assert main(_cal(root, split_root, "--out", str(tmp_path / "again.json"))) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "again.json").read_text()) == first  # deterministic, test split unread
    assert load_operating_point(default).default == DecisionConfig.from_dict(first["default"])

    # seggpt infer picks it up beside the weights and reports both rows
    val = split_root / "val"
    files = sorted(p.name for p in (val / "images").iterdir() if not p.name.startswith("free"))
    (tmp_path / "map.json").write_text(json.dumps({files[0]: [files[1]]}))
    argv = ["infer", "--weights", str(root / "w" / "model.safetensors"), "--mapping", str(tmp_path / "map.json"),
            "--prompt-img-dir", str(val / "images"), "--prompt-label-dir", str(val / "labels"),
            "--dataset-dir", str(val), "--device", "cpu", "--no-progress", "--no-concat"]
    assert main(argv + ["--outdir", str(tmp_path / "inf")]) == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "inf" / "summary.json").read_text())
    assert "calibrated" in s and "catch_rate" in s["calibrated"] and "catch_rate" in s
    assert main(argv + ["--outdir", str(tmp_path / "inf2"), "--operating-point", "none"]) == 0
    assert "calibrated" not in json.loads((tmp_path / "inf2" / "summary.json").read_text())
    (tmp_path / "broken.json").write_text("[]")
    assert main(argv + ["--outdir", str(tmp_path / "inf3"), "--operating-point", str(tmp_path / "broken.json")]) == 2
    assert "broken.json" in capsys.readouterr().err
