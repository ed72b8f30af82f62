"""Training against collapse: fg_weight "auto" (auto_fg_weight, defect_share), weight_query_defects,
collapse_of / CollapseWarning, the checkpoint kept by select_by, and a collapse said loudly on the
results page (report.py) beside headline figures that equal a trivial baseline's."""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seggpt_lib import data as D
from seggpt_lib.engine import trainer as T
from seggpt_lib.engine.trainer import (
    AUTO_FG_RANGE,
    AUTO_FG_SHARE,
    CollapseWarning,
    Trainer,
    TrainConfig,
    auto_fg_weight,
    collapse_message,
    collapse_of,
    defect_share,
    train,
)
from seggpt_lib.eval import metrics as M
from seggpt_lib.model.seggpt import preset_config

TINY_PRESET = "vit_nano"  # 32 x 32 per image, patch 8
SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """A long CPU job shares this machine: these tests use one thread (after conftest's seed)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# a tiny hand-made set: squares of known size, at the model's size (the cache keeps the pixels)
# ------------------------------------------------------------------------------------------
# (class, square side) per defect image; then defect-free images
SQUARES = [("dent", 4), ("dent", 6), ("scratch", 8), ("scratch", 3)]
N_FREE = 2


def _make_set(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = ["file,class"]
    rng = np.random.default_rng(0)
    jobs = [(c, s) for c, s in SQUARES] + [("free", 0)] * N_FREE
    for i, (c, side) in enumerate(jobs):
        img = rng.integers(0, 40, (SIZE, SIZE, 3), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if side:
            y, x = 2 + i, 5 + 2 * i
            img[y : y + side, x : x + side] = 255
            mask[y : y + side, x : x + side] = 255
        name = f"{c}_{i:03d}.png"
        Image.fromarray(img).save(root / "images" / name)
        Image.fromarray(mask).save(root / "labels" / name)
        rows.append(f"{name},{c}")
    (root / "classes.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return _make_set(tmp_path_factory.mktemp("tiny") / "set")


@pytest.fixture(scope="module")
def tiny_index(tiny_set) -> D.DefectIndex:
    return D.DefectIndex.scan(tiny_set)


def _eval_ds(index, pairs, **kw) -> D.PairDataset:
    cfg = D.PairConfig.for_model(preset_config(TINY_PRESET), train=False, **kw)
    return D.PairDataset(index, cfg, pairs=pairs)


# ------------------------------------------------------------------------------------------
# fg_weight "auto"
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.01, 0.023, 0.05, 0.1, 0.2, 0.3])
def test_auto_fg_weight_gives_defects_the_share_inside_the_range(p):
    w = auto_fg_weight(p)
    assert AUTO_FG_RANGE[0] < w < AUTO_FG_RANGE[1]
    assert w * p / (w * p + 1 - p) == pytest.approx(AUTO_FG_SHARE, rel=1e-9)
    assert AUTO_FG_SHARE == 0.4


def test_auto_fg_weight_clips_and_falls_back_to_one():
    # tiny shares would need more than 100: clipped at 100 (the defects then get less than 0.4)
    for p in (1e-4, 1e-3, 0.006):
        assert auto_fg_weight(p) == 100.0
        assert 100 * p / (100 * p + 1 - p) < AUTO_FG_SHARE
    # shares of 0.4 and above would need less than 1: clipped at 1 (no weighting)
    for p in (0.4, 0.5, 0.9, 1.0):
        assert auto_fg_weight(p) == 1.0
    # no defect pixels or unknown: 1
    for p in (0.0, float("nan"), -0.1):
        assert auto_fg_weight(p) == 1.0
    # the boundaries: p where the formula gives exactly 100 or 1
    p100 = 0.4 / (0.4 + 0.6 * 100)
    assert auto_fg_weight(p100) == pytest.approx(100.0)
    assert auto_fg_weight(0.4 - 1e-9) == pytest.approx(1.0, abs=1e-6)


def test_defect_share_is_the_true_pixel_share_of_defect_images(tiny_index):
    cache = D.ImageCache(tiny_index, (SIZE, SIZE))
    hit = sum(s * s for _, s in SQUARES)
    want = hit / (len(SQUARES) * SIZE * SIZE)  # defect-free images left out
    assert defect_share(cache) == pytest.approx(want, abs=1e-12)
    # the same from the masks on disk, and not the share over all images
    masks = [np.asarray(Image.open(p)) for p in sorted((tiny_index.root / "labels").glob("*.png"))]
    on_disk = [m for m in masks if m.any()]
    assert sum(int((m != 0).sum()) for m in on_disk) == hit and len(on_disk) == len(SQUARES)
    assert defect_share(cache) != pytest.approx(hit / ((len(SQUARES) + N_FREE) * SIZE * SIZE))
    # no cached masks (mode "none"): read image by image, same figure
    assert defect_share(D.ImageCache(tiny_index, (SIZE, SIZE), mode="none")) == pytest.approx(want, abs=1e-12)


def test_defect_share_without_defect_images_is_nan(tmp_path):
    class _Idx:
        is_free = [True, True]

    class _Cache:
        index = _Idx()
        masks = np.zeros((2, 4, 4), np.uint8)

    assert math.isnan(defect_share(_Cache()))
    assert auto_fg_weight(defect_share(_Cache())) == 1.0


# ------------------------------------------------------------------------------------------
# weight_query_defects
# ------------------------------------------------------------------------------------------
def _pair(index, prompt: str, query: str, kind: str) -> D.Pair:
    return D.Pair(index.find(prompt), index.find(query), kind == "negative", kind, 0, 0, -1)


@pytest.mark.parametrize("wqd", [False, True, 3.0])
def test_weight_on_a_negative_query_defect(tiny_index, wqd):
    """A negative pair with an empty target: the query's own defect weighs fg_weight with
    weight_query_defects True, the number given (3), 1 without; the prompt's defect fg_weight either way."""
    fg = 7.0
    pair = _pair(tiny_index, "dent_000.png", "scratch_002.png", "negative")
    it = _eval_ds(tiny_index, [pair], fg_weight=fg, negative_target="empty", weight_query_defects=wqd)[0]
    assert it["kind"] == "negative"
    h = SIZE
    valid, labels = it["valid"], it["labels"]
    assert valid.shape == (3, 2 * h, SIZE)
    assert not labels[h:].any()  # the target leaves the query's defect out
    q_defect = torch.from_numpy(np.asarray(Image.open(tiny_index.root / "labels" / "scratch_002.png")) != 0)
    assert q_defect.sum() == 64
    q_valid = valid[:, h:]
    expected = wqd if not isinstance(wqd, bool) else (fg if wqd else 1.0)
    assert (q_valid[:, q_defect] == expected).all()
    assert (q_valid[:, ~q_defect] == 1.0).all()
    p_fg = labels[:h] > 0
    assert p_fg.sum() == 16 and (valid[:, :h][:, p_fg] == fg).all() and (valid[:, :h][:, ~p_fg] == 1.0).all()


