"""``seggpt infer`` end to end on a small synthetic set with a tiny random model."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from seggpt_lib import build_seggpt, save_weights
from seggpt_lib.cli import main
from seggpt_lib.eval.scoring import pair_kind


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from data_prep.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("infer")
    data = generate_synthetic(root / "syn", seed=0, per_class=2, size=64, classes=("scratch", "open"),
                              n_free=1, show_progress=False)
    torch.manual_seed(0)
    model = build_seggpt("vit_nano")
    save_weights(model, root / "w.safetensors")
    mapping = {
        "open_000000.png": ["open_000001.png", "scratch_000000.png"],  # positive
        "scratch_000001.png": ["scratch_000000.png"],  # positive
        "scratch_000000.png": ["open_000000.png"],  # negative (auto)
        "free_000000.png": ["open_000001.png"],  # free (auto)
    }
    (root / "map.json").write_text(json.dumps(mapping))
    return root, data, mapping


def _argv(root, data, outdir, *extra, mapping="map.json"):
    return [
        "infer", "--weights", str(root / "w.safetensors"), "--mapping", str(root / mapping),
        "--prompt-img-dir", str(data / "images"), "--prompt-label-dir", str(data / "labels"),
        "--dataset-dir", str(data), "--outdir", str(outdir), "--device", "cpu", "--no-progress", *extra,
    ]


def test_end_to_end_outputs(workdir, tmp_path, capsys):
    root, data, mapping = workdir
    out = tmp_path / "run"
    rc = main(_argv(root, data, out, "--grid", "2", "--work-size", "64", "--top-k", "1", "--max-batch", "6"))
    assert rc == 0, capsys.readouterr().err
    for q in mapping:
        stem = q[:-4]
        h, w = np.asarray(Image.open(data / "images" / q)).shape[:2]
        label = np.asarray(Image.open(out / "label" / f"{stem}.png"))
        assert label.shape == (h, w) and set(np.unique(label)) <= {0, 255}
        assert np.asarray(Image.open(out / "color" / f"{stem}.png")).shape == (h, w, 3)
        concat = np.asarray(Image.open(out / "concat" / f"{stem}.png"))
        assert concat.shape[0] == h and concat.shape[1] >= 3 * w
    table = pd.read_csv(out / "per_image.csv")
    assert len(table) == len(mapping) and set(table["file"]) == set(mapping)
    assert {"file", "prompts", "iou", "catch", "response_rate", "yield", "kind", "gt_missing", "n_prompts"} <= set(table.columns)
    kinds = dict(zip(table["file"], table["kind"]))
    assert kinds == {"open_000000.png": "positive", "scratch_000001.png": "positive",
                     "scratch_000000.png": "negative", "free_000000.png": "free"}
    assert (table["n_prompts"] == 1).all()  # --top-k 1
    assert table.set_index("file").loc["open_000000.png", "prompts"] == "open_000001.png"
    s = json.loads((out / "summary.json").read_text())
    for key in ("miou", "catch_rate", "yield_rate", "free_yield_rate", "pes", "n_pairs", "n_positive",
                "n_negative", "n_free", "catch_iou", "yield_response", "baselines", "settings", "timing"):
        assert key in s, key
    assert s["n_pairs"] == 4 and (s["n_positive"], s["n_negative"], s["n_free"]) == (2, 1, 1)
    assert 0.0 <= s["miou"] <= 1.0 and 0.0 <= s["catch_rate"] <= 1.0 and 0.0 <= s["pes"] <= 1.0
    assert s["catch_iou"] == 0.3 and s["yield_response"] == 0.000239
    assert s["baselines"]["paint_nothing"]["yield_rate"] == 1.0
    assert s["settings"]["grid"] == 2 and s["settings"]["top_k"] == 1
    assert s["settings"]["weights"].endswith("w.safetensors")
    # 4 queries x 4 tiles x (1 prompt x 4 tiles) pairs, groups of 4 packed 1 per pass of 6
    assert s["timing"]["pairs"] == 64 and s["timing"]["forward_passes"] == 16
    report = (out / "results.txt").read_text().splitlines()
    assert sum(any(q in line for q in mapping) for line in report) == len(mapping)
    assert any(line.startswith("mIoU") for line in report) and any(line.startswith("PES") for line in report)


def test_refuses_to_overwrite(workdir, tmp_path, capsys):
    root, data, _ = workdir
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("another run")
    assert main(_argv(root, data, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --split: the deprecated name of --grid, still accepted with a warning
    assert main(_argv(root, data, out, "--overwrite", "--kind", "positive", "--split", "1")) == 0
    assert "--split is deprecated" in capsys.readouterr().err
    assert (out / "notes.txt").exists() and (out / "summary.json").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["n_positive"] == 4 and s["settings"]["grid"] == 1


def test_missing_files_listed_in_one_error(workdir, tmp_path, capsys):
    root, data, _ = workdir
    (root / "bad.json").write_text(json.dumps({
        "nope_1.png": ["open_000001.png"],
        "open_000000.png": ["ghost_7.png", "open_000001.png"],
        "nope_2.png": ["ghost_8.png"],
    }))
    labels = tmp_path / "labels"
    shutil.copytree(data / "labels", labels)
    (labels / "open_000001.png").unlink()
    out = tmp_path / "run"
    argv = _argv(root, data, out, mapping="bad.json")
    argv[argv.index("--prompt-label-dir") + 1] = str(labels)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    for name in ("nope_1.png", "nope_2.png", "ghost_7.png", "ghost_8.png", "open_000001.png"):
        assert name in err, name
    assert not out.exists()  # nothing started


def test_query_without_ground_truth(workdir, tmp_path, capsys):
    root, data, mapping = workdir
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    (ds / "labels" / "scratch_000001.png").unlink()
    out = tmp_path / "run"
    argv = _argv(root, data, out)
    argv[argv.index("--dataset-dir") + 1] = str(ds)
    assert main(argv) == 0, capsys.readouterr().err
    table = pd.read_csv(out / "per_image.csv").set_index("file")
    assert bool(table.loc["scratch_000001.png", "gt_missing"])
    assert np.isnan(table.loc["scratch_000001.png", "iou"])
    assert not table.drop(index="scratch_000001.png")["gt_missing"].astype(bool).any()
    assert (out / "label" / "scratch_000001.png").exists() and (out / "concat" / "scratch_000001.png").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["n_missing_gt"] == 1 and s["n_pairs"] == len(mapping)
    assert "without ground truth" in (out / "results.txt").read_text()


@pytest.mark.parametrize("problem", ["non-binary", "wrong-size", "gt-size"])
def test_bad_masks_named(workdir, tmp_path, capsys, problem):
    root, data, _ = workdir
    ds = tmp_path / "ds"
    shutil.copytree(data, ds)
    if problem == "gt-size":
        target = ds / "labels" / "free_000000.png"
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(target)
    else:
        target = ds / "labels" / "open_000001.png"
        m = np.asarray(Image.open(target)).copy()
        if problem == "non-binary":
            m[0, :3] = (0, 7, 255)
        else:
            m = m[:40]
        Image.fromarray(m).save(target)
    argv = _argv(root, ds, tmp_path / "run")
    argv[argv.index("--prompt-img-dir") + 1] = str(ds / "images")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and target.name in err
    expected = {"non-binary": "not binary", "wrong-size": "40x64", "gt-size": "10x12"}[problem]
    assert expected in err


def test_pair_kind_rules():
    gt = np.zeros((4, 4), bool)
    assert pair_kind("auto", "free", ["open"], None) == "free"
    assert pair_kind("auto", "open", ["open"], gt) == "free"  # empty ground truth
    gt[1, 1] = True
    assert pair_kind("auto", "open", ["scratch", "crack"], gt) == "negative"
    assert pair_kind("auto", "open", ["scratch", "open"], gt) == "positive"
    assert pair_kind("auto", "open", ["open"], None) == "positive"
    assert pair_kind("negative", "open", ["open"], gt) == "negative"


def test_learned_prompt_replaces_the_image_prompts(workdir, tmp_path, capsys):
    """``--learned-prompt``: every query is predicted from the learned prompt (seggpt tune-prompt);
    the mapping may list the queries only and the prompt folders are not needed."""
    from seggpt_lib.engine.prompt_tuning import PromptTuningConfig, save_learned_prompt, tune_prompt
    from seggpt_lib.model.checkpoint import build_from_checkpoint

    root, data, mapping = workdir
    model = build_from_checkpoint(root / "w.safetensors")
    prompt, _ = tune_prompt(model, data, "open", PromptTuningConfig(steps=1, batch_size=2, evaluate=False),
                            progress=False, device="cpu")
    lp = save_learned_prompt(prompt, tmp_path / "open.safetensors")
    (tmp_path / "queries.json").write_text(json.dumps(["open_000000.png", "scratch_000001.png", "free_000000.png"]))
    base = ["infer", "--weights", str(root / "w.safetensors"), "--dataset-dir", str(data), "--device", "cpu",
            "--no-progress", "--learned-prompt", str(lp)]
    out = tmp_path / "run"
    assert main(base + ["--mapping", str(tmp_path / "queries.json"), "--outdir", str(out)]) == 0, capsys.readouterr().err
    table = pd.read_csv(out / "per_image.csv").set_index("file")
    assert (table["prompts"] == "learned:open").all() and (table["n_prompts"] == 1).all()
    assert table["kind"].to_dict() == {"open_000000.png": "positive", "scratch_000001.png": "negative",
                                       "free_000000.png": "free"}
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["learned_prompt"] == str(lp) and s["settings"]["learned_prompt_class"] == "open"
    assert s["settings"]["defect_color"] == list(prompt.defect_color) and s["n_pairs"] == 3
    assert (out / "label" / "open_000000.png").is_file()
    # the same predictions from Python: load_learned_prompt + to_prompt_pairs
    from seggpt_lib.engine.prompt_tuning import load_learned_prompt, predictor_kwargs, to_prompt_pairs
    from seggpt_lib.predict.predictor import SegGPTPredictor

    pred = SegGPTPredictor(model, **predictor_kwargs(prompt))
    p = load_learned_prompt(lp, model=pred.model)
    mine = pred.predict(data / "images" / "open_000000.png", prompt_pairs=to_prompt_pairs(p, pred))
    label = np.asarray(Image.open(out / "label" / "open_000000.png")) != 0
    assert (mine.mask == label).all()
    # a full mapping: its prompts are ignored (and the prompt folders may be given)
    out2 = tmp_path / "run2"
    assert main(_argv(root, data, out2, "--learned-prompt", str(lp))) == 0, capsys.readouterr().err
    t2 = pd.read_csv(out2 / "per_image.csv")
    assert len(t2) == len(mapping) and (t2["prompts"] == "learned:open").all()
    # a normalisation that contradicts the prompt's, weights given as a prompt, no prompts at all
    assert main(base + ["--mapping", str(tmp_path / "queries.json"), "--outdir", str(tmp_path / "r3"),
                        "--mean", "0.1,0.1,0.1"]) == 2
    assert "does not match" in capsys.readouterr().err
    bad = base[:-1] + [str(root / "w.safetensors"), "--mapping", str(tmp_path / "queries.json"), "--outdir",
                       str(tmp_path / "r4")]
    assert main(bad) == 2 and "not a learned prompt" in capsys.readouterr().err
    plain = ["infer", "--weights", str(root / "w.safetensors"), "--dataset-dir", str(data), "--device", "cpu",
             "--mapping", str(root / "map.json"), "--outdir", str(tmp_path / "r5")]
    assert main(plain) == 2 and "--prompt-img-dir is required" in capsys.readouterr().err
