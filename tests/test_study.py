"""Beyond the original (seggpt_lib.experiments.study, notebook 05) and the magnetic-tile study.

Everything runs on a tiny synthetic set (3 defect classes, 64 px) with the 235 k-parameter
smoke model trained a couple of steps; the magnetic-tile study runs its ``--quick``
configuration where the dataset is at hand (``tests/conftest.py: shared_dataset``)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seggpt_lib.experiments import config as CFG
from seggpt_lib.experiments import report as REP
from seggpt_lib.experiments import results as RES
from seggpt_lib.experiments import runner as RUN
from seggpt_lib.experiments import study as S
from seggpt_lib.experiments import training as TR

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = CFG.SMOKE["preset"]  # the 235 k-parameter vit_nano
TINY_RECIPE = {"batch_size": 4, "warmup_steps": 1}
RATES = ["mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A split tiny synthetic set: 3 defect classes x 6 images + 3 defect-free, 64 px."""
    from data_prep.split import split_dataset
    from data_prep.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("study")
    root = generate_synthetic(base / "syn", seed=0, per_class=6, size=64, classes=("pit", "stain", "scratch"),
                              n_free=3, show_progress=False)
    return split_dataset(root, base / "split", seed=0, val=0.2, test=0.3, show_progress=False)


def _unit(values) -> None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    assert vals, "no values"
    assert all(0.0 <= v <= 1.0 for v in vals), vals


def test_compare_recipes_table(tiny, tmp_path):
    cfg = CFG.BeyondConfig(preset=TINY_PRESET, weights="", budget_minutes=None, recipe=TINY_RECIPE, steps=2,
                           eval_every=2, val_pairs=4, top_k=2, max_queries=3, tune_steps=2)
    res = S.compare_recipes(tiny, cfg, work_dir=tmp_path / "work", results_dir=tmp_path / "res", table_name="cmp",
                            log=lambda m: None)
    t = res["table"]
    assert list(t.columns[:4]) == ["recipe", "negative_target", "prompt", "steps"]
    assert {*RATES, "negative_mIoU", "n_positive", "n_negative", "n_free"} <= set(t.columns)
    assert len(t) == 2 * 3 + 1  # two recipes x (top-1, top-2 ensemble, learned) + paint nothing
    assert list(t["negative_target"][:6]) == ["query_mask"] * 3 + ["empty"] * 3
    assert list(t["method"][:3]) == ["top1", "topk", "learned"] and t["method"].iloc[-1] == "paint_nothing"
    assert t["prompt"].iloc[1] == "image prompts, top-2 ensemble" and t["prompt"].iloc[2] == "learned prompt (2 steps)"
    for c in RATES + ["negative_mIoU"]:
        _unit(t[c])
    for c in RATES:
        assert t[c].notna().all(), c
    base = t.iloc[-1]
    assert base["catch_rate"] == 0.0 and base["yield_rate"] == 1.0 and base["PES"] == 0.5
    assert (t["n_positive"] == t["n_positive"].iloc[0]).all()  # the same queries in every row
    assert 1 <= t["n_positive"].iloc[0] <= 3 and 1 <= t["n_negative"].iloc[0] <= 3
    assert (np.isclose(t["PES"], 0.5 * t["catch_rate"] + 0.5 * t["yield_rate"])).all()
    assert list(t["steps"]) == [2] * 6 + [None]  # the same budget: 2 steps each; none for the baseline
    tr = res["training"]
    assert list(tr["negative_target"]) == ["query_mask", "empty"] and not tr["reused"].any()
    for name in ("cmp", "cmp_per_image", "cmp_training"):
        assert (tmp_path / "res" / "tables" / f"{name}.csv").is_file()
        assert (tmp_path / "res" / "tables" / f"{name}.md").is_file()
    per = pd.read_csv(tmp_path / "res" / "tables" / "cmp_per_image.csv")
    assert set(per["method"]) == {"top1", "topk", "learned"} and set(per["kind"]) == {"positive", "negative", "free"}
    assert per[per["method"] == "learned"]["prompts"].str.startswith("learned:").all()
    # each class's learned prompt was written for seggpt infer --learned-prompt
    assert len(list((tmp_path / "work" / "prompts_empty").glob("*.safetensors"))) >= 1
    rows = S.headline_rows(t)
    assert len(rows) == 7 and set(rows[0]) >= {"recipe", "prompt", "PES"}
    json.dumps(rows, allow_nan=False)
    # figures from the result
    assert S.example_panels(res, n=1) is not None and S.prompt_previews(res) is not None

    # an already trained model stands in for a recipe (notebook 02's)
    again = S.compare_recipes(tiny, cfg.replace(methods=("top1",)), reuse={"empty": res["models"]["empty"]["weights"]},
                              negative_targets=("empty",), work_dir=tmp_path / "work2", log=lambda m: None)
    assert len(again["table"]) == 2 and bool(again["training"]["reused"].iloc[0])
    top1 = t[(t["negative_target"] == "empty") & (t["method"] == "top1")].iloc[0]
    assert math.isclose(again["table"]["mIoU"].iloc[0], top1["mIoU"])  # the same model, the same pairs