@pytest.mark.parametrize("wqd", [False, True, 3.0])
def test_weight_on_a_positive_target(tiny_index, wqd):
    fg = 7.0
    pair = _pair(tiny_index, "dent_000.png", "dent_001.png", "positive")
    it = _eval_ds(tiny_index, [pair], fg_weight=fg, negative_target="empty", weight_query_defects=wqd)[0]
    fgm = it["labels"] > 0
    assert fgm[SIZE:].sum() == 36 and fgm[:SIZE].sum() == 16
    assert (it["valid"][:, fgm] == fg).all() and (it["valid"][:, ~fgm] == 1.0).all()


def test_weight_query_defects_changes_nothing_at_fg_weight_one(tiny_index):
    pair = _pair(tiny_index, "dent_000.png", "scratch_002.png", "negative")
    it = _eval_ds(tiny_index, [pair], fg_weight=1.0, negative_target="empty", weight_query_defects=True)[0]
    assert (it["valid"] == 1.0).all()


# ------------------------------------------------------------------------------------------
# collapse_of
# ------------------------------------------------------------------------------------------
def test_collapse_of_from_shares():
    assert collapse_of(0.0, 0.02) == "nothing"
    assert collapse_of(T.COLLAPSE_NOTHING / 2, 0.02) == "nothing"
    assert collapse_of(0.95, 0.02) == "everything"
    assert collapse_of(1.0, 0.5) == "everything"
    assert collapse_of(0.03, 0.02) == ""
    assert collapse_of(0.5, 0.02) == ""  # paints a lot, but not everything
    # a true share that is itself (almost) nothing or everything: no collapse by the shares
    assert collapse_of(0.0, 0.0) == ""
    assert collapse_of(1.0, 0.95) == ""
    assert collapse_of(0.0, float("nan")) == ""


