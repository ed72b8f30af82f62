"""Tests of the data_prep package: synthetic generator, converters, split, stats, CLI."""
from __future__ import annotations

import csv
import importlib
import inspect
import json
import os
import pkgutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import data_prep
from data_prep import common, synthetic
from data_prep.common import DataPrepError, DataPrepWarning, class_from_filename, scan_dataset
from data_prep.magnetic_tile import convert_magnetic_tile
from data_prep.split import allocate, split_dataset
from data_prep.stats import dataset_stats
from data_prep.synthetic import DEFECT_CLASSES, FAMILIES, generate_synthetic, render_sample
from data_prep.vision_coco import convert_vision_coco, decode_rle_string, encode_rle_string, mask_to_rle, rle_to_mask
from seggpt_lib.cli import main as cli_main
from seggpt_lib.data import layout
from seggpt_lib.data.layout import DatasetError


def _magnetic_tile_root() -> Path | None:
    env = os.environ.get("SEGGPT_MAGNETIC_TILE")
    cands = [Path(env)] if env else []
    cands.append(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile")
    for c in cands:
        if c.is_dir() and any(c.glob("MT_*")):
            return c
    return None


def _csv_rows(root: Path) -> list[dict]:
    with open(root / "classes.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_temp_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_synthetic(out, seed=0, per_class=3, size=64, n_free=4, workers=1)
    return out


def _tiny_dataset(root: Path, classes=("scratch", "pit", "free"), n=4, size=(12, 10)) -> Path:
    """A hand-made dataset ROOT with n images per class."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            name = f"{c}_{i:04d}"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
            m = np.zeros((size[1], size[0]), np.uint8)
            if c != "free":
                m[2:5, 3:7] = 255
            Image.fromarray(m).save(root / "labels" / f"{name}.png")
            rows.append({"file": f"{name}.png", "class": c})
    common.write_classes_csv(root, rows)
    return root


# ============================================================================================
# synthetic
# ============================================================================================
def test_synthetic_layout_masks_and_manifest(small_synth):
    rows = _csv_rows(small_synth)
    images = sorted(p.name for p in (small_synth / "images").iterdir())
    labels = sorted(p.name for p in (small_synth / "labels").iterdir())
    assert images == labels == sorted(r["file"] for r in rows)
    assert list(rows[0])[:3] == ["file", "class", "surface"]
    classes = {r["class"] for r in rows}
    assert classes == set(DEFECT_CLASSES) | {"free"}
    assert len(DEFECT_CLASSES) >= 6 and len(FAMILIES) >= 2
    assert {r["surface"] for r in rows if r["class"] == "free"} == set(FAMILIES)
    for r in rows:
        assert r["file"].startswith(r["class"] + "_")
        assert class_from_filename(r["file"], classes) == r["class"]
        img = Image.open(small_synth / "images" / r["file"])
        lbl = Image.open(small_synth / "labels" / r["file"])
        assert img.mode == "RGB" and lbl.mode == "L" and img.size == lbl.size == (64, 64)
        m = np.asarray(lbl)
        assert set(np.unique(m)) <= {0, 255}
        assert int(r["defect_pixels"]) == np.count_nonzero(m)
        if r["class"] == "free":
            assert not m.any()
        else:
            assert m.any(), r["file"]
            assert r["surface"] == synthetic.SURFACE_OF[r["class"]]


def test_synthetic_determinism(tmp_path, small_synth):
    again = tmp_path / "again"
    generate_synthetic(again, seed=0, per_class=3, size=64, n_free=4, workers=2)
    assert _tree_bytes(again) == _tree_bytes(small_synth)          # byte-identical, any worker count
    other = tmp_path / "other"
    generate_synthetic(other, seed=1, per_class=3, size=64, n_free=4, workers=1)
    a, b = _tree_bytes(small_synth), _tree_bytes(other)
    assert a.keys() == b.keys()
    differing = [k for k in a if k.startswith("images") and a[k] != b[k]]
    assert len(differing) == sum(1 for k in a if k.startswith("images"))


def test_synthetic_defects_visible_at_64px():
    """Each defect type must stand out from its surroundings after downsizing 256 -> 64 and
    must usually cover a sizeable area."""
    from PIL import ImageFilter
    for cls in DEFECT_CLASSES:
        fracs, contrasts = [], []
        for i in range(4):
            img, mask = render_sample(7, cls, i, 256)
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8
            assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
            fracs.append(np.count_nonzero(mask) / mask.size)
            im64 = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR), float)
            m64 = np.asarray(Image.fromarray(mask).resize((64, 64), Image.BILINEAR)) >= 128
            if not m64.any():
                continue
            ring = (np.asarray(Image.fromarray(m64.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))) > 0) & ~m64
            contrasts.append(np.abs(im64[m64].mean(0) - im64[ring].mean(0)).sum())
        assert np.median(fracs) >= 0.004, (cls, fracs)
        assert contrasts and np.median(contrasts) > 40, (cls, contrasts)


def test_synthetic_bad_arguments(tmp_path):
    with pytest.raises(DataPrepError, match="seed"):
        generate_synthetic(tmp_path / "a", seed=-1)
    with pytest.raises(DataPrepError, match="unknown synthetic class"):
        generate_synthetic(tmp_path / "a", classes=["dent"])
    with pytest.raises(DataPrepError, match="size"):
        generate_synthetic(tmp_path / "a", size=8)


def test_output_guard_overwrite_and_crash_safety(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    generate_synthetic(out, seed=0, per_class=1, size=32, n_free=1, classes=["scratch"])
    before = _tree_bytes(out)
    with pytest.raises(DataPrepError, match="not empty.*--overwrite"):
        generate_synthetic(out, seed=1, per_class=1, size=32, n_free=1, classes=["scratch"])
    assert _tree_bytes(out) == before

    # a crash half-way leaves the previous dataset untouched and no temp folders behind
    real = synthetic.render_sample
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "render_sample", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_synthetic(out, seed=1, per_class=2, size=32, n_free=1, classes=["scratch"],
                           overwrite=True, workers=1)
    assert _tree_bytes(out) == before
    assert _no_temp_leftovers(tmp_path)
    monkeypatch.setattr(synthetic, "render_sample", real)

    generate_synthetic(out, seed=1, per_class=2, size=32, n_free=1, classes=["scratch"], overwrite=True)
    assert len(_csv_rows(out)) == 3 and _tree_bytes(out) != before
    assert _no_temp_leftovers(tmp_path)


# ============================================================================================
# COCO
# ============================================================================================
def test_rle_string_decoding_known_values():
    # hand-encoded: 5-bit groups + 48, continuation bit 0x20, sign bit 0x10, deltas from i > 2
    assert decode_rle_string("23;") == [2, 3, 11]
    assert decode_rle_string("142O4") == [1, 4, 2, 3, 6]     # 'O' = -1 -> 4 + (-1) = 3
    assert decode_rle_string("T3") == [100]                  # 'T' = 4 | 0x20, '3' = 3 -> 4 + 3*32
    m = rle_to_mask({"size": [4, 4], "counts": "142O4"})
    flat = m.T.reshape(-1)                                    # column-major order
    assert flat.tolist() == [0] + [1] * 4 + [0] * 2 + [1] * 3 + [0] * 6
    for counts in ([0, 5, 3], [7, 1, 1, 1, 40, 2], [1000, 3, 500, 70000, 2]):
        assert decode_rle_string(encode_rle_string(counts)) == counts
    with pytest.raises(ValueError):
        rle_to_mask({"size": [4, 4], "counts": [3, 4]})


def _coco_encode(counts: list[int]) -> str:
    """Independent test-side encoder of COCO compressed RLE text."""
    chars = []
    for i, c in enumerate(counts):
        x = c - (counts[i - 2] if i > 2 else 0)
        while True:
            g, x = x & 31, x >> 5
            more = x != (-1 if g & 16 else 0)
            chars.append(chr(48 + (g | (32 if more else 0))))
            if not more:
                break
    return "".join(chars)


def _write_coco(split_dir: Path, images: list[tuple[str, tuple[int, int]]], anns: list[dict],
                cats: list[tuple[int, str]]) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    coco_images = []
    for i, (name, (w, h)) in enumerate(images, start=1):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(split_dir / name)
        coco_images.append({"id": i, "file_name": name, "width": w, "height": h})
    data = {"images": coco_images, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "defect"} for i, n in cats]}
    (split_dir / "_annotations.coco.json").write_text(json.dumps(data))


def _expected_masks(w=20, h=16):
    poly = np.zeros((h, w), bool)
    poly[3:7, 2:9] = True                                      # polygon (2,3)-(9,7): pixel centres inside (pycocotools)
    rle_a = np.zeros((h, w), bool)
    rle_a[5:9, 11:17] = True
    rle_a[12, 0:4] = True
    rle_b = np.zeros((h, w), bool)
    rle_b[0:2, 0:20] = True
    return poly, rle_a, rle_b


def _make_vision(root: Path) -> Path:
    w, h = 20, 16
    poly, rle_a, rle_b = _expected_masks(w, h)
    cats = [(1, "thunderbolt"), (2, "break")]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 3, 9, 3, 9, 7, 2, 7]], "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": _coco_encode(mask_to_rle(rle_a)["counts"])}},
        {"id": 3, "image_id": 3, "category_id": 1, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": mask_to_rle(rle_b)["counts"]}},
        {"id": 4, "image_id": 3, "category_id": 2, "segmentation": [[2, 3, 9, 3, 9, 7, 2, 7]]},
    ]
    imgs = [("a_jpg.rf.1.jpg", (w, h)), ("b.png", (w, h)), ("c.png", (w, h)), ("d.png", (w, h))]
    _write_coco(root / "Cable" / "train", imgs, anns, cats)
    _write_coco(root / "Screw" / "valid", [("s1.png", (w, h))],
                [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}],
                [(1, "thread")])
    return root


def test_coco_polygon_and_rle_rasterisation_and_merge_naming(tmp_path):
    src = _make_vision(tmp_path / "vision")
    out = convert_vision_coco(src, tmp_path / "out", multiclass=False)     # --per-category-copies: binary
    rows = {r["file"]: r for r in _csv_rows(out)}
    poly, rle_a, rle_b = _expected_masks()
    expected = {
        "Cable_thunderbolt_a_jpg.rf.1.jpg": poly,
        "Cable_break_b.png": rle_a,
        "Cable_thunderbolt_c.png": rle_b,          # one image with two categories -> two outputs
        "Cable_break_c.png": poly,
        "free_Cable_d.png": None,
        "Screw_thread_s1.png": None,
    }
    assert set(rows) == set(expected)
    for name, m in expected.items():
        lbl = np.asarray(Image.open(out / "labels" / (Path(name).stem + ".png")))
        assert lbl.shape == (16, 20) and set(np.unique(lbl)) <= {0, 255}
        if m is not None:
            np.testing.assert_array_equal(lbl > 0, m, err_msg=name)
        original = next(p for p in src.rglob("*") if p.suffix != ".json" and name.endswith("_" + p.name))
        assert (out / "images" / name).read_bytes() == original.read_bytes()   # copied unchanged
    assert rows["free_Cable_d.png"]["class"] == "free"
    assert rows["Cable_break_b.png"]["class"] == "Cable_break"
    assert rows["Screw_thread_s1.png"]["surface"] == "Screw"
    assert rows["Screw_thread_s1.png"]["source_split"] == "valid"
    tri = np.asarray(Image.open(out / "labels" / "Screw_thread_s1.png")) > 0
    assert tri[0, 1] and tri[0, 3] and tri[2, 3] and not tri[0, 4] and not tri[4, 4] and not tri[3, 0]

    # one sub-dataset: no prefix; a split folder directly works too
    single = convert_vision_coco(src / "Cable", tmp_path / "single")
    names = {r["file"] for r in _csv_rows(single)}
    assert "thunderbolt_a_jpg.rf.1.jpg" in names and "free_d.png" in names
    direct = convert_vision_coco(src / "Cable" / "train", tmp_path / "direct")
    assert {r["file"] for r in _csv_rows(direct)} == names


def test_coco_multiclass(tmp_path):
    src = _make_vision(tmp_path / "vision")
    out = convert_vision_coco(src / "Cable", tmp_path / "mc", multiclass=True)
    index = json.loads((out / "class_index.json").read_text())
    assert index == {"background": 0, "break": 1, "thunderbolt": 2}
    rows = {r["file"]: r for r in _csv_rows(out)}
    c = next(r for f, r in rows.items() if f.endswith("_c.png"))
    assert set(c["classes"].split(";")) == {"break", "thunderbolt"}
    lbl = np.asarray(Image.open(out / "labels" / (Path(c["file"]).stem + ".png")))
    poly, _, rle_b = _expected_masks()
    assert set(np.unique(lbl)) == {0, 1, 2}
    assert (lbl[poly] == 1).all() and (lbl[rle_b & ~poly] == 2).all() and (lbl[~(poly | rle_b)] == 0).all()


def test_coco_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataPrepError, match="empty source folder"):
        convert_vision_coco(empty, tmp_path / "o1")

    src = _make_vision(tmp_path / "v")
    ann = src / "Cable" / "train" / "_annotations.coco.json"
    original = ann.read_text()
    data = json.loads(original)
    data["annotations"].append({"id": 99, "image_id": 42, "category_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3]]})
    ann.write_text(json.dumps(data))
    with pytest.raises(DataPrepError, match=r"_annotations\.coco\.json.*annotation 99.*unknown image id 42"):
        convert_vision_coco(src, tmp_path / "o2")
    with pytest.warns(DataPrepWarning, match="unknown image id 42"):
        out = convert_vision_coco(src, tmp_path / "o3", skip_bad=True)
    assert len(_csv_rows(out)) == 5          # c.png (two categories) is one class-index image
    data = json.loads(original)
    data["annotations"][0]["category_id"] = 9
    ann.write_text(json.dumps(data))
    with pytest.raises(DataPrepError, match=r"annotation 1 \(image a_jpg\.rf\.1\.jpg\) refers to unknown category id 9"):
        convert_vision_coco(src, tmp_path / "o3b")
    ann.write_text(original)

    # a truncated image, then also an image whose size differs from the JSON
    img = src / "Cable" / "train" / "b.png"
    img.write_bytes(img.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"b\.png: unreadable or truncated"):
        convert_vision_coco(src, tmp_path / "o4")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(src / "Cable" / "train" / "d.png")
    with pytest.warns(DataPrepWarning) as rec:
        convert_vision_coco(src, tmp_path / "o5", skip_bad=True)
    text = "\n".join(str(w.message) for w in rec)
    assert "b.png" in text and "d.png" in text and "5x5" in text

    # output inside the source is refused, before anything is written
    with pytest.raises(DataPrepError, match="inside the source"):
        convert_vision_coco(src / "Screw", src / "Screw" / "out")
    assert not (src / "Screw" / "out").exists()


# ============================================================================================
# magnetic tile
# ============================================================================================
def test_magnetic_tile_real_subset(tmp_path):
    root = _magnetic_tile_root()
    if root is None:
        pytest.skip("magnetic-tile dataset not found (set SEGGPT_MAGNETIC_TILE)")
    out = convert_magnetic_tile(root, tmp_path / "mt", limit_per_class=3)
    rows = _csv_rows(out)
    classes = {r["class"] for r in rows}
    assert classes == {"blowhole", "break", "crack", "fray", "uneven", "free"}
    assert len(rows) == 18
    for r in rows:
        assert r["file"].startswith(r["class"] + "_") and r["file"].endswith(".jpg")
        img = Image.open(out / "images" / r["file"])
        lbl = np.asarray(Image.open(out / "labels" / (Path(r["file"]).stem + ".png")))
        assert lbl.shape == (img.size[1], img.size[0]) and set(np.unique(lbl)) <= {0, 255}
        if r["class"] == "free":
            assert not lbl.any()
    blow = [r for r in rows if r["class"] == "blowhole"]
    assert any(int(r["defect_pixels"]) > 0 for r in blow)
    src_img = root / "MT_Blowhole" / "Imgs" / (blow[0]["file"][len("blowhole_"):])
    assert (out / "images" / blow[0]["file"]).read_bytes() == src_img.read_bytes()
    with pytest.raises(DataPrepError, match="inside the source"):
        convert_magnetic_tile(root, root / "converted")


def _fake_mt(root: Path) -> Path:
    for cls in ("MT_Crack", "MT_Free"):
        d = root / cls / "Imgs"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((10, 8), 120, np.uint8)).save(d / f"n{i}.jpg")
            m = np.zeros((10, 8), np.uint8)
            if cls == "MT_Crack":
                m[2:4, 2:4] = 200
                m[5, 5] = 100                        # anti-aliased edge below the threshold
            Image.fromarray(m).save(d / f"n{i}.png")
    return root


def test_magnetic_tile_fake_layout_and_bad_inputs(tmp_path):
    src = _fake_mt(tmp_path / "mt")
    out = convert_magnetic_tile(src, tmp_path / "o")
    m = np.asarray(Image.open(out / "labels" / "crack_n0.png"))
    assert m.sum() == 4 * 255 and m[5, 5] == 0
    assert {r["class"] for r in _csv_rows(out)} == {"crack", "free"}

    (src / "MT_Crack" / "Imgs" / "n1.png").unlink()           # image without a mask
    with pytest.raises(DataPrepError, match=r"n1\.jpg.*without a label"):
        convert_magnetic_tile(src, tmp_path / "o2")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(src / "MT_Free" / "Imgs" / "n0.png")   # wrong size
    with pytest.raises(DataPrepError, match=r"n0\.png: mask size 3x3 differs from its image n0\.jpg"):
        convert_magnetic_tile(src, tmp_path / "o3", limit_per_class=1)   # n1 (no mask) not taken
    with pytest.warns(DataPrepWarning, match=r"skipped 2 bad") as rec:
        out = convert_magnetic_tile(src, tmp_path / "o4", skip_bad=True)
    assert "n1.jpg" in str(rec[0].message) and "n0.png" in str(rec[0].message)
    assert len(_csv_rows(out)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataPrepError, match="empty source folder"):
        convert_magnetic_tile(empty, tmp_path / "o5")


# ============================================================================================
# split
# ============================================================================================
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), val=st.floats(0, 0.45), test=st.floats(0, 0.45))
def test_allocate_properties(n, val, test):
    tr, va, te = allocate(n, val, test)
    assert tr + va + te == n and min(tr, va, te) >= 0
    if n >= 1:
        assert tr >= 1
    if n >= 3:
        assert va >= (1 if val > 0 else 0) and te >= (1 if test > 0 else 0)


def test_split_stratified_and_deterministic(tmp_path, small_synth):
    out = split_dataset(small_synth, tmp_path / "s", seed=5)
    plan = json.loads((out / "split.json").read_text())
    assert plan["seed"] == 5 and plan["protocol"] == "stratified"
    all_files = sorted(p.name for p in (small_synth / "images").iterdir())
    parts = {sp: sorted(p.name for p in (out / sp / "images").iterdir()) for sp in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == all_files                       # a partition
    for sp, names in parts.items():
        assert names == plan["files"][sp]
        assert sorted(p.name for p in (out / sp / "labels").iterdir()) == names
        rows = _csv_rows(out / sp)
        assert sorted(r["file"] for r in rows) == names
        assert {r["class"] for r in rows} == set(DEFECT_CLASSES) | {"free"}   # every class (>= 3 images) everywhere
        scan_dataset(out / sp)
    for cls, assigned in plan["assignment"].items():
        assert assigned == ["train", "val", "test"]
    assert (small_synth / "images").is_dir() and len(all_files) == 9 * 3 + 4  # copied, not moved

    again = split_dataset(small_synth, tmp_path / "s2", seed=5)
    assert json.loads((again / "split.json").read_text())["files"] == plan["files"]
    other = split_dataset(small_synth, tmp_path / "s3", seed=6)
    assert json.loads((other / "split.json").read_text())["files"] != plan["files"]


def test_split_holdout_classes(tmp_path, small_synth):
    out = split_dataset(small_synth, tmp_path / "h", seed=1, holdout_classes=["crack", "open"])
    plan = json.loads((out / "split.json").read_text())
    assert plan["protocol"] == "holdout-classes" and plan["holdout_classes"] == ["crack", "open"]
    for sp in ("train", "val"):
        assert not {r["class"] for r in _csv_rows(out / sp)} & {"crack", "open"}
        assert "free" in {r["class"] for r in _csv_rows(out / sp)}
    test_classes = [r["class"] for r in _csv_rows(out / "test")]
    assert test_classes.count("crack") == 3 and test_classes.count("open") == 3 and "free" in test_classes
    assert plan["assignment"]["crack"] == ["test"] and plan["assignment"]["free"] == ["train", "val", "test"]

    out2 = split_dataset(small_synth, tmp_path / "h2", seed=1, holdout_n=3)
    plan2 = json.loads((out2 / "split.json").read_text())
    assert len(plan2["holdout_classes"]) == 3 and "free" not in plan2["holdout_classes"]
    out3 = split_dataset(small_synth, tmp_path / "h3", seed=1, holdout_n=3)
    assert json.loads((out3 / "split.json").read_text())["holdout_classes"] == plan2["holdout_classes"]

    with pytest.raises(DataPrepError, match="not in the dataset"):
        split_dataset(small_synth, tmp_path / "h4", holdout_classes=["dent"])
    with pytest.raises(DataPrepError, match="free"):
        split_dataset(small_synth, tmp_path / "h5", holdout_classes=["free"])
    with pytest.raises(DataPrepError, match="holdout-n"):
        split_dataset(small_synth, tmp_path / "h6", holdout_n=9)


def test_split_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(DataPrepError, match="empty source folder"):
        split_dataset(empty, tmp_path / "o0")

    src = _tiny_dataset(tmp_path / "tiny")
    pit_label = src / "labels" / "pit_0001.png"
    pit_bytes = pit_label.read_bytes()
    pit_label.unlink()
    with pytest.raises(DataPrepError, match=r"pit_0001\.png: image without a label"):
        split_dataset(src, tmp_path / "o1")
    pit_label.write_bytes(pit_bytes)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(src / "labels" / "scratch_0002.png")
    with pytest.raises(DataPrepError, match=r"scratch_0002\.png: label size 3x3 differs from its image"):
        split_dataset(src, tmp_path / "o2")
    trunc = src / "images" / "free_0003.png"
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"free_0003\.png: unreadable or truncated"):
        split_dataset(src, tmp_path / "o2")
    pit_label.unlink()
    with pytest.warns(DataPrepWarning) as rec:
        out = split_dataset(src, tmp_path / "o3", skip_bad=True)
    msg = str(rec[0].message)
    assert "skipped 3 bad" in msg and "pit_0001" in msg and "scratch_0002" in msg and "free_0003" in msg
    plan = json.loads((out / "split.json").read_text())
    assert sum(len(v) for v in plan["files"].values()) == 12 - 3

    with pytest.raises(DataPrepError, match="inside the source"):
        split_dataset(src, src / "split")
    with pytest.raises(DataPrepError, match="contains the source"):
        split_dataset(src, tmp_path)
    with pytest.raises(DataPrepError, match="below 1"):
        split_dataset(src, tmp_path / "o4", val=0.5, test=0.5, skip_bad=True)


def test_scan_dataset_other_problems(tmp_path):
    src = _tiny_dataset(tmp_path / "t", n=3)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(src / "labels" / "ghost_0000.png")
    with pytest.raises(DataPrepError, match=r"ghost_0000\.png: label without an image"):
        scan_dataset(src)
    (src / "labels" / "ghost_0000.png").unlink()
    common.write_classes_csv(src, _csv_rows(src) + [{"file": "gone.png", "class": "pit"}])
    with pytest.raises(DataPrepError, match=r"classes\.csv: lists 'gone\.png'"):
        scan_dataset(src)
    with pytest.raises(DataPrepError, match="no images/ folder"):
        scan_dataset(tmp_path)


@pytest.mark.parametrize("name, cls", [
    ("crack_exp1_num_3191.jpg", "crack"),  # magnetic tile: <class>_<source stem>
    ("crack_exp1_num_3191", "crack"),
    ("mouse_bite_000518.jpg", "mouse_bite"),  # synthetic: <class>_<index>
    ("free_000003.png", "free"),
    ("000123.png", "000123"),  # no class prefix: the stem
    ("c0_00001.png", "c0"),  # no alphabetic first token: before the last "_"
    ("front.png", "front"),  # no digits, one token
    ("scratch_left.png", "scratch"),  # no digits, several tokens: before the last "_"
    ("a_1_2.png", "a"),
])
def test_class_from_filename_one_rule(name, cls):
    # one function, the layout's: data_prep re-exports it and defines no rule of its own
    assert common.class_from_filename is layout.class_from_filename
    assert layout.class_from_filename(name) == cls
    assert layout.class_of(name, {}) == cls  # what DefectIndex.scan, read_manifest and scan_dataset use
    for mod in pkgutil.iter_modules(data_prep.__path__):
        m = importlib.import_module(f"data_prep.{mod.name}")
        own = [n for n, f in inspect.getmembers(m, inspect.isfunction) if f.__module__ == m.__name__]
        assert not [n for n in own if "class_from" in n or n in ("read_classes_csv", "image_size", "read_image")], m


@pytest.mark.parametrize("header", ["name,label\n", "file;class\n", ""])
def test_bad_classes_csv_one_error_type(tmp_path, header, capsys):
    root = _tiny_dataset(tmp_path / "t", classes=("pit", "free"), n=2)
    (root / "classes.csv").write_text(header + "pit_0000.png,pit\n")
    errors = []
    for read in (layout.DefectIndex.scan, scan_dataset, common.read_classes_csv, layout.read_classes_csv,
                 lambda r: layout.read_manifest(r, labels=False)):
        with pytest.raises(DatasetError, match=r"classes\.csv: needs the columns 'file,class") as e:
            read(root)
        errors.append(type(e.value))
    assert set(errors) == {DatasetError}  # the same type from the library and data_prep
    assert issubclass(DataPrepError, DatasetError)
    assert cli_main(["prepare", "stats", "--src", str(root)]) == 2  # the CLI reports it
    assert "classes.csv: needs the columns" in capsys.readouterr().err


def test_class_from_filename_fallback(tmp_path):
    assert class_from_filename("mouse_bite_000518.jpg") == "mouse_bite"
    assert class_from_filename("crack_exp1_num_3191.jpg") == "crack"
    assert class_from_filename("Cable_thunderbolt_x.png", {"Cable_thunderbolt", "Cable"}) == "Cable_thunderbolt"
    src = _tiny_dataset(tmp_path / "t", classes=("mouse_bite", "free"), n=3)
    (src / "classes.csv").unlink()
    assert {s.cls for s in scan_dataset(src)} == {"mouse_bite", "free"}


# ============================================================================================
# stats and CLI
# ============================================================================================
def test_stats(tmp_path):
    src = tmp_path / "flat"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    Image.fromarray(np.full((4, 4, 3), (255, 0, 51), np.uint8)).save(src / "images" / "a_1.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(src / "labels" / "a_1.png")
    Image.fromarray(np.full((4, 4), 0, np.uint8)).save(src / "images" / "a_2.png")      # grayscale
    lbl = np.zeros((4, 4), np.uint8)
    lbl[0, :2] = 255
    Image.fromarray(lbl).save(src / "labels" / "a_2.png")
    s = dataset_stats(src)
    assert s["images"] == 2 and s["classes"] == {"a": 2}
    np.testing.assert_allclose(s["mean"], [0.5, 0.0, 0.1], atol=1e-6)
    np.testing.assert_allclose(s["std"], [0.5, 0.0, 0.1], atol=1e-6)
    assert s["defect_fraction"]["a"] == pytest.approx(1 / 16)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "syn"
    assert cli_main(["prepare", "synthetic", "--out", str(out), "--per-class", "3", "--size", "48",
                     "--free", "3", "--seed", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(_csv_rows(out)) == 9 * 3 + 3  # 3 defect-free images: a split needs 3 groups per class
    assert cli_main(["prepare", "synthetic", "--out", str(out), "--per-class", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err

    sp = tmp_path / "split"
    assert cli_main(["prepare", "split", "--src", str(out), "--out", str(sp), "--holdout-classes", "pit,stain"]) == 0
    assert "held out: pit, stain" in capsys.readouterr().out
    assert cli_main(["prepare", "stats", "--src", str(sp / "train"), "--out", str(tmp_path / "st.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "st.json").read_text()) and len(printed["mean"]) == 3
    assert cli_main(["prepare", "stats", "--src", str(out), "--out", str(out / "stats.json")]) == 2
    assert "inside the source" in capsys.readouterr().err and not (out / "stats.json").exists()

    src = _make_vision(tmp_path / "vision")
    ann = src / "Screw" / "valid" / "_annotations.coco.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["image_id"] = 7
    ann.write_text(json.dumps(data))
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "unknown image id 7" in err and str(ann) in err
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(tmp_path / "c"), "--skip-bad"]) == 0
    assert "warning: skipped 1 bad" in capsys.readouterr().err

    mt = _fake_mt(tmp_path / "mtsrc")
    assert cli_main(["prepare", "magnetic-tile", "--src", str(mt), "--out", str(tmp_path / "mt")]) == 0
    assert cli_main(["prepare", "preview", "--src", str(out), "--out", str(tmp_path / "sheet.png")]) == 0
    assert Image.open(tmp_path / "sheet.png").size[0] > 100
    assert _no_temp_leftovers(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["prepare", "split", "--src", str(out), "--out", str(sp), "--val", "1.5"])