def test_negative_pairs_under_empty_target_are_all_background(tiny):
    from seggpt_lib.data.layout import DefectIndex
    from seggpt_lib.data.pairs import PairConfig, PairDataset
    from seggpt_lib.model.seggpt import preset_config

    cfg = preset_config(TINY_PRESET)
    index = DefectIndex.scan(tiny / "train")
    h = cfg.image_size[0]
    with_defect = {"empty": 0, "query_mask": 0}
    for target in ("empty", "query_mask"):
        for train in (True, False):
            ds = PairDataset(index, PairConfig.for_model(cfg, train=train, negative_target=target, negative_share=1.0,
                                                            length=12, seed=0))
            for i in range(len(ds)):
                item = ds[i]
                assert item["kind"] == "negative" and item["prompt_class"] != item["query_class"]
                q_half = item["labels"][h:]
                if target == "empty":
                    assert not q_half.any()  # class-aware: a negative pair asks for nothing
                else:
                    assert (q_half == item["query_label"]).all()  # the original: the query's own defect
                with_defect[target] += int(item["query_label"].any())  # though the query has a defect of its own
    assert with_defect["empty"] > 0 and with_defect["query_mask"] > 0


def test_holdout_eval_folder(tiny, tmp_path):
    from data_prep.split import split_dataset
    from data_prep.study_data import make_holdout_eval
    from seggpt_lib.data.layout import DefectIndex

    split = split_dataset(tiny.parent / "syn", tmp_path / "split", seed=0, val=0.2, test=0.3,
                          holdout_classes=["stain"], show_progress=False)
    ev = make_holdout_eval(split, tmp_path / "eval", seed=0)
    assert ev["holdout_classes"] == ["stain"]
    train, test = DefectIndex.scan(Path(ev["root"]) / "train"), DefectIndex.scan(Path(ev["root"]) / "test")
    assert "stain" not in DefectIndex.scan(split / "train").class_names  # never trained on
    assert set(test.class_names) == {"stain", "free"}
    assert not set(train.files) & set(test.files)
    assert sorted(ev["support"]["stain"] + ev["queries"]["stain"]) == sorted(
        f for f in DefectIndex.scan(split / "test").files if f.startswith("stain"))
    assert len(ev["support"]["stain"]) >= 2 and len(ev["queries"]["stain"]) >= 1
    assert set(ev["support"]["stain"]) <= set(train.files)
    with pytest.raises(ValueError, match="no held-out classes"):
        make_holdout_eval(tiny, tmp_path / "eval2")