def _summary(miou, catch, yld, free, pes, base_nothing=None, base_every=None):
    return {"miou": miou, "catch_rate": catch, "yield_rate": yld, "free_yield_rate": free, "pes": pes,
            "baselines": {"paint_nothing": base_nothing or {"miou": 0.0, "catch_rate": 0.0, "yield_rate": 1.0,
                                                            "free_yield_rate": 1.0, "pes": 0.5},
                          "paint_everything": base_every or {"miou": 0.03, "catch_rate": 0.0, "yield_rate": 0.0,
                                                             "free_yield_rate": 0.0, "pes": 0.0}}}


def test_collapse_of_flags_a_trivially_baseline_summary():
    nothing = _summary(0.0, 0.0, 1.0, 1.0, 0.5)
    assert M.trivial_baseline(nothing) == "paint_nothing"
    # the shares alone say nothing (true share 0), the summary says "nothing"
    assert collapse_of(0.0005, 0.0, nothing) == "nothing"
    everything = _summary(0.032, 0.0, 0.0, 0.0, 0.0)
    assert M.trivial_baseline(everything) == "paint_everything"
    assert collapse_of(0.5, 0.95, everything) == "everything"
    good = _summary(0.4, 0.7, 0.6, 0.8, 0.65)
    assert M.trivial_baseline(good) is None and collapse_of(0.03, 0.02, good) == ""
    # one figure off by more than the tolerance: not the baseline
    near = _summary(0.0, 0.0, 1.0 - 2 * M.BASELINE_TOL, 1.0, 0.5)
    assert M.trivial_baseline(near) is None and collapse_of(0.0005, 0.0, near) == ""
    assert M.trivial_baseline(_summary(0.0, 0.0, 1.0 - M.BASELINE_TOL / 2, 1.0, 0.5)) == "paint_nothing"
    msg = collapse_message("everything", 12, 0.97, 0.02)
    assert "step 12" in msg and "everything" in msg and "lower fg_weight" in msg


# ------------------------------------------------------------------------------------------
# tiny training runs
# ------------------------------------------------------------------------------------------
def _cfg(synth: Path, tmp_path: Path, **kw) -> TrainConfig:
    d = dict(
        preset=TINY_PRESET, train_dataset_dir=str(synth), val_dataset_dir=str(synth), lr=1e-3,
        warmup_steps=2, cycle_steps=1000, batch_size=4, epoch=100, max_steps=4, num_workers=0, eval_per_epoch=3,
        log_dir=str(tmp_path / "runs"), run_id="r", val_pairs=8, log_interval=1, fg_weight=10.0, seed=0,
        defect_color=[255, 255, 255], query_mask_share=0.5,
    )
    d.update(kw)
    return TrainConfig.from_dict(d)


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _val_rows(rows):
    return [r for r in rows if r["val_pes"] not in ("", "nan")]


