"""``seggpt prepare coco`` on an export with several categories: each image written ONCE with a
class-index mask (value k = the k-th class, named in ``labels.txt``), each class pycocotools'
union of its category (the smaller class wins where two overlap), read back by ``DefectIndex``
as a member of every class it holds; single-category exports unchanged; ``--per-category-copies``
keeps the old copies; ``prepare split --class-names`` names a folder's label values."""
from __future__ import annotations

import csv
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_prep.common import DataPrepError, parse_class_names
from data_prep.split import split_dataset
from data_prep.vision_coco import convert_vision_coco, mask_to_rle
from seggpt_lib.cli import main as cli_main
from seggpt_lib.data.layout import DefectIndex, read_class_names, read_label

coco_mask = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402  (the oracle: COCO's own annToMask)
from test_coco import _write_export  # noqa: E402  (one writer of COCO fixtures)

SPLITS = ("train", "val", "test")


def _oracle(ann_file: Path) -> dict[str, tuple[dict[int, np.ndarray], np.ndarray]]:
    """Per image file name: ({category id: union of its non-crowd annotations}, crowd union), by
    pycocotools' annToMask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco = COCO(str(ann_file))
        out = {}
        for iid, info in coco.imgs.items():
            h, w = info["height"], info["width"]
            per_cat: dict[int, np.ndarray] = {}
            crowd = np.zeros((h, w), bool)
            for a in coco.imgToAnns.get(iid, []):
                m = coco.annToMask(a).astype(bool)
                if a.get("iscrowd"):
                    crowd |= m
                else:
                    per_cat[a["category_id"]] = per_cat.get(a["category_id"], np.zeros((h, w), bool)) | m
            out[info["file_name"]] = (per_cat, crowd)
    return out


def _expected(per_value: dict[int, np.ndarray], shape) -> np.ndarray:
    """The documented overlap rule, written independently: a pixel takes the value of the class
    with the smallest area among those covering it (equal areas: the lower value)."""
    out = np.zeros(shape, np.uint8)
    best = np.full(shape, np.inf)
    for v in sorted(per_value):
        m = per_value[v]
        area = int(m.sum())
        take = m & (area < best)
        out[take], best[take] = v, area
    return out


def _rows(root: Path) -> dict[str, dict]:
    with open(root / "classes.csv", newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# one image, several classes
# --------------------------------------------------------------------------------------------
def _two_category_export(folder: Path) -> Path:
    h, w = 24, 32
    crowd = np.zeros((h, w), bool)
    crowd[18:22, 20:30] = True
    anns = [
        # category 1 "scratch" (id order: scratch before dent; name order: dent = 1, scratch = 2)
        {"image_id": 1, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 14, 2, 14]]},       # 18 x 12
        {"image_id": 1, "category_id": 1, "segmentation": mask_to_rle(crowd), "iscrowd": 1},
        # category 2 "dent": a small square inside the scratch, and a separate one
        {"image_id": 1, "category_id": 2, "segmentation": [[10, 5, 15, 5, 15, 10, 10, 10]]},
        {"image_id": 1, "category_id": 2, "segmentation": [[24, 2, 28, 2, 28, 6, 24, 6]]},
        {"image_id": 2, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},            # one class only
    ]
    return _write_export(folder, [("both.png", w, h), ("one.png", w, h), ("none.png", w, h)], anns,
                         cats=[(1, "scratch"), (2, "dent")])


def test_two_categories_one_image_class_index_mask(tmp_path):
    ann_file = _two_category_export(tmp_path / "src")
    out = convert_vision_coco(tmp_path / "src", tmp_path / "out")
    assert (out / "labels.txt").read_text() == "dent\nscratch\n"                 # sorted names: 1, 2
    assert read_class_names(out) == {1: "dent", 2: "scratch"}
    rows = _rows(out)
    assert set(rows) == {"scratch_both.png", "scratch_one.png", "free_none.png"}  # ONE image per photo
    value = {"dent": 1, "scratch": 2}
    cat_value = {2: value["dent"], 1: value["scratch"]}

    per_cat, crowd = _oracle(ann_file)["both.png"]
    lbl = read_label(out / "labels" / "scratch_both.png")
    assert set(np.unique(lbl)) == {0, 1, 2}
    union = np.zeros(lbl.shape, bool)
    for cid, m in per_cat.items():
        union |= m
    np.testing.assert_array_equal(lbl > 0, union)                                  # the binary union, unchanged
    # the overlap rule: dent (smaller) wins inside the scratch; elsewhere each class is its category
    np.testing.assert_array_equal(lbl == value["dent"], per_cat[2])
    np.testing.assert_array_equal(lbl == value["scratch"], per_cat[1] & ~per_cat[2])
    np.testing.assert_array_equal(lbl, _expected({cat_value[c]: m for c, m in per_cat.items()}, lbl.shape))
    # crowd: the ignore mask, outside the label
    np.testing.assert_array_equal(read_label(out / "labels_ignore" / "scratch_both.png") > 0, crowd & ~union)

    r = rows["scratch_both.png"]
    assert r["class"] == "scratch" and r["classes"] == "dent;scratch"            # main class: most pixels
    assert r["group"] == "both" and rows["scratch_one.png"]["classes"] == "scratch"
    assert (out / "images" / "scratch_both.png").read_bytes() == (tmp_path / "src" / "both.png").read_bytes()
    assert read_label(out / "labels" / "scratch_one.png").max() == value["scratch"]

    index = DefectIndex.scan(out)
    i = index.files.index("scratch_both.png")
    assert index.multiclass and index.classes_in(i) == ["dent", "scratch"] and index.class_of(i) == "scratch"
    assert index.label_value("dent") == 1 and index.label_value("scratch") == 2
    assert index.classes_in(index.files.index("scratch_one.png")) == ["scratch"]
    assert index.is_free[index.files.index("free_none.png")]


def test_overlap_tie_goes_to_the_lower_value(tmp_path):
    sq = [[2, 2, 8, 2, 8, 8, 2, 8]]
    _write_export(tmp_path / "src", [("a.png", 12, 12)], [
        {"image_id": 1, "category_id": 1, "segmentation": sq},                 # "b_cls": value 2
        {"image_id": 1, "category_id": 2, "segmentation": sq},                 # "a_cls": value 1
    ], cats=[(1, "b_cls"), (2, "a_cls")])
    out = convert_vision_coco(tmp_path / "src", tmp_path / "out")
    (row,) = _rows(out).values()
    lbl = read_label(out / "labels" / (Path(row["file"]).stem + ".png"))
    assert set(np.unique(lbl)) == {0, 1} and row["class"] == "a_cls" and row["classes"] == "a_cls"


_coord = st.floats(min_value=-3, max_value=17, allow_nan=False, allow_infinity=False).map(lambda v: round(v, 2))


@st.composite
def _annotation(draw, h: int, w: int):
    cat = draw(st.sampled_from([1, 2, 3]))
    crowd = draw(st.booleans())
    if draw(st.booleans()):
        polys = draw(st.lists(st.lists(_coord, min_size=6, max_size=12).filter(lambda p: len(p) % 2 == 0),
                              min_size=1, max_size=2))
        return {"category_id": cat, "segmentation": polys, "iscrowd": int(crowd)}
    m = np.array(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), bool).reshape(h, w)
    return {"category_id": cat, "segmentation": mask_to_rle(m), "iscrowd": int(crowd)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_class_index_masks_equal_pycocotools_per_category(data):
    """Random annotations of three categories on one image: the mask's union is pycocotools'
    union of the non-crowd annotations (as in binary masks), each value that category's union
    less the pixels a smaller class wins; the ignore mask the crowd union outside the label."""
    h, w = data.draw(st.integers(1, 10), label="h"), data.draw(st.integers(1, 10), label="w")
    anns = data.draw(st.lists(_annotation(h, w), min_size=1, max_size=5), label="anns")
    for a in anns:
        a["image_id"] = 1
    cats = [(1, "c1"), (2, "c2"), (3, "c3")]
    if all(a["iscrowd"] for a in anns):
        return                                   # crowd only: left out (tests/test_coco.py)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann_file = _write_export(tmp / "src", [("a.png", w, h)], [dict(a) for a in anns], cats)
        per_cat, crowd = _oracle(ann_file)["a.png"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert_vision_coco(tmp / "src", tmp / "out")
        (row,) = _rows(out).values()
        lbl = read_label(out / "labels" / (Path(row["file"]).stem + ".png"))
        union = np.zeros((h, w), bool)
        for m in per_cat.values():
            union |= m
        np.testing.assert_array_equal(lbl > 0, union)
        if len(per_cat) > 1:                      # several classes: class-index mask, c<k> = value k
            assert read_class_names(out) == {i + 1: f"c{k}" for i, k in enumerate(sorted(per_cat))}
            value = {name: v for v, name in read_class_names(out).items()}
            expected = _expected({value[f"c{k}"]: m for k, m in per_cat.items()}, (h, w))
            np.testing.assert_array_equal(lbl, expected)
            for k, m in per_cat.items():          # each class lies within its category's union
                assert not ((lbl == value[f"c{k}"]) & ~m).any()
            held = sorted(f"c{k}" for k in per_cat if (lbl == value[f"c{k}"]).any())
            assert row["classes"] == ";".join(held)
            if held:                              # the main class: most pixels, ties the lower value
                assert row["class"] == min(held, key=lambda c: (-int((lbl == value[c]).sum()), value[c]))
        else:                                     # one class: binary, as before
            assert not (out / "labels.txt").exists() and set(np.unique(lbl)) <= {0, 255}
        ign = out / "labels_ignore" / (Path(row["file"]).stem + ".png")
        np.testing.assert_array_equal(read_label(ign) > 0 if ign.exists() else np.zeros((h, w), bool),
                                      crowd & ~union)


# --------------------------------------------------------------------------------------------
# what stays as it was, and the opt-ins
# --------------------------------------------------------------------------------------------
def test_single_category_export_is_binary_and_unchanged(tmp_path):
    _write_export(tmp_path / "src", [("a.png", 16, 12), ("b.png", 16, 12)], [
        {"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
    ], cats=[(1, "scratch")])
    out = convert_vision_coco(tmp_path / "src", tmp_path / "out")
    assert not (out / "labels.txt").exists() and not (out / "class_index.json").exists()
    assert set(_rows(out)) == {"scratch_a.png", "free_b.png"} and "classes" not in _rows(out)["scratch_a.png"]
    assert set(np.unique(read_label(out / "labels" / "scratch_a.png"))) == {0, 255}
    copies = convert_vision_coco(tmp_path / "src", tmp_path / "copies", multiclass=False)
    assert _snapshot(out) == _snapshot(copies)
    # --multiclass asks for class-index masks even with one category
    mc = tmp_path / "mc"
    assert cli_main(["prepare", "coco", "--src", str(tmp_path / "src"), "--out", str(mc), "--multiclass"]) == 0
    assert (mc / "labels.txt").read_text() == "scratch\n"
    assert set(np.unique(read_label(mc / "labels" / "scratch_a.png"))) == {0, 1}


def test_per_category_copies_opt_in_and_kept_splits(tmp_path, capsys):
    _two_category_export(tmp_path / "export" / "train")
    _write_export(tmp_path / "export" / "test", [("t.png", 16, 12)], [
        {"image_id": 1, "category_id": 2, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]},
    ], cats=[(1, "scratch"), (2, "dent")])
    src = tmp_path / "export"
    copies = tmp_path / "copies"
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(copies), "--per-category-copies"]) == 0
    assert set(_rows(copies / "train")) == {"scratch_both.png", "dent_both.png", "scratch_one.png", "free_none.png"}
    assert not (copies / "labels.txt").exists() and not (copies / "train" / "labels.txt").exists()
    assert set(np.unique(read_label(copies / "train" / "labels" / "dent_both.png"))) == {0, 255}
    with pytest.raises(SystemExit):
        cli_main(["prepare", "coco", "--src", str(src), "--out", str(tmp_path / "x"), "--multiclass",
                  "--per-category-copies"])
    capsys.readouterr()
    # the default with the export's split kept: labels.txt in the root and in every split folder
    out = tmp_path / "out"
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(out)]) == 0
    for root in (out, out / "train", out / "test"):
        assert (root / "labels.txt").read_text() == "dent\nscratch\n"
    assert set(_rows(out / "train")) == {"scratch_both.png", "scratch_one.png", "free_none.png"}
    assert set(np.unique(read_label(out / "test" / "labels" / "dent_t.png"))) == {0, 1}


# --------------------------------------------------------------------------------------------
# --class-names: a folder of class-index masks without labels.txt
# --------------------------------------------------------------------------------------------
def _class_index_folder(root: Path, values=((1,), (1,), (1, 2), (2,), (2,), (2, 1))) -> Path:
    rng = np.random.default_rng(3)
    for i, vs in enumerate(values):
        img = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        lbl = np.zeros((20, 24), np.uint8)
        for k, v in enumerate(vs):                # the first value covers most pixels
            lbl[2 + 9 * k:8 + 9 * k + (3 if k == 0 else 0), 2:20] = v
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"{i:04d}.png")
        Image.fromarray(lbl).save(root / "labels" / f"{i:04d}.png")
    return root


def test_class_names_write_labels_txt(tmp_path, capsys):
    src = _class_index_folder(tmp_path / "folder")
    out = tmp_path / "split"
    assert cli_main(["prepare", "split", "--src", str(src), "--out", str(out), "--no-dedup",
                     "--class-names", "crack, scratch"]) == 0
    plan = json.loads((out / "split.json").read_text())
    assert plan["classes"]["crack"] and plan["classes"]["scratch"]           # classes from the masks' values
    for sp in SPLITS:
        assert (out / sp / "labels.txt").read_text() == "crack\nscratch\n"
    both = next(sp for sp in SPLITS if "0002.png" in plan["files"][sp])
    index = DefectIndex.scan(out / both)
    assert index.classes_in(index.files.index("0002.png")) == ["crack", "scratch"]
    assert not (src / "labels.txt").exists()                                     # the source is untouched


def test_class_names_count_mismatch_is_a_clear_error(tmp_path, capsys):
    src = _class_index_folder(tmp_path / "folder")
    assert cli_main(["prepare", "split", "--src", str(src), "--out", str(tmp_path / "o1"),
                     "--class-names", "crack,scratch,pit"]) == 2
    err = capsys.readouterr().err
    assert str(src / "labels") in err and "3 name(s)" in err and "label values 1, 2" in err and "in no mask: 3" in err
    assert not (tmp_path / "o1").exists()
    with pytest.raises(DataPrepError, match=r"1 name\(s\).*label values 1, 2.*not named: 2 \(e\.g\. .*0002\.png\)"):
        split_dataset(src, tmp_path / "o2", class_names=["crack"])
    # binary masks are no class-index masks
    Image.fromarray(np.full((20, 24), 255, np.uint8)).save(src / "labels" / "0005.png")
    with pytest.raises(DataPrepError, match=r"not named: 255 \(e\.g\. .*0005\.png\).*need no --class-names"):
        split_dataset(src, tmp_path / "o3", class_names=["crack", "scratch"])
    # names a labels.txt already gives differently; bad names
    (src / "labels.txt").write_text("crack\nother\n")
    with pytest.raises(DataPrepError, match=r"labels\.txt.*already names"):
        split_dataset(src, tmp_path / "o4", class_names="crack,scratch")
    for bad, match in (("a,,b", "empty class name"), ("a,a", "named twice"), ("free", "defect-free"),
                       ("background,a", "cannot name")):
        with pytest.raises(DataPrepError, match=match):
            parse_class_names(bad)