def _tiny_results(tiny: Path, results: Path) -> None:
    """Notebooks 01 and 02's fragments for the tiny set (02: a 2-step class-aware model)."""
    RES.write_fragment(results, RES.DataFragment(split_root=str(tiny), mean=[0.5] * 3, std=[0.25] * 3))
    run_dir = RUN.training_run_dir(results)
    settings = CFG.TrainSettings(preset=TINY_PRESET, weights="", steps=2, eval_every=2, val_pairs=4,
                                 recipe={**TINY_RECIPE, "negative_target": "empty"})
    cfg = TR.training_config(tiny, run_dir, settings, log=lambda m: None)
    assert cfg.fg_weight == CFG.PIPELINE_RECIPE["fg_weight"]  # the recipe over the pipeline's
    res = TR.run_training(cfg, run_dir, log=lambda m: None)
    RES.write_fragment(results, RES.TrainingFragment.build(results, cfg, res, TR.trained_weights(run_dir), True, 0))


def test_05_notebook_with_papermill(tiny, tmp_path):
    pytest.importorskip("papermill")
    results = tmp_path / "results"
    _tiny_results(tiny, results)
    cfg = CFG.load_config(None, {"results_dir": str(results), "preset": TINY_PRESET, "weights": "", "steps": 2, "train_minutes": None,
                               "train": TINY_RECIPE, "eval_every": 2, "val_pairs": 4, "beyond_tune_steps": 2,
                               "beyond_max_queries": 3, "beyond_top_k": 2, "n_panels": 1})
    params = RUN.notebook_parameters("05_beyond", cfg)
    out = RUN.execute_notebook("05_beyond", results / "work" / "05_beyond.ipynb", params)
    assert out.is_file()
    t = pd.read_csv(results / "tables" / "05_beyond.csv")
    assert len(t) == 7 and t["recipe"].iloc[-1] == "baseline"
    for c in RATES:
        _unit(t[c])
    for f in ("05_beyond", "05_examples", "05_learned_prompts"):
        assert (results / "figures" / f"{f}.png").read_bytes()[:4] == b"\x89PNG"
    frag = RES.load_fragment(results, RES.BeyondFragment)
    assert len(frag.rows) == 7 and frag.budget_minutes is None and frag.top_k == 2 and frag.grid == 1
    trained = {r["negative_target"]: r for r in frag.training}
    assert trained["empty"]["reused"] and not trained["query_mask"]["reused"]  # 02's model, the other trained here
    assert trained["query_mask"]["steps"] == 2 == trained["empty"]["steps"]
    # the pipeline merges 05's rows into summary.json and index.html
    s = REP.build_summary(results, cfg)
    assert len(s["beyond"]["rows"]) == 7 and s["beyond"]["tune_steps"] == 2
    json.dumps(s, allow_nan=False)
    page = REP.write_index_html(results, s).read_text()
    assert "Beyond the original" in page and "class-aware negatives" in page and "learned prompt" in page


def test_05_notebook_sources_in_sync():
    jupytext = pytest.importorskip("jupytext")
    a, b = jupytext.read(REPO / "notebooks" / "05_beyond.py"), jupytext.read(REPO / "notebooks" / "05_beyond.ipynb")
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(a) == cells(b), "run `jupytext --to ipynb notebooks/05_beyond.py`"
    raw = json.loads((REPO / "notebooks" / "05_beyond.ipynb").read_text())
    assert not any(c.get("outputs") for c in raw["cells"] if c["cell_type"] == "code")
    assert "05_beyond" in CFG.NOTEBOOKS and CFG.NOTEBOOKS.index("05_beyond") == 4  # stage 5/5 of seggpt reproduce


def test_beyond_config_from_pipeline():
    p = CFG.PipelineConfig.from_dict({"train_minutes": 2.0, "beyond_grid": 2, "train": {"lr": 5e-4}})
    b = p.beyond()
    assert b.budget_minutes == 2.0 and b.grid == 2 and b.top_k == p.beyond_top_k and b.tune_steps == p.beyond_tune_steps
    assert b.full_recipe()["lr"] == 5e-4 and b.full_recipe()["fg_weight"] == CFG.PIPELINE_RECIPE["fg_weight"]
    assert b.catch_iou == CFG.CATCH_IOU and b.yield_response == CFG.YIELD_RESPONSE
    assert CFG.PipelineConfig.from_dict({"beyond_minutes": 1.0}).beyond().budget_minutes == 1.0
    assert b.train_settings("query_mask").recipe["negative_target"] == "query_mask"