def test_forced_collapse_warns_and_is_recorded(synth, tmp_path, monkeypatch):
    """The model's snapped output forced to "defect everywhere": every validation warns, metrics.csv
    says so in ``collapse``, the result too, and fg_frac (the training batch's painted share) is 1."""

    def paint_everything(pred_img, palette, mean, std):
        h = pred_img.shape[-2] // 2
        return torch.ones((pred_img.shape[0], h, pred_img.shape[-1]), dtype=torch.long)

    monkeypatch.setattr(T, "_snap_query", paint_everything)
    with pytest.warns(CollapseWarning, match="paints everything") as rec:
        result = train(_cfg(synth, tmp_path), progress=False)
    rows = _metrics(result.run_dir)
    vals = _val_rows(rows)
    assert len(vals) >= 2
    assert len([w for w in rec if issubclass(w.category, CollapseWarning)]) == len(vals)
    assert "collapse" in rows[0]
    assert all(r["collapse"] == "everything" for r in vals)
    assert all(r["collapse"] == "" for r in rows if r not in vals)
    assert all(float(r["val_fg_frac"]) == 1.0 for r in vals)
    assert all(float(r["fg_frac"]) == 1.0 for r in rows)
    assert result.collapse == "everything"
    assert result.collapse_steps == [int(r["step"]) for r in vals]
    # every headline figure equals paint everything's: catch 0, yields 0, PES 0
    assert all(float(r["val_pes"]) == 0.0 and float(r["val_catch"]) == 0.0 for r in vals)
    # the best checkpoint is a collapsed one (no other exists), and says so
    assert result.best_val["collapse"] == "everything"


def test_forced_nothing_collapse(synth, tmp_path, monkeypatch):
    def paint_nothing(pred_img, palette, mean, std):
        h = pred_img.shape[-2] // 2
        return torch.zeros((pred_img.shape[0], h, pred_img.shape[-1]), dtype=torch.long)

    monkeypatch.setattr(T, "_snap_query", paint_nothing)
    with pytest.warns(CollapseWarning, match="paints nothing"):
        result = train(_cfg(synth, tmp_path, max_steps=2, eval_per_epoch=6, fg_weight="auto"), progress=False)
    vals = _val_rows(_metrics(result.run_dir))
    assert vals and all(r["collapse"] == "nothing" for r in vals)
    assert all(float(r["val_pes"]) == 0.5 for r in vals)  # paint nothing: catch 0, yield 1
    assert result.collapse == "nothing" and result.collapse_steps == [int(r["step"]) for r in vals]
    # fg_weight "auto": resolved from the training set's defect share
    assert 0.0 < result.defect_share < 0.4
    assert result.fg_weight == pytest.approx(auto_fg_weight(result.defect_share)) and result.fg_weight > 1.0


