"""``seggpt reproduce`` and the helpers of seggpt_lib.experiments (config, results, report, runner) and viz: config handling,
tables, fragments, summary and index, a failing stage's message, the end-to-end tiny run, and
the HTML pages in headless Chromium (skipped where no browser is on PATH)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seggpt_lib.experiments import config as CFG
from seggpt_lib.experiments import dataset as DS
from seggpt_lib.experiments import evaluation as EV
from seggpt_lib.experiments import report as REP
from seggpt_lib.experiments import results as RES
from seggpt_lib.experiments import runner as RUN
from seggpt_lib.experiments import viz as V

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
def test_config_file_and_overrides(tmp_path):
    cfg = CFG.load_config(REPO / "configs" / "pipeline.json")
    assert cfg["preset"] == "vit_micro" and cfg["data"] == "synthetic" and cfg["device"] == "cpu"
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["negative_target"] == "empty" and cfg["train"]["batch_size"] == 16
    assert cfg["train_minutes"] is None and cfg["steps"] > 0 and cfg["grids"] == [1, 2, 4]
    cfg = CFG.load_config(REPO / "configs" / "pipeline.json",
                        ["steps=0", "device=cuda", "weights=w.pth", "train.lr=1e-4", "grids=[1,2]", "data=coco:/x"])
    assert cfg["steps"] == 0 and cfg["device"] == "cuda" and cfg["weights"] == "w.pth"
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["batch_size"] == 16  # nested keys merge
    assert cfg["grids"] == [1, 2] and cfg["data"] == "coco:/x"
    assert set(cfg["_explicit"]) == {"steps", "device", "weights", "train", "grids", "data"}
    with pytest.raises(CFG.PipelineError, match="unknown key 'stepz'"):
        CFG.load_config(None, ["stepz=3"])
    with pytest.raises(CFG.PipelineError, match="key=value"):
        CFG.load_config(None, ["steps"])
    with pytest.raises(CFG.PipelineError, match="steps must be"):
        CFG.load_config(None, {"steps": -1})
    with pytest.raises(CFG.PipelineError, match="tile_pairing"):
        CFG.load_config(None, {"tile_pairing": "some"})
    with pytest.raises(CFG.PipelineError, match="unknown key 'splits'.*grids"):  # renamed: tiling is a grid
        CFG.load_config(None, {"splits": [1]})
    with pytest.raises(CFG.PipelineError, match="val_pairs must be"):  # typed
        CFG.load_config(None, {"val_pairs": "many"})
    with pytest.raises(CFG.PipelineError, match="unknown TrainConfig key"):
        CFG.load_config(None, ["train.lrr=1"])
    with pytest.raises(CFG.PipelineError, match="not found"):
        CFG.load_config(tmp_path / "missing.json")
    smoke = CFG.load_config(None, ["steps=5"], smoke=True)
    assert smoke["steps"] == 5 and smoke["preset"] == "vit_nano" and smoke["synthetic"]["size"] == 64


def test_data_spec(tmp_path):
    assert CFG.parse_data_spec("synthetic") == ("synthetic", "")
    assert CFG.parse_data_spec("") == ("synthetic", "")
    (tmp_path / "ds").mkdir()
    assert CFG.parse_data_spec(f"coco:{tmp_path / 'ds'}") == ("coco", str((tmp_path / "ds").resolve()))
    assert CFG.parse_data_spec(f"magnetic_tile:{tmp_path / 'ds'}")[0] == "magnetic_tile"
    assert CFG.parse_data_spec(str(tmp_path / "ds")) == ("folder", str((tmp_path / "ds").resolve()))
    assert CFG.parse_data_spec("ds", base=tmp_path)[1] == str((tmp_path / "ds").resolve())
    with pytest.raises(CFG.PipelineError, match="not found"):
        CFG.parse_data_spec(f"coco:{tmp_path / 'nope'}")


def test_notebook_parameters():
    cfg = CFG.load_config(REPO / "configs" / "pipeline.json", ["weights=some/w.pth", "results_dir=out"])
    p2 = RUN.notebook_parameters("02_training", cfg)
    assert p2["preset"] == "auto"  # weights without an explicit preset: the checkpoint's architecture
    assert Path(p2["weights"]).is_absolute() and Path(p2["results_dir"]).is_absolute()
    p2 = RUN.notebook_parameters("02_training", CFG.load_config(None, ["weights=w.pth", "preset=vit_large"]))
    assert p2["preset"] == "vit_large"
    p1 = RUN.notebook_parameters("01_data_transformation", CFG.load_config(None))
    assert p1["source"] == "synthetic" and p1["source_path"] == ""
    for name in CFG.NOTEBOOKS:  # evaluation notebooks take the weights notebook 02 wrote, not the initial ones
        assert ("weights" in RUN.notebook_parameters(name, cfg)) == (name in ("01_data_transformation", "02_training",
                                                                            "05_beyond"))  # 05 trains from them too
    p6 = RUN.notebook_parameters("05_beyond", cfg)
    assert p6["preset"] == "auto" and p6["beyond_minutes"] is None and p6["train_minutes"] == cfg["train_minutes"]


def test_resolve_preset(tmp_path):
    from seggpt_lib import build_seggpt, save_weights

    model = build_seggpt(CFG.SMOKE["preset"])
    w = save_weights(model, tmp_path / "m.safetensors")
    name, ov = CFG.resolve_preset(str(w), "auto")
    assert name in CFG.PRESETS and CFG.preset_config(name, **ov).to_dict() == model.cfg.to_dict()  # closest preset + overrides
    assert CFG.model_config("auto", weights=str(w)).embed_dim == 64
    assert CFG.resolve_preset("", "vit_tiny") == ("vit_tiny", {})
    with pytest.raises(CFG.PipelineError, match="needs weights"):
        CFG.resolve_preset("", "auto")


def test_prepare_data_sources(tmp_path):
    from data_prep.common import DataPrepError
    from data_prep.prepare import prepare_data
    from data_prep.synthetic import generate_synthetic

    info = prepare_data(tmp_path / "w1", "synthetic", synthetic={"per_class": 3, "size": 32}, log=lambda m: None)
    split = Path(info["split_root"])
    assert set(DS.split_roots(split)) == {"train", "val", "test"} and not info["reused"]
    again = prepare_data(tmp_path / "w1", "synthetic", synthetic={"per_class": 3, "size": 32}, log=lambda m: None)
    assert again["reused"]  # same settings: the earlier build is kept
    other = prepare_data(tmp_path / "w1", "synthetic", synthetic={"per_class": 3, "size": 32}, split_seed=1,
                           log=lambda m: None)
    assert not other["reused"]
    counts = DS.class_counts(split)
    assert counts["total"].iloc[-1] == 9 * 3 + 3 and counts["class"].iloc[-1] == "all"
    # a folder in our layout is split; a folder already split is used in place
    root = generate_synthetic(tmp_path / "own", per_class=3, size=32, classes=["pit", "stain"])
    info = prepare_data(tmp_path / "w2", "folder", str(root), log=lambda m: None)
    assert Path(info["split_root"]) == tmp_path / "w2" / "data" / "split"
    info = prepare_data(tmp_path / "w3", "folder", info["split_root"], log=lambda m: None)
    assert info["split_root"] == str(tmp_path / "w2" / "data" / "split") and info["reused"]
    with pytest.raises(DataPrepError, match="neither a dataset"):
        prepare_data(tmp_path / "w4", "folder", str(tmp_path), log=lambda m: None)
    with pytest.raises(DataPrepError, match="source must be"):
        prepare_data(tmp_path / "w4", "zip")


def test_prepare_magnetic_tile(tmp_path):
    from conftest import shared_dataset

    from data_prep.prepare import prepare_data, stats_table

    src = shared_dataset("magnetic_tile")
    if src is None:
        pytest.skip("the magnetic-tile dataset is not in ../shared/datasets")
    info = prepare_data(tmp_path / "w", "magnetic_tile", str(src), limit_per_class=4, log=lambda m: None)
    counts = DS.class_counts(info["split_root"])
    assert "free" in set(counts["class"]) and counts["total"].iloc[-1] >= 5 * 4
    stats = stats_table(info["split_root"])
    assert ((stats["mean_r"] > 0) & (stats["mean_r"] < 1)).all()


# ------------------------------------------------------------------------------------------
# tables, fragments, summary, index
# ------------------------------------------------------------------------------------------
def test_tables_and_fragments(tmp_path):
    df = pd.DataFrame({"name": ["a|b", "c"], "iou": [0.5, float("nan")], "response_rate": [0.000123, 0.5],
                       "ok": [True, False]})
    md = RES.markdown_table(df)
    assert md.splitlines()[0] == "| name | iou | response_rate | ok |"
    assert "| a\\|b | 0.5000 | 0.000123 | yes |" in md and "| c | – | 0.5000 | no |" in md
    assert RES.write_table(df, tmp_path, "t1", title="T") is df
    assert pd.read_csv(tmp_path / "tables" / "t1.csv").shape == (2, 4)
    assert (tmp_path / "tables" / "t1.md").read_text().startswith("### T")
    RES.write_fragment(tmp_path, "x", {"a": float("nan"), "b": np.float32(0.25), "c": [np.int64(3)], "p": Path("q")})
    assert RES.read_fragment(tmp_path, "x") == {"a": None, "b": 0.25, "c": [3], "p": "q"}
    assert RES.read_fragment(tmp_path, "nothing", required=False) is None
    with pytest.raises(CFG.PipelineError, match="run notebook nothing first"):
        RES.read_fragment(tmp_path, "nothing")
    path = RES.save_figure(V.bar_chart(df, "name", ["iou"]), tmp_path, "f1", show=False)
    assert path.read_bytes()[:4] == b"\x89PNG"


def _fake_fragments(results: Path) -> None:
    from seggpt_lib.eval.metrics import PairResult, evaluate

    gt = np.zeros((10, 10), bool)
    gt[2:5, 2:5] = True
    recs = [PairResult("a_1.png", ["a_2.png"], "positive", "a", gt, gt),
            PairResult("a_1.png", ["b_2.png"], "negative", "a", np.zeros_like(gt), gt),
            PairResult("free_1.png", ["a_2.png"], "free", "free", gt, np.zeros_like(gt))]
    silent = [PairResult(r.query, r.prompts, r.kind, r.query_class, np.zeros_like(gt), r.gt) for r in recs]
    _, summary = evaluate(recs, calibrated=silent)
    RES.write_fragment(results, RES.DataFragment(source="synthetic", images={"total": 3}, classes=["a"]))
    RES.write_fragment(results, RES.TrainingFragment(preset="vit_micro", weights_label="w.safetensors", steps_done=7,
                                                     trained=True))
    RES.write_fragment(results, RES.GridAblationFragment(top_k=1, table=[
        {"grid": 1, "top_k": 1, "mIoU": 0.25}, {"grid": 2, "top_k": 1, "mIoU": 0.5}, {"grid": 2, "top_k": 3, "mIoU": 0.6}]))
    RES.write_fragment(results, RES.PairEvaluationFragment(
        summary=summary, grid=2, top_k=1, device="cpu", curve={"auc_negative": 0.75, "auc_free": 0.25},
        operating_point={"path": "work/operating_point.json", "objective": "max_pes", "yield_target": None,
                         "default": {"pixel_threshold": 0.5, "min_area": 16, "image_score": "max_area",
                                     "image_threshold": 40.0, "consistency_threshold": None},
                         "per_class": {}, "validation": {"n_pairs": 12}},
        consistency={"auroc": 0.5, "sentence": "The prompt consistency does not separate them."}))


def test_summary_and_index(tmp_path):
    _fake_fragments(tmp_path)
    (tmp_path / "reports").mkdir(exist_ok=True)
    (tmp_path / "reports" / "01_data_transformation.html").write_text("<html></html>")
    s = REP.build_summary(tmp_path, CFG.load_config(None), {"01_data_transformation": 1.0}, 12.5)
    h = s["headline"]
    assert h["miou_grid_1"] == 0.25 and h["miou_grid_2"] == 0.5 and h["miou_grid_2_top3"] == 0.6
    assert h["positive_miou"] == 1.0 and h["catch_rate"] == 1.0 and h["yield_rate"] == 1.0
    assert h["free_yield_rate"] == 0.0 and h["pes"] == 1.0 and h["negative_miou"] == 0.0
    assert s["published"]["pes"] == 0.546 and s["published"]["miou_grid_2"] == 0.538
    assert s["eval_grid"] == 2 and set(s["fragments"]) == {f.NAME for f in RES.FRAGMENTS[:4]}
    assert s["baselines"]["paint_nothing"]["pes"] == 0.5
    for k in ("data", "preset", "weights", "device", "wall_time_s", "git_commit", "steps"):
        assert k in s
    assert s["preset"] == "vit_micro" and s["steps"] == 7 and s["wall_time_s"] == 12.5
    json.dumps(s, allow_nan=False)  # strict JSON: no NaN
    # the calibrated row beside the raw one (the raw keys unchanged), the AUCs, the operating point
    assert h["calibrated_catch_rate"] == 0.0 and h["calibrated_yield_rate"] == 1.0 and h["calibrated_pes"] == 0.5
    assert h["calibrated_free_yield_rate"] == 1.0 and h["auc_negative"] == 0.75 and h["auc_free"] == 0.25
    assert s["operating_point"]["default"]["min_area"] == 16 and s["operating_point"]["path"] == "work/operating_point.json"
    table = REP.headline_table(s)
    assert list(table["metric"])[:3] == ["mIoU grid 1", "mIoU grid 2", "mIoU grid 2, top-3"]
    t = table.set_index("metric")
    assert t.loc["PES", "original"] == 0.546 and t.loc["PES", "ours"] == 1.0 and t.loc["PES", "calibrated"] == 0.5
    page = REP.write_index_html(tmp_path, s).read_text()
    assert "reports/01_data_transformation.html" in page and "paint_nothing" in page and "<script" not in page
    assert "0.546" in page and "positive mIoU" in page
    assert "The line&#x27;s decision" in page or "The line's decision" in page
    assert "model, raw (snapped mask)" in page and "model, calibrated on val" in page and "0.750" in page
    assert "components &gt;= 16 px" in page and "does not separate" in page


def test_failing_stage_names_notebook_and_partial_copy(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    (nbdir / "bad.py").write_text('# %% tags=["parameters"]\nx = 1\n\n# %%\nprint("first cell ran")\n\n'
                                  '# %%\nraise ValueError(f"broken on purpose {x}")\n')
    out = tmp_path / "work" / "bad.ipynb"
    with pytest.raises(CFG.PipelineError) as e:
        RUN.execute_notebook("bad", out, {"x": 2}, notebooks_dir=nbdir)
    msg = str(e.value)
    assert "notebook bad failed" in msg and "ValueError" in msg and "broken on purpose 2" in msg
    assert str(out) in msg and out.is_file()  # the partially executed copy is there
    with pytest.raises(CFG.PipelineError, match="no parameter"):
        RUN.execute_notebook("bad", out, {"y": 2}, notebooks_dir=nbdir)
    with pytest.raises(CFG.PipelineError, match="not found"):
        RUN.execute_notebook("nothing", out, {}, notebooks_dir=nbdir)


def test_cli_registration_and_errors(capsys, tmp_path):
    from seggpt_lib import cli

    assert cli.COMMANDS["reproduce"][0] == "seggpt_lib.cli.reproduce"
    assert cli.main(["reproduce", "--config", str(REPO / "configs" / "pipeline.json"), "--set", "steps=7",
                     "--set", "device=cuda", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["device"] == "cuda"  # repeated --set flags all count
    assert cli.main(["reproduce", "--config", str(tmp_path / "nope.json")]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli.main(["reproduce", "--stages", "9", "--set", f"results_dir={tmp_path}"]) == 1
    assert "unknown stage" in capsys.readouterr().err
    assert cli.main(["reproduce", "--set", f"results_dir={REPO}"]) == 1  # never clean a source tree
    assert "source tree" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# viz
# ------------------------------------------------------------------------------------------
def test_viz_helpers():
    from matplotlib.figure import Figure

    img = np.full((20, 30, 3), 100, np.uint8)
    m = np.zeros((20, 30), bool)
    m[5:10, 5:10] = True
    o = V.overlay(img, m)
    assert o.shape == img.shape and (o[7, 7] != img[7, 7]).any() and (o[0, 0] == img[0, 0]).all()
    both = V.overlay_pred_gt(img, m, m)
    assert tuple(both[7, 7]) != tuple(V.overlay_pred_gt(img, m, np.zeros_like(m))[7, 7])
    assert V.colorize(m).shape == (20, 30, 3) and V.to_rgb_uint8(m.astype(float)).dtype == np.uint8

    class Pred:
        mask, color, raw = m, V.colorize(m), V.colorize(m).astype(np.float32)

    row = V.prediction_panel_row(img, m, img, m, Pred(), size=(16, 24))
    assert len(row) == 5 and all(p.shape == (32, 24, 3) for p in row)
    fig = V.five_panel_figure([(row, "a row")], suptitle="t")
    assert isinstance(fig, Figure) and V.figure_png(fig)[:4] == b"\x89PNG"
    metrics = pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.5, 0.4], "lr": [1e-4, 1e-3, 1e-3],
                            "fg_frac": [0.1, 0.2, 0.3], "val_miou": [float("nan"), 0.2, 0.3],
                            "val_loss": [float("nan"), 0.6, 0.5], "val_fg_frac": [float("nan"), 0.1, 0.1]})
    assert isinstance(V.training_curves(metrics), Figure)
    table = pd.DataFrame({"kind": ["positive", "negative", "free"], "iou": [0.5, 0.1, 1.0],
                          "response_rate": [0.1, 0.0001, 0.0]})
    assert isinstance(V.rate_figure(table), Figure)
    assert isinstance(V.contact_sheet([img, img, img], ["a", "b", "c"], ncols=2), Figure)


def test_model_panel_rows(tmp_path):
    from data_prep.synthetic import generate_synthetic
    from seggpt_lib import build_seggpt
    from seggpt_lib.data.layout import DefectIndex
    from seggpt_lib.data.pairs import PairConfig, PairDataset

    root = generate_synthetic(tmp_path / "syn", per_class=2, size=32, classes=["pit", "stain"], n_free=0)
    model = build_seggpt(CFG.SMOKE["preset"])
    ds = PairDataset(DefectIndex.scan(root), PairConfig.for_model(model.cfg, train=False, length=2))
    rows = V.model_panel_rows(model, ds, [0, 1])
    assert len(rows) == 2 and all(len(p) == 5 and p[0].shape == (64, 32, 3) for p, _ in rows)
    assert "IoU" in rows[0][1]
    ds_train = PairDataset(DefectIndex.scan(root), PairConfig.for_model(model.cfg, train=True, length=2))
    assert isinstance(V.pair_samples_figure(ds_train, [0, 1]), object)


# ------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reproduce_end_to_end(results):
    """``seggpt reproduce --smoke`` (runs in about a minute on 2 free cores): every output."""
    s = json.loads((results / "summary.json").read_text())
    assert s["status"] == "complete"
    for k in ("miou_grid_1", "miou_grid_2", "miou_grid_4", "positive_miou", "catch_rate", "negative_miou",
              "yield_rate", "free_yield_rate", "pes"):
        v = s["headline"][k]
        assert v is not None and 0.0 <= v <= 1.0, (k, v)
    assert math.isclose(s["headline"]["pes"], 0.5 * s["headline"]["catch_rate"] + 0.5 * s["headline"]["yield_rate"])
    assert s["data"] == "synthetic" and s["preset"] == "vit_nano" and s["device"] == "cpu" and s["steps"] == 3
    assert s["wall_time_s"] > 0 and set(s["stage_times_s"]) == set(CFG.NOTEBOOKS)
    assert "git_commit" in s and s["published"]["pes"] == 0.546
    for name in CFG.NOTEBOOKS:
        assert (results / "reports" / f"{name}.html").is_file()
        assert (results / "work" / f"{name}.ipynb").is_file()
        assert (results / "work" / f"{name}.json").is_file()
    assert not list((results / "work").glob("*.input.ipynb"))
    page = (results / "index.html").read_text()
    for name in CFG.NOTEBOOKS:
        assert f"reports/{name}.html" in page
    assert "tables/headline.csv" in page and "figures/04_summary.png" in page and "PES" in page
    for k in ("calibrated_catch_rate", "calibrated_yield_rate", "calibrated_free_yield_rate", "calibrated_pes",
              "auc_negative", "auc_free"):
        v = s["headline"][k]
        assert v is not None and 0.0 <= v <= 1.0, (k, v)
    assert math.isclose(s["headline"]["calibrated_pes"],
                        0.5 * s["headline"]["calibrated_catch_rate"] + 0.5 * s["headline"]["calibrated_yield_rate"])
    assert s["operating_point"]["default"] and s["operating_point"]["path"]
    assert "model, raw (snapped mask)" in page and "model, calibrated on val" in page
    assert (results / "figures" / "04_catch_yield.png").is_file() and "figures/04_catch_yield.png" in page
    assert "calibrated" in set(pd.read_csv(results / "tables" / "headline.csv").columns)
    assert "Beyond the original" in page and "tables/05_beyond.csv" in page and "figures/05_beyond.png" in page
    rows = s["beyond"]["rows"]
    assert len(rows) == 7 and rows[-1]["prompt"] == "paint nothing"  # 2 recipes x 3 prompts + the baseline
    for r in rows:
        for k in ("mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES"):
            assert r[k] is None or 0.0 <= r[k] <= 1.0, (r, k)
    head = pd.read_csv(results / "tables" / "headline.csv")
    assert "PES" in set(head["metric"])


def test_official_format_weights_without_training(results, tmp_path):
    """``steps 0`` + weights in the official pickle layout (no recorded architecture): notebook 02
    takes them as they are, the preset comes from the tensor shapes, and the evaluation runs."""
    import torch

    from seggpt_lib import build_seggpt

    torch.manual_seed(0)
    w = tmp_path / "official_like.pth"
    torch.save({"model": build_seggpt("vit_micro").state_dict()}, w)
    assert CFG.resolve_preset(str(w), "auto") == ("vit_micro", {})
    res = tmp_path / "res"
    shutil.copytree(results / "work" / "data", res / "work" / "data")
    shutil.copy(results / "work" / "01_data_transformation.json", res / "work")
    cfg = CFG.load_config(None, ["steps=0", f"weights={w}", f"results_dir={res}", "heartbeat_s=0", "echo=false",
                               "n_panels=1"])
    RUN.reproduce(cfg, stages=["02_training"], log=lambda m: None)
    frag = RES.load_fragment(res, RES.TrainingFragment)
    assert frag.trained is False and frag.steps_done == 0 and frag.preset == "vit_micro"
    assert frag.weights == str(w.resolve()) and frag.model == {}
    assert (res / "reports" / "02_training.html").is_file() and not (res / "work" / "train" / "run").exists()
    em = EV.load_eval_model(res)
    assert em.preset == "vit_micro" and em.predictor.image_size == (64, 64)
    ev = EV.pair_evaluation(em, RES.load_fragment(res, RES.DataFragment).split_root, grid=1, max_queries=2,
                           log=lambda m: None)
    assert ev["summary"]["n_positive"] == 2 and ev["summary"]["n_negative"] == 2


def test_calibration_reads_the_validation_split_only(results, tmp_path, monkeypatch):
    """Notebook 04's calibration: collect_pairs sees the val/ folder and nothing else; inverting
    every test label changes the test figures but not the operating point; the point goes to
    RESULTS/work/ when the weights lie outside the results folder (never beside them)."""
    from PIL import Image

    split = tmp_path / "split"
    shutil.copytree(Path(RES.load_fragment(results, RES.DataFragment).split_root), split)
    em = EV.load_eval_model(results)
    beside = Path(em.weights).parent / "operating_point.json"
    before = beside.read_bytes() if beside.is_file() else None
    seen: list[Path] = []
    real = EV.collect_pairs

    def spy(predictor, root, *a, **kw):
        seen.append(Path(root).resolve())
        return real(predictor, root, *a, **kw)

    monkeypatch.setattr(EV, "collect_pairs", spy)
    res = tmp_path / "res"

    def run():
        return EV.pair_evaluation(em, split, grid=1, max_queries=3, results_dir=res, log=lambda m: None)

    a = run()
    for f in (split / "test" / "labels").iterdir():  # poison the test split: every defect mask inverted
        lab = np.asarray(Image.open(f))
        if lab.any():
            Image.fromarray(np.where(lab > 0, 0, 255).astype(np.uint8)).save(f)
    b = run()
    assert seen == [(split / "val").resolve()] * 2
    pa, pb = a["operating_point"].to_dict(), b["operating_point"].to_dict()
    for d in (pa, pb):
        d["validation"].pop("seconds")
    assert RES.jsonable(pa) == RES.jsonable(pb)  # NaN (a class without negatives) as None
    assert a["table"]["gt_pixels"].sum() != b["table"]["gt_pixels"].sum()  # the poison reached the test pairs
    assert a["operating_point_path"] == res / "work" / "operating_point.json" and a["operating_point_path"].is_file()
    assert (beside.read_bytes() if beside.is_file() else None) == before
    assert "calibrated" in a["summary"] and len(a["table"]) == len(b["table"])
    assert EV.operating_point_path(tmp_path, tmp_path / "ck" / "model.safetensors") == tmp_path / "ck" / "operating_point.json"
    assert EV.operating_point_path(tmp_path / "r", tmp_path / "model.safetensors") == tmp_path / "r" / "work" / "operating_point.json"


def test_failing_stage_in_reproduce(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    res = tmp_path / "res"
    cfg = CFG.load_config(None, [f"data={tmp_path / 'empty'}", f"results_dir={res}", "heartbeat_s=0", "echo=false"])
    lines: list[str] = []
    with pytest.raises(CFG.PipelineError) as e:
        RUN.reproduce(cfg, log=lines.append)
    msg = str(e.value)
    assert "stage 1/5 failed" in msg and "notebook 01_data_transformation failed" in msg and "neither a dataset" in msg
    assert str(res / "work" / "01_data_transformation.ipynb") in msg and "its report so far" in msg
    assert any("FAILED" in ln for ln in lines)
    s = json.loads((res / "summary.json").read_text())
    assert s["status"] == "failed" and (res / "index.html").is_file()
    assert (res / "reports" / "01_data_transformation.html").is_file()
    assert not (res / "work" / "02_training.ipynb").exists()  # later stages did not run


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--dump-dom", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_reports_render_in_headless_chromium(results, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium / chromium-browser on PATH (make test tries to install it)")
    dom = _dump_dom(browser, results / "index.html", tmp_path / "profile")
    assert "Headline" in dom and "paint_nothing" in dom and "positive mIoU" in dom and "PES" in dom
    dom = _dump_dom(browser, results / "reports" / "04_pair_evaluation.html", tmp_path / "profile")
    assert "paint nothing" in dom and "catch" in dom and "PES" in dom  # the summary table rendered
    dom = _dump_dom(browser, results / "reports" / "03_grid_ablation.html", tmp_path / "profile")
    assert "original_mIoU" in dom