def test_study_settings():
    assert S.FULL.with_overrides({"train": {"lr": 1e-4}}).train["batch_size"] == S.FULL.train["batch_size"]
    with pytest.raises(ValueError, match="unknown study setting 'stepz'"):
        S.FULL.with_overrides({"stepz": 1})
    for st in (S.QUICK, S.FULL):
        CFG.check_recipe({**CFG.PIPELINE_RECIPE, **st.train})
        assert st.pretrained == CFG.PRETRAINED_WEIGHTS  # the shipped checkpoint beside from scratch
    assert S.FULL.with_overrides({"pretrained": None}).pretrained is None
    assert S.model_key("empty") == "empty" and S.model_key("empty", "pretrained") == "empty_from_pretrained"


def test_budget_defaults():
    cfg = CFG.load_config(REPO / "configs" / "pipeline.json")
    assert cfg["beyond_minutes"] is None and cfg["train_minutes"] is None  # 05 trains as long as 02
    assert cfg["steps"] == 500  # a budget in steps: the same tables whatever the machine's load
    assert cfg["beyond_tune_steps"] >= 1 and cfg["beyond_max_queries"]
    with pytest.raises(CFG.PipelineError, match="beyond_minutes"):
        CFG.load_config(None, {"beyond_minutes": "long"})
    mt = CFG.load_config(REPO / "configs" / "magnetic_tile.json")
    assert mt["data"].startswith("magnetic_tile:") and mt["results_dir"].startswith("results/magnetic_tile")