def test_normal_run_fg_frac_and_best_by_pes(synth, tmp_path):
    """An unforced run: fg_frac is the painted share of the training batch (in [0, 1], on every
    row), and checkpoints/best is the validation with the highest PES among those without a
    collapse (the later on a tie)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)  # a 6-step model may well paint nothing yet
        result = train(_cfg(synth, tmp_path, max_steps=6), progress=False)
    rows = _metrics(result.run_dir)
    fg = [float(r["fg_frac"]) for r in rows]
    assert len(fg) == 6 and all(0.0 <= v <= 1.0 for v in fg)
    # with half of the target patches visible the model copies them: it paints something
    assert max(fg) > 0.0
    vals = _val_rows(rows)
    assert len(vals) >= 2
    keys = [((0.0 if r["collapse"] else 1.0), float(r["val_pes"]), int(r["step"])) for r in vals]
    assert result.select_by == "pes" and result.best_step == max(keys)[2]
    assert result.best_score == pytest.approx(max(keys)[1])


# scripted validations: step -> (pes, positive mIoU, collapse)
SCRIPT = {2: (0.55, 0.10, ""), 4: (0.70, 0.05, ""), 6: (0.90, 0.00, "nothing"), 8: (0.60, 0.30, "")}


def _scripted_evaluate(self):
    pes, miou, collapse = SCRIPT[self.step]
    return {"val_loss": 1.0, "val_miou": miou, "val_fg_frac": 0.01, "val_pes": pes, "val_catch": 0.5,
            "val_yield_neg": 0.5, "val_yield_free": 0.5, "val_miou_pos": miou, "val_miou_neg": 0.0,
            "val_gt_frac": 0.02, "collapse": collapse}


@pytest.mark.parametrize("select_by, want_step", [("pes", 4), ("miou", 8)])
def test_select_by_keeps_the_best_validation(synth, tmp_path, monkeypatch, select_by, want_step):
    """Validations at steps 2, 4, 6, 8 (scripted): by PES the best is step 4 (step 6 scores more but
    collapsed), by mIoU step 8; TrainResult.best_step, metrics.csv and checkpoints/best agree."""
    monkeypatch.setattr(Trainer, "evaluate", _scripted_evaluate)
    # 24 images / batch 4 = 6 steps per epoch, 3 validations per epoch: every 2 steps
    result = train(_cfg(synth, tmp_path, max_steps=8, select_by=select_by), progress=False)
    vals = _val_rows(_metrics(result.run_dir))
    assert [int(r["step"]) for r in vals] == sorted(SCRIPT)
    col = "val_pes" if select_by == "pes" else "val_miou_pos"
    ok = [r for r in vals if not r["collapse"]] if select_by == "pes" else vals
    best_row = max(ok, key=lambda r: float(r[col]))
    assert int(best_row["step"]) == want_step == result.best_step
    assert result.best_score == pytest.approx(float(best_row[col]))
    assert result.best_val["val_pes"] == pytest.approx(SCRIPT[want_step][0])
    assert result.best_miou == pytest.approx(SCRIPT[want_step][1])
    assert T.checkpoint_step(result.run_dir / "checkpoints" / "best") == want_step
    assert result.collapse == "" and result.collapse_steps == [6]


# ------------------------------------------------------------------------------------------
# the results page: a collapse shown loudly, figures equal to a trivial baseline marked
# ------------------------------------------------------------------------------------------
BASELINES = {"paint_nothing": {"miou": 0.0, "catch_rate": 0.0, "negative_miou": 0.4, "yield_rate": 1.0,
                               "free_yield_rate": 1.0, "pes": 0.5},
             "paint_everything": {"miou": 0.03, "catch_rate": 0.0, "negative_miou": 0.03, "yield_rate": 0.0,
                                  "free_yield_rate": 0.0, "pes": 0.0}}


def _page_summary(headline: dict, **kw) -> dict:
    s = {"status": "complete", "headline": headline, "baselines": BASELINES,
         "published": {"positive_miou": 0.541, "catch_rate": 0.91, "negative_miou": 0.527, "yield_rate": 0.182,
                       "pes": 0.546, "miou_grid_2": 0.538},
         "eval_grid": 2, "top_k": 1, "thresholds": {"catch_iou": 0.3, "yield_response": 0.000239}}
    s.update(kw)
    return s


SILENT = {"miou_grid_2": 0.0, "positive_miou": 0.0, "catch_rate": 0.0, "negative_miou": 0.4, "yield_rate": 1.0,
          "free_yield_rate": 1.0, "pes": 0.5}
GOOD = {"miou_grid_2": 0.45, "positive_miou": 0.45, "catch_rate": 0.7, "negative_miou": 0.1, "yield_rate": 0.6,
        "free_yield_rate": 0.8, "pes": 0.65}


def _headline_cells(page: str) -> str:
    return page.split("<h2>Headline</h2>", 1)[1].split("</table>", 1)[0]


def test_results_page_warns_of_a_collapse_and_marks_baseline_figures(tmp_path):
    from seggpt_lib.experiments import report as REP

    s = _page_summary(dict(SILENT), collapse="nothing", collapse_steps=[50, 100], trivial_baseline="paint_nothing")
    page = REP.write_index_html(tmp_path, s).read_text(encoding="utf-8")
    top = page.split("<h2>Headline</h2>", 1)[0]  # the warnings come before the headline
    assert "class=warn" in top and "TRAINING COLLAPSED" in top and "paints NOTHING" in top
    assert "50, 100" in top and "Train longer or raise fg_weight" in top
    assert "every headline figure on the test pairs equals the paint nothing baseline" in top
    cells = _headline_cells(page)
    # positive mIoU 0 = paint nothing; catch 0 = both; negative mIoU 0.4, yield 1, free yield 1, PES 0.5 = paint nothing
    # and the grid's mIoU 0; the original's figures are never marked
    assert cells.count("(= paint nothing)") == 6 and cells.count("(= paint nothing, paint everything)") == 1
    table = REP.headline_table(s)
    marks = REP.baseline_marks(table)
    assert set(col for _, col in marks) == {"ours"} and len(marks) == 7
    row = {m: i for i, m in enumerate(table["metric"])}
    assert marks[(row["PES"], "ours")] == "= paint nothing"
    assert marks[(row["catch rate"], "ours")] == "= paint nothing, paint everything"
    assert "training collapse</td><td>nothing (validation steps 50, 100)" in page


def test_results_page_everything_collapse(tmp_path):
    from seggpt_lib.experiments import report as REP

    head = {"positive_miou": 0.03, "catch_rate": 0.0, "negative_miou": 0.03, "yield_rate": 0.0, "free_yield_rate": 0.0,
            "pes": 0.0, "calibrated_positive_miou": 0.03, "calibrated_catch_rate": 0.0, "calibrated_yield_rate": 0.0,
            "calibrated_pes": 0.0}
    s = _page_summary(head, collapse="everything", collapse_steps=[4], trivial_baseline="paint_everything")
    page = REP.write_index_html(tmp_path, s).read_text(encoding="utf-8")
    top = page.split("<h2>Headline</h2>", 1)[0]
    assert "paints EVERYTHING" in top and "Lower fg_weight" in top and "paint everything baseline" in top
    cells = _headline_cells(page)
    assert "(= paint everything)" in cells and "(= paint nothing)" not in cells
    marks = REP.baseline_marks(REP.headline_table(s))
    assert {col for _, col in marks} == {"ours", "calibrated"}  # the calibrated figures are marked too


def test_results_page_without_collapse_is_quiet(tmp_path):
    from seggpt_lib.experiments import report as REP

    s = _page_summary(dict(GOOD), collapse=None, collapse_steps=[], trivial_baseline=None)
    page = REP.write_index_html(tmp_path, s).read_text(encoding="utf-8")
    assert "class=warn" not in page and "COLLAPSE" not in page and "(= paint" not in page
    assert "training collapse</td><td>none" in page
    # one figure equal to a baseline (yield 1 = paint nothing's) is marked; no warning box
    s = _page_summary({**GOOD, "yield_rate": 1.0}, collapse=None, collapse_steps=[], trivial_baseline=None)
    page = REP.write_index_html(tmp_path, s).read_text(encoding="utf-8")
    assert "class=warn" not in page and _headline_cells(page).count("(= paint nothing)") == 1
    # within the tolerance (below one pair in 200) counts as equal, beyond it does not
    near = {**GOOD, "pes": 0.5 + M.BASELINE_TOL / 2, "catch_rate": 2 * M.BASELINE_TOL}
    marks = REP.baseline_marks(REP.headline_table(_page_summary(near)))
    assert len(marks) == 1


def test_build_summary_carries_the_training_collapse(tmp_path):
    from seggpt_lib.experiments import report as REP
    from seggpt_lib.experiments import results as RES

    RES.write_fragment(tmp_path, RES.TrainingFragment(preset="vit_nano", trained=True, steps_done=8,
                                                      collapse="everything", collapse_steps=[4, 8]))
    evs = {"miou": 0.03, "catch_rate": 0.0, "negative_miou": 0.03, "yield_rate": 0.0, "free_yield_rate": 0.0,
           "pes": 0.0, "baselines": BASELINES}
    RES.write_fragment(tmp_path, RES.PairEvaluationFragment(summary=evs, grid=2, top_k=1))
    s = REP.build_summary(tmp_path)
    assert s["collapse"] == "everything" and s["collapse_steps"] == [4, 8]
    assert s["trivial_baseline"] == "paint_everything"
    page = REP.write_index_html(tmp_path, s).read_text(encoding="utf-8")
    assert "TRAINING COLLAPSED" in page and "4, 8" in page and "(= paint everything)" in page
    # a summary written before these keys: the collapse from its training fragment, the
    # baseline from its headline
    old = {k: v for k, v in s.items() if k not in ("collapse", "collapse_steps", "trivial_baseline")}
    assert REP.training_collapse(old) == ("everything", [4, 8])
    page = REP.write_index_html(tmp_path, old).read_text(encoding="utf-8")
    assert "TRAINING COLLAPSED" in page and "paint everything baseline" in page
    # no collapse in the fragment: no warning
    RES.write_fragment(tmp_path, RES.TrainingFragment(preset="vit_nano", trained=True, steps_done=8))
    RES.write_fragment(tmp_path, RES.PairEvaluationFragment(summary={**evs, **{k: GOOD[k] for k in (
        "catch_rate", "yield_rate", "free_yield_rate", "pes")}, "miou": 0.45}, grid=2, top_k=1))
    s = REP.build_summary(tmp_path)
    assert s["collapse"] is None and s["collapse_steps"] == [] and s["trivial_baseline"] is None
    assert "class=warn" not in REP.write_index_html(tmp_path, s).read_text(encoding="utf-8")


def test_baseline_note_for_notebook_04():
    from seggpt_lib.experiments import report as REP

    silent = {"miou": 0.0, "catch_rate": 0.0, "negative_miou": 0.4, "yield_rate": 1.0, "free_yield_rate": 1.0,
              "pes": 0.5, "baselines": BASELINES}
    note = REP.baseline_note(silent)
    assert note.startswith("**WARNING: every figure equals the paint nothing baseline's")
    assert "PES 0.500 = paint nothing" in note and "catch rate 0.000 = paint nothing, paint everything" in note
    good = {k: GOOD[k] for k in ("catch_rate", "yield_rate", "free_yield_rate", "pes", "negative_miou")}
    good.update(miou=0.45, baselines=BASELINES)
    assert REP.baseline_note(good) == ""
    cal = {**good, "calibrated": {"miou": 0.0, "catch_rate": 0.0, "negative_miou": 0.4, "yield_rate": 1.0,
                                  "free_yield_rate": 1.0, "pes": 0.5}}
    note = REP.baseline_note(cal)
    assert "WARNING" not in note and "PES (calibrated) 0.500 = paint nothing" in note
    from seggpt_lib.experiments.evaluation import comparison_table

    col = REP.baseline_column(comparison_table(cal))
    assert col[-1] == "calibrated = paint nothing" and col[0] == "calibrated = paint nothing"


# ------------------------------------------------------------------------------------------
# val_prompt_auroc: does the prompt change what is painted (threshold-free)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("painter, want", [("oracle", 1.0), ("ignores_prompt", 0.5)])
def test_prompt_auroc_tells_a_prompt_reader_from_a_defect_painter(synth, tmp_path, monkeypatch, painter, want):
    """Validation with a scripted model: one that paints exactly its target (the prompt's class on
    positives, nothing on negatives) scores AUROC 1; one that paints every defect of the query
    whatever the prompt scores 0.5, though both catch every positive."""
    from seggpt_lib.utils.colors import normalize
    trainer = Trainer(_cfg(synth, tmp_path, val_pairs=24, negative_target="empty"))
    model, seen = trainer.model, {}
    real_inputs = D.model_inputs

    def keep_batch(batch, device=None, non_blocking=True):
        seen["batch"] = batch
        return real_inputs(batch, device, non_blocking)

    def scripted(imgs, tgts, bool_masked_pos=None, valid=None, seg_type=None, **kw):
        if painter == "oracle":
            paint = tgts
        else:
            h = tgts.shape[-2] // 2
            white = seen["batch"]["query_defects"].float()[:, None].expand(-1, 3, -1, -1) * 255.0
            paint = tgts.clone()
            paint[:, :, h:] = normalize(white, trainer.cfg.image_mean, trainer.cfg.image_std)
        pred = model.patchify(paint)
        return torch.zeros(()), pred, bool_masked_pos

    monkeypatch.setattr(D, "model_inputs", keep_batch)
    monkeypatch.setattr(model, "forward", scripted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        val = trainer.evaluate()
    kinds = [it["kind"] for it in trainer.val_ds]
    assert kinds.count("positive") >= 3 and kinds.count("negative") >= 3
    assert val["val_catch"] == 1.0  # both paint every positive's defect
    assert val["val_prompt_auroc"] == pytest.approx(want)
