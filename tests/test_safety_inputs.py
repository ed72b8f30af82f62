"""Safe by default, inputs: wrong config values, bad dataset files and bad inference inputs give
one clear error naming the key / file (exit code 2 on the command line), never a traceback.

Property-based tests (hypothesis) feed random bytes and random rows to the ``classes.csv``
reader and the mapping reader: a clear error naming the file, or a correct parse.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seggpt_lib.cli import main
from seggpt_lib.data.layout import DatasetError, DefectIndex, read_classes_csv, read_label
from seggpt_lib.engine.trainer import TrainConfig, parse_set
from seggpt_lib.eval.mapping import load_mapping
from seggpt_lib.experiments import config as CFG
from seggpt_lib.predict.predictor import check_prompt_mask, load_mask_file, load_rgb
from seggpt_lib.predict.tiling import check_grid
from seggpt_lib.utils.config import read_json_config

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _err(capsys) -> str:
    return capsys.readouterr().err


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# ==========================================================================================
# 4. config values: type and range checked, errors naming the key, the value and the file
# ==========================================================================================
def test_train_set_wrong_type_names_key_and_value(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--set lr=abc.*lr must be float, got 'abc'"):
        parse_set(["lr=abc"])
    with pytest.raises(ValueError, match=r"unknown key lrr"):
        parse_set(["lrr=1"])
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\], got 2"):
        parse_set(["mask_ratio=2"])
    assert parse_set(["run_id=2024", "lr=0.5", "defect_color=[255,0,0]"]) == {
        "run_id": "2024", "lr": 0.5, "defect_color": [255, 0, 0]}  # text keys keep the text
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"train_dataset_dir": str(tmp_path / "data"), "log_dir": str(tmp_path / "runs")}))
    assert main(["train", "--config", str(cfg), "--set", "lr=abc", "--no-progress"]) == 2
    err = _err(capsys)
    assert "lr" in err and "'abc'" in err and "Traceback" not in err


def test_train_config_file_wrong_type_names_file_key_value(tmp_path, capsys):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"train_dataset_dir": str(tmp_path / "data"), "max_steps": "5"}))
    with pytest.raises(ValueError, match=r"train\.json: max_steps must be int \| None, got '5'"):
        TrainConfig.from_json(cfg)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = _err(capsys)
    assert "train.json" in err and "max_steps" in err and "'5'" in err
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TrainConfig.from_dict({"train_dataset_dir": "d", "batch_size": 0})
    with pytest.raises(ValueError, match="lr must be a number > 0, got nan"):
        TrainConfig.from_dict({"train_dataset_dir": "d", "lr": float("nan")})
    with pytest.raises(ValueError, match="unknown SegGPTConfig key model.depht"):
        TrainConfig.from_dict({"train_dataset_dir": "d", "model": {"depht": 2}})


def test_pipeline_config_file_wrong_type_names_the_file(tmp_path):
    p = tmp_path / "pipe.json"
    p.write_text(json.dumps({"steps": "5"}))
    with pytest.raises(CFG.PipelineError, match=r"pipe\.json: steps must be int, got '5'"):
        CFG.load_config(p)
    p.write_text(json.dumps({"train": {"max_steps": "5"}}))
    with pytest.raises(CFG.PipelineError, match=r"pipe\.json: train\.max_steps must be int \| None, got '5'"):
        CFG.load_config(p)
    with pytest.raises(CFG.PipelineError, match=r"--set: steps must be int, got 'abc'"):
        CFG.load_config(None, ["steps=abc"])
    with pytest.raises(CFG.PipelineError, match=r"catch_iou must be a number in \[0, 1\], got 3"):
        CFG.load_config(None, ["catch_iou=3"])


@pytest.mark.parametrize("content", [b"{\"steps\": 3,}", b"\xff\xfe\x00garbage\x81", b"[1, 2]",
                                     b"{\"steps\": 1, \"steps\": 2}"])
def test_malformed_config_json_names_the_file(tmp_path, content):
    p = tmp_path / "broken_cfg.json"
    p.write_bytes(content)
    with pytest.raises(CFG.PipelineError, match="broken_cfg.json"):
        CFG.read_config_file(p)
    with pytest.raises(ValueError, match="broken_cfg.json"):
        TrainConfig.from_json(p)
    with pytest.raises(ValueError, match="broken_cfg.json"):
        read_json_config(p)


def test_unknown_nested_keys_are_errors(capsys):
    for item, word in (("train.lrr=1", "lrr"), ("model.depht=2", "depht"), ("synthetic.sizes=64", "sizes"),
                       ("steps.x=1", "steps.x")):
        assert main(["reproduce", "--print-config", "--set", item]) != 0, item  # reproduce's config errors
        err = _err(capsys)
        assert word in err and "unknown" in err and "Traceback" not in err, err
    assert main(["reproduce", "--print-config", "--set", "synthetic.size=abc"]) != 0
    assert "synthetic.size must be an integer >= 32, got 'abc'" in _err(capsys)
    assert main(["reproduce", "--print-config", "--set", "model.depth=2", "train.lr=0.01"]) == 0
    capsys.readouterr()


def test_the_configs_still_load():
    for p in sorted(Path(CFG.CONFIG_DIR).glob("*.json")):
        CFG.load_config(p)
    CFG.PipelineConfig.from_dict(CFG.SMOKE)
    TrainConfig.from_dict({**CFG.PIPELINE_RECIPE, "train_dataset_dir": "d"})


# ==========================================================================================
# 5. data readers
# ==========================================================================================
@pytest.fixture()
def small_set(tmp_path) -> Path:
    from data_prep.synthetic import generate_synthetic

    return generate_synthetic(tmp_path / "syn", per_class=3, size=32, classes=["scratch", "open"], n_free=1,
                              show_progress=False)


def test_stats_skip_bad_skips_and_lists(small_set, capsys, tmp_path):
    imgs = sorted((small_set / "images").iterdir())
    _truncate(imgs[0])  # truncated image
    (small_set / "labels" / f"{imgs[1].stem}.png").write_bytes(b"")  # empty label
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(small_set / "labels" / f"{imgs[2].stem}.png")  # wrong size
    assert main(["prepare", "stats", "--src", str(small_set)]) == 2  # without --skip-bad: the first bad file
    assert "error:" in _err(capsys)
    assert main(["prepare", "stats", "--src", str(small_set), "--skip-bad"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)
    assert stats["images"] == len(imgs) - 3
    for p in imgs[:3]:
        assert p.stem in err, err  # listed in the warning
    assert len(stats["skipped"]) == 3


def test_classes_csv_with_byte_order_mark(small_set):
    path = small_set / "classes.csv"
    text = path.read_text(encoding="utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # Excel's "CSV UTF-8"
    rows = read_classes_csv(small_set)
    assert rows and set(rows[0]) >= {"file", "class"}
    assert len(DefectIndex.scan(small_set)) == len(rows)


def test_classes_csv_conflicting_rows(small_set):
    path = small_set / "classes.csv"
    rows = read_classes_csv(small_set)
    first = rows[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{first['file']},{first['class']}\n")  # the same row again: tolerated
    assert len(read_classes_csv(small_set)) == len(rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{first['file']},other\n")
    with pytest.raises(DatasetError) as e:
        DefectIndex.scan(small_set)
    msg = str(e.value)
    assert "classes.csv" in msg and first["file"] in msg and repr(first["class"]) in msg and "'other'" in msg


def test_colour_label_one_rule_in_training_and_inference(tmp_path):
    mask = np.zeros((12, 16), bool)
    mask[2:6, 3:9] = True
    colour = np.zeros((12, 16, 3), np.uint8)
    colour[mask] = (200, 30, 0)  # a dark-ish red: luminance 77, not 255
    Image.fromarray(colour).save(tmp_path / "colour.png")
    lbl = read_label(tmp_path / "colour.png")
    assert lbl.dtype == np.uint8 and set(np.unique(lbl)) == {0, 255} and np.array_equal(lbl != 0, mask)
    assert np.array_equal(load_mask_file(tmp_path / "colour.png"), lbl)
    assert np.array_equal(check_prompt_mask(tmp_path / "colour.png", (12, 16)), mask)
    # grey saved as RGB keeps its values (class indices), as a single-channel file would
    grey = np.zeros((12, 16, 3), np.uint8)
    grey[mask] = 2
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert set(np.unique(read_label(tmp_path / "grey.png"))) == {0, 2}


def test_16bit_labels_read_correctly(tmp_path):
    def save(name, values):
        a = np.zeros((6, 8), np.uint16)
        a[0, : len(values)] = values
        Image.fromarray(a).save(tmp_path / name)
        return tmp_path / name

    assert np.array_equal(np.unique(read_label(save("idx.png", [1, 2, 3]))), [0, 1, 2, 3])  # class indices kept
    assert np.array_equal(np.unique(read_label(save("bin.png", [65535, 65535]))), [0, 255])  # binary: defect
    assert np.array_equal(check_prompt_mask(save("bin2.png", [1000]), (6, 8)).sum(), 1)
    with pytest.raises(DatasetError, match=r"big\.png.*300, 600"):  # was clipped to 255 silently
        read_label(save("big.png", [300, 600]))


# ==========================================================================================
# 6. inference: every file-reading error names the file; a grid the canvas cannot hold
# ==========================================================================================
@pytest.fixture(scope="module")
def infer_dir(tmp_path_factory):
    from data_prep.synthetic import generate_synthetic
    from seggpt_lib import build_seggpt, save_weights

    root = tmp_path_factory.mktemp("safety_infer")
    data = generate_synthetic(root / "syn", per_class=2, size=32, classes=["scratch", "open"], n_free=0,
                              show_progress=False)
    torch.manual_seed(0)
    save_weights(build_seggpt("vit_nano"), root / "w.safetensors")
    (root / "map.json").write_text(json.dumps({"scratch_000000.png": ["scratch_000001.png"]}))
    return root, data


def _infer_argv(root, data, out, *extra):
    return ["infer", "--weights", str(root / "w.safetensors"), "--mapping", str(root / "map.json"),
            "--prompt-img-dir", str(data / "images"), "--prompt-label-dir", str(data / "labels"),
            "--dataset-dir", str(data), "--outdir", str(out), "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("which", ["scratch_000000.png", "scratch_000001.png"])  # the query, the prompt
def test_truncated_query_or_prompt_names_the_file(infer_dir, tmp_path, capsys, which):
    import shutil

    root, data = infer_dir
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    _truncate(copy / "images" / which)
    with pytest.raises(DatasetError, match=which):
        load_rgb(copy / "images" / which)
    assert main(_infer_argv(root, copy, tmp_path / "out")) == 2
    err = _err(capsys)
    assert which in err and "truncated" in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag", ["--grid", "--split"])
def test_grid_too_large_is_a_clear_error(infer_dir, tmp_path, capsys, flag):
    root, data = infer_dir
    assert main(_infer_argv(root, data, tmp_path / "out", flag, "1000")) == 2
    err = _err(capsys)
    assert f"{flag} 1000 is too large for --work-size 1024" in err and "<= 256" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="grid 1000 is too large"):
        check_grid(1000, 1024)
    check_grid(256, 1024)


# ==========================================================================================
# property-based: the classes.csv and mapping readers
# ==========================================================================================
@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prop")


@PROPERTY
@given(data=st.binary(max_size=300))
def test_classes_csv_random_bytes(scratch, data):
    (scratch / "classes.csv").write_bytes(data)
    try:
        rows = read_classes_csv(scratch)
    except DatasetError as e:
        assert "classes.csv" in str(e)
        return
    assert isinstance(rows, list)
    for r in rows:
        assert r["file"] and r["class"]


_names = st.text(alphabet="abcé_ .-1", min_size=0, max_size=5)


@PROPERTY
@given(rows=st.lists(st.tuples(_names, _names), max_size=12), bom=st.booleans())
def test_classes_csv_random_rows(scratch, rows, bom):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "class"])
    w.writerows(rows)
    (scratch / "classes.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8"))
    expected: dict[str, str] = {}
    problem = None
    for f, c in rows:
        f, c = f.strip(), c.strip()
        if not f or not c:
            problem = problem or "empty"
            break
        if f in expected and expected[f] != c:
            problem = problem or "two classes"
            break
        expected.setdefault(f, c)
    try:
        got = read_classes_csv(scratch)
    except DatasetError as e:
        assert "classes.csv" in str(e) and problem is not None, (rows, e)
        assert problem in str(e) or problem == "empty" and "empty" in str(e)
        return
    assert problem is None, rows
    assert [(r["file"], r["class"]) for r in got] == list(expected.items())


@PROPERTY
@given(data=st.binary(max_size=300))
def test_mapping_random_bytes(scratch, data):
    p = scratch / "map.json"
    p.write_bytes(data)
    try:
        m = load_mapping(p)
    except ValueError as e:
        assert "map.json" in str(e)
        return
    assert isinstance(m, dict) and m
    assert all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in m.values())


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=8)
_entry = st.lists(st.text(alphabet="ab. ", max_size=4), max_size=3) | _json


@PROPERTY
@given(mapping=st.dictionaries(st.text(alphabet="qa. ", max_size=4), _entry, max_size=4) | _json)
def test_mapping_random_rows(scratch, mapping):
    p = scratch / "map.json"
    p.write_text(json.dumps(mapping), encoding="utf-8")
    valid = (isinstance(mapping, dict) and bool(mapping)
             and all(q.strip() and isinstance(ps, list) and ps and all(isinstance(x, str) and x.strip() for x in ps)
                     for q, ps in mapping.items()))
    try:
        got = load_mapping(p)
    except ValueError as e:
        assert "map.json" in str(e) and not valid, (mapping, e)
        return
    assert valid and got == mapping