def test_study_command_registered(capsys):
    from seggpt_lib import cli

    assert cli.COMMANDS["study"][0] == "seggpt_lib.cli.study"
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "from pretrained" in out and "without any fine-tuning" in out
    assert cli.main(["study", "--data", "/nonexistent/magnetic_tile", "--quick", "--out", "unused"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_quick_magnetic_tile_study(tmp_path):
    from conftest import shared_dataset

    from seggpt_lib.cli.study import study

    src = shared_dataset("magnetic_tile")
    if src is None:
        pytest.skip("the magnetic-tile dataset is not in ../shared/datasets")
    t0 = time.perf_counter()
    s = study(src, tmp_path / "mt", quick=True, device="cpu", log=lambda m: None)
    wall = time.perf_counter() - t0
    assert set(s["protocols"]) == {"seen", "holdout"}
    held = s["protocols"]["holdout"]["holdout_classes"]
    assert len(held) == 2 and "free" not in held
    # from scratch, and where the shipped checkpoint is there from it too plus it without fine-tuning
    models = 5 if s["pretrained"]["available"] else 2
    for proto, p in s["protocols"].items():
        rows = p["rows"]
        assert len(rows) == models * 3 + 1 and rows[-1]["prompt"] == "paint nothing"
        assert {r["init"] for r in rows[:-1]} == ({"scratch", "pretrained"} if models == 5 else {"scratch"})
        for r in rows:
            _unit([r[c] for c in ("mIoU", "catch_rate", "yield_rate", "free_yield_rate", "PES")])
        assert (tmp_path / "mt" / "tables" / f"study_{proto}.md").is_file()
        assert (tmp_path / "mt" / "figures" / f"study_{proto}.png").is_file()
    counts = {r["class"]: r for r in s["protocols"]["holdout"]["counts"]}
    for c in held:
        assert counts[c]["test"] >= 1  # queries of classes never seen in training
    text = (tmp_path / "mt" / "summary.json").read_text()
    repo = str(Path(__file__).resolve().parents[1])
    assert repo not in text  # files in the repository (the shipped checkpoint) are named relative to it
    saved = json.loads(text)
    m = saved["machine"]
    assert m["torch"] and m["platform"] and "cpu" in m and saved["quick"] is True
    print(f"quick magnetic-tile study: {wall:.1f} s")


# ------------------------------------------------------------------------------------------
# the init dimension: from scratch and from the shipped pretrained checkpoint
# ------------------------------------------------------------------------------------------
SHIPPED_ARCH = {"decoder_embed_dim": 8}  # vit_nano with a narrower decoder: not the study's architecture


@pytest.fixture(scope="module")
def cal_split(tmp_path_factory) -> Path:
    """3 defect classes x 6 images + 3 defect-free, 48 px; a validation split with two or more
    images per class (calibration has positive validation pairs)."""
    from data_prep.split import split_dataset
    from data_prep.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("initstudy")
    root = generate_synthetic(base / "syn", seed=0, per_class=6, size=48, classes=("pit", "stain", "scratch"),
                              n_free=3, show_progress=False)
    return split_dataset(root, base / "split", seed=0, val=0.4, test=0.3, show_progress=False)


@pytest.fixture(scope="module")
def shipped_dir(tmp_path_factory) -> Path:
    """A tiny "shipped" checkpoint as seggpt pretrain exports it (vit_nano, narrower decoder; random weights)."""
    import torch

    from seggpt_lib import build_seggpt, save_weights
    from seggpt_lib.experiments import pretrain as PT

    base = tmp_path_factory.mktemp("shipped")
    run = base / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    torch.manual_seed(3)
    save_weights(build_seggpt(TINY_PRESET, **SHIPPED_ARCH), run / "checkpoints" / "last" / "model.safetensors")
    PT.export_pretrained(run, PT.PretrainConfig(preset=TINY_PRESET), "test", out_dir=base / "pretrained",
                         name="vit_nano_shapes")
    return base / "pretrained"


def _prepared(split: Path, work: Path) -> dict:
    return {"work": str(work), "convert_s": 0.0, "source": str(split),
            "protocols": {"seen": {"split_root": str(split), "eval_root": str(split), "holdout_classes": [],
                                   "split_s": 0.0}}}


TINY_STUDY = dict(preset=TINY_PRESET, steps=2, minutes=None, eval_every=2, val_pairs=4, tune_steps=1, max_queries=2,
                  top_k=2, train={**TINY_RECIPE, "num_workers": 0})


@pytest.mark.timeout(120)
def test_study_from_scratch_and_from_the_shipped_checkpoint(cal_split, shipped_dir, tmp_path, monkeypatch):
    from seggpt_lib.experiments import pretrain as PT

    monkeypatch.setattr(PT, "PRETRAINED_DIR", shipped_dir)
    monkeypatch.setattr(PT, "SHIPPED_NAME", "vit_nano_shapes")
    logs: list[str] = []
    s = S.run_study(_prepared(cal_split, tmp_path / "work"), tmp_path / "out", S.StudySettings(**TINY_STUDY),
                    device="cpu", log=logs.append)  # about 10 s on an idle 2-core CPU
    p = s["protocols"]["seen"]
    t = pd.DataFrame(p["rows"])
    # (2 recipes x 2 inits + the checkpoint without fine-tuning) x 3 prompts + paint nothing
    assert len(t) == 5 * 3 + 1 and t["prompt"].iloc[-1] == "paint nothing"
    scratch, pre = t[t["init"] == "scratch"], t[t["init"] == "pretrained"]
    assert len(scratch) == 6 and len(pre) == 9
    assert set(scratch["recipe"]) == {"original negatives (query mask), from scratch",
                                      "class-aware negatives (empty), from scratch"}
    assert set(pre["recipe"]) == {"original negatives (query mask), from pretrained",
                                  "class-aware negatives (empty), from pretrained",
                                  "pretrained vit_nano_shapes, no fine-tuning"}
    # the same budget for both inits; none for the checkpoint as it is
    tuned = pre[pre["model"] != S.NO_FINETUNE]
    assert list(scratch["steps"]) == [2] * 6 and list(tuned["steps"]) == [2] * 6
    assert list(pre[pre["model"] == S.NO_FINETUNE]["steps"]) == [0] * 3
    for m in ("query_mask", "empty", "query_mask_from_pretrained", "empty_from_pretrained", S.NO_FINETUNE):
        assert list(t[t["model"] == m]["prompt"].str.split(" ").str[0]) == ["image", "image", "learned"], m
    for c in RATES:
        _unit(t[c])
    # raw and calibrated rows for every model, the no-fine-tuning one included
    dec = pd.DataFrame(p["decision_rows"])
    assert list(dec.columns[:5]) == ["recipe", "negative_target", "prompt", "decision", "init"]
    for m in ("query_mask", "empty_from_pretrained", S.NO_FINETUNE):
        for meth in ("top1", "topk", "learned"):
            assert list(dec[(dec["model"] == m) & (dec["method"] == meth)]["decision"]) == ["raw", "calibrated"]
    assert (dec["decision"] == "calibrated").sum() == 15 and dec["prompt"].iloc[-1] == "paint nothing"
    assert f"{S.NO_FINETUNE}/learned" in p["operating_points"] and "empty_from_pretrained/top1" in p["operating_points"]
    assert set(p["calibrated_vs_floor"]["models"]) == {"query_mask", "empty", "query_mask_from_pretrained",
                                                       "empty_from_pretrained", S.NO_FINETUNE}
    assert "pretrained vit_nano_shapes, no fine-tuning: best calibrated PES" in p["calibrated_vs_floor"]["sentence"]
    # the pretrained rows keep the checkpoint's architecture, and the table says so
    tr = {r["recipe"]: r for r in p["training"]}
    arch = "vit_nano (decoder_embed_dim=8)"
    assert tr["class-aware negatives (empty), from pretrained"]["preset"] == arch
    assert tr["class-aware negatives (empty), from scratch"]["preset"] == TINY_PRESET
    name, ov = CFG.resolve_preset(str(next((tmp_path / "work" / "compare_seen" / "run_empty_from_pretrained")
                                            .rglob("model.safetensors"))), "auto")
    assert (name, ov) == (TINY_PRESET, SHIPPED_ARCH)  # fine-tuned from the checkpoint
    md = (tmp_path / "out" / "tables" / "study_seen.md").read_text()
    assert "from pretrained" in md and "from scratch" in md and "no fine-tuning" in md
    assert f"use the checkpoint's architecture, {arch}" in md and "one-shot in context" in md
    assert "| init |" in (tmp_path / "out" / "tables" / "study_seen_decision.md").read_text()
    assert (tmp_path / "out" / "figures" / "study_seen_decision.png").read_bytes()[:4] == b"\x89PNG"
    pr = s["pretrained"]
    assert pr["available"] and pr["name"] == "vit_nano_shapes" and pr["same_architecture"] is False
    assert pr["sha256"] and s["settings"]["pretrained"] == "pretrained"
    json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert not any("scratch rows only" in m for m in logs)


@pytest.mark.timeout(120)
def test_study_without_the_shipped_checkpoint_runs_the_scratch_rows(cal_split, tmp_path, monkeypatch):
    from seggpt_lib.experiments import pretrain as PT

    monkeypatch.setattr(PT, "PRETRAINED_DIR", tmp_path / "no_pretrained")
    logs: list[str] = []
    st = S.StudySettings(**TINY_STUDY).with_overrides({"calibration_objective": None, "max_queries": 1})
    s = S.run_study(_prepared(cal_split, tmp_path / "work"), tmp_path / "out", st, device="cpu", log=logs.append)
    said = [m for m in logs if "scratch rows only" in m]
    assert len(said) == 1 and said[0].startswith("no shipped pretrained checkpoint, from-scratch rows only (")
    assert "\n" not in said[0]
    rows = s["protocols"]["seen"]["rows"]
    assert len(rows) == 7 and {r["init"] for r in rows[:-1]} == {"scratch"}
    assert all(r["recipe"].endswith(", from scratch") for r in rows[:-1])
    assert s["pretrained"] == {"available": False, "message": said[0]}
    md = (tmp_path / "out" / "tables" / "study_seen.md").read_text()
    assert "No shipped pretrained checkpoint, from-scratch rows only" in md
    # switched off, or a broken path: the same, never a crash
    assert S.study_checkpoint(None)[0] is None
    info, why = S.study_checkpoint(str(tmp_path / "missing.safetensors"))
    assert info is None and why.startswith("no init checkpoint, from-scratch rows only")
