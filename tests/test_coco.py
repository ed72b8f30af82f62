"""``seggpt prepare coco``: masks equal to pycocotools pixel for pixel (polygons, RLE, crowd),
bad annotations handled one by one, detection-only exports refused, Roboflow's layout and
splits, EXIF orientation."""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_prep.common import DataPrepError, DataPrepWarning
from data_prep.vision_coco import convert_vision_coco, mask_to_rle, polygons_to_mask
from seggpt_lib.cli import main as cli_main
from seggpt_lib.data.layout import is_split_root, read_label, read_rgb

coco_mask = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402  (the oracle: COCO's own annToMask)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _write_export(folder: Path, images: list[tuple[str, int, int]], anns: list[dict],
                  cats=((1, "scratch"),), image_dir: Path | None = None, colour=90) -> Path:
    """A COCO file ``folder/_annotations.coco.json`` and its images (in ``image_dir``, default
    beside it). ``images``: (file name, width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_dir = image_dir or folder
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, w, h) in enumerate(images, start=1):
        Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(image_dir / name)
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
    for k, a in enumerate(anns, start=1):
        a.setdefault("id", k)
        a.setdefault("category_id", 1)
        a.setdefault("iscrowd", 0)
    data = {"images": entries, "annotations": anns,
            "categories": [{"id": i, "name": n, "supercategory": "defect"} for i, n in cats]}
    path = folder / "_annotations.coco.json"
    path.write_text(json.dumps(data))
    return path


def _oracle(ann_file: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per image file name: (union of non-crowd annotations, union of crowd ones), by pycocotools."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco = COCO(str(ann_file))
        out = {}
        for iid, info in coco.imgs.items():
            h, w = info["height"], info["width"]
            defect, crowd = np.zeros((h, w), bool), np.zeros((h, w), bool)
            for a in coco.imgToAnns.get(iid, []):
                m = coco.annToMask(a).astype(bool)
                if a.get("iscrowd"):
                    crowd |= m
                else:
                    defect |= m
            out[info["file_name"]] = (defect, crowd)
    return out


def _label(out: Path, file: str) -> np.ndarray:
    return read_label(out / "labels" / (Path(file).stem + ".png")) > 0


def _rows(root: Path) -> dict[str, dict]:
    import csv
    with open(root / "classes.csv", newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def _pycoco_polygons(polys, h, w) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polys, h, w))).astype(bool)


# --------------------------------------------------------------------------------------------
# pixel rule
# --------------------------------------------------------------------------------------------
def test_square_polygon_is_100_pixels(tmp_path):
    square = [[0, 0, 10, 0, 10, 10, 0, 10]]
    m = polygons_to_mask(square, 20, 20)
    assert m.sum() == 100 and m[:10, :10].all()          # PIL's rule gave 121 (right/bottom edge in)
    _write_export(tmp_path / "src", [("a.png", 20, 20)], [{"image_id": 1, "segmentation": square}])
    out = convert_vision_coco(tmp_path / "src", tmp_path / "out")
    assert _label(out, "scratch_a.png").sum() == 100


_coord = st.floats(min_value=-3, max_value=27, allow_nan=False, allow_infinity=False).map(lambda v: round(v, 2))


@st.composite
def _annotation(draw, h: int, w: int):
    kind = draw(st.sampled_from(["polygon", "rle_list", "rle_string"]))
    crowd = draw(st.booleans())
    if kind == "polygon":
        polys = draw(st.lists(st.lists(_coord, min_size=6, max_size=16).filter(lambda p: len(p) % 2 == 0),
                              min_size=1, max_size=3))
        return {"segmentation": polys, "iscrowd": int(crowd)}
    m = np.array(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), bool).reshape(h, w)
    rle = mask_to_rle(m)
    if kind == "rle_string":
        enc = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        rle = {"size": [h, w], "counts": enc["counts"].decode("ascii")}
    return {"segmentation": rle, "iscrowd": int(crowd)}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_masks_equal_pycocotools(data):
    """Random polygons, uncompressed and compressed RLE, crowd or not, on small images: the
    label is pycocotools' union of the non-crowd annotations, the ignore mask its crowd union
    (outside the label)."""
    h, w = data.draw(st.integers(1, 14), label="h"), data.draw(st.integers(1, 14), label="w")
    anns = data.draw(st.lists(_annotation(h, w), min_size=1, max_size=4), label="anns")
    for a in anns:
        a["image_id"] = 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann_file = _write_export(tmp / "src", [("a.png", w, h)], [dict(a) for a in anns])
        defect, crowd = _oracle(ann_file)["a.png"]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = convert_vision_coco(tmp / "src", tmp / "out") if not all(a["iscrowd"] for a in anns) else None
        if out is None:      # only crowd regions: left out, with a warning, never "free"
            with pytest.warns(DataPrepWarning, match="only crowd"), pytest.raises(DataPrepError, match="no usable"):
                convert_vision_coco(tmp / "src", tmp / "out2")
            return
        assert not [r for r in rec if "polygon" in str(r.message)]
        rows = _rows(out)
        assert len(rows) == 1
        (file,) = rows
        np.testing.assert_array_equal(_label(out, file), defect)
        ign_path = out / "labels_ignore" / (Path(file).stem + ".png")
        ign = read_label(ign_path) > 0 if ign_path.exists() else np.zeros((h, w), bool)
        np.testing.assert_array_equal(ign, crowd & ~defect)


def test_crowd_regions_ignore_mask_or_defect_with_flag(tmp_path):
    h, w = 12, 16
    crowd = np.zeros((h, w), bool)
    crowd[6:10, 8:14] = True
    square = [[1, 1, 5, 1, 5, 5, 1, 5]]
    _write_export(tmp_path / "src", [("a.png", w, h), ("b.png", w, h)], [
        {"image_id": 1, "segmentation": square},
        {"image_id": 1, "segmentation": mask_to_rle(crowd), "iscrowd": 1},
        {"image_id": 2, "segmentation": mask_to_rle(crowd), "iscrowd": 1},     # crowd only
    ])
    with pytest.warns(DataPrepWarning, match=r"b\.png: left out, only crowd"):
        out = convert_vision_coco(tmp_path / "src", tmp_path / "out")
    assert set(_rows(out)) == {"scratch_a.png"}                     # b is not written as defect-free
    lbl = _label(out, "scratch_a.png")
    assert lbl.sum() == 16 and not (lbl & crowd).any()
    np.testing.assert_array_equal(read_label(out / "labels_ignore" / "scratch_a.png") > 0, crowd)

    out2 = convert_vision_coco(tmp_path / "src", tmp_path / "out2", crowd_as_defect=True)
    assert set(_rows(out2)) == {"scratch_a.png", "scratch_b.png"}
    np.testing.assert_array_equal(_label(out2, "scratch_a.png"), polygons_to_mask(square, h, w) | crowd)
    assert not (out2 / "labels_ignore").exists()


# --------------------------------------------------------------------------------------------
# bad annotations, one by one
# --------------------------------------------------------------------------------------------
def test_degenerate_polygon_skipped_alone(tmp_path):
    h, w = 20, 24
    good_a = [2, 2, 9, 2, 9, 8, 2, 8]
    good_b = [12, 10, 20, 10, 16, 18]
    _write_export(tmp_path / "src", [("img.png", w, h), ("other.png", w, h)], [
        {"id": 7, "image_id": 1, "segmentation": [good_a]},
        {"id": 8, "image_id": 1, "segmentation": [[3, 3, 10, 10]]},             # 4 coordinates: 2 points
        {"id": 9, "image_id": 1, "segmentation": [good_b, [1, 1]]},             # one good, one degenerate
        {"id": 10, "image_id": 2, "segmentation": [[5, 5, 6, 6]]},             # the image's only polygon
    ])
    with pytest.warns(DataPrepWarning) as rec:
        out = convert_vision_coco(tmp_path / "src", tmp_path / "out")     # no skip_bad needed
    text = "\n".join(str(r.message) for r in rec)
    assert "annotation 8 (image img.png): polygon 0 has 4 coordinates" in text
    assert "annotation 9 (image img.png): polygon 1 has 2 coordinates" in text
    assert "other.png: left out" in text
    assert set(_rows(out)) == {"scratch_img.png"}                    # other.png: not "free"
    np.testing.assert_array_equal(_label(out, "scratch_img.png"), _pycoco_polygons([good_a, good_b], h, w))


def test_malformed_annotation_skip_bad_keeps_the_rest_of_the_image(tmp_path):
    h, w = 16, 16
    good = [1, 1, 8, 1, 8, 8, 1, 8]
    _write_export(tmp_path / "src", [("img.png", w, h)], [
        {"id": 1, "image_id": 1, "segmentation": [good]},
        {"id": 2, "image_id": 1, "segmentation": [[1, 1, 5, 1, 5, "x"]]},
    ])
    with pytest.raises(DataPrepError, match=r"annotation 2 \(image img\.png\): bad segmentation"):
        convert_vision_coco(tmp_path / "src", tmp_path / "o1")
    with pytest.warns(DataPrepWarning, match=r"annotation 2 \(image img\.png\)"):
        out = convert_vision_coco(tmp_path / "src", tmp_path / "o2", skip_bad=True)
    np.testing.assert_array_equal(_label(out, "scratch_img.png"), _pycoco_polygons([good], h, w))


@pytest.mark.parametrize("missing", [True, False])
def test_detection_only_export_is_rejected(tmp_path, capsys, missing):
    ann = {"id": 5, "image_id": 1, "bbox": [2, 3, 6, 4], "area": 24}
    if not missing:
        ann["segmentation"] = []
    _write_export(tmp_path / "src", [("box.png", 16, 12)], [ann])
    with pytest.raises(DataPrepError, match=r"annotation 5 \(image box\.png\) has no segmentation.*--boxes-as-masks"):
        convert_vision_coco(tmp_path / "src", tmp_path / "o1")
    assert cli_main(["prepare", "coco", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2")]) == 2
    assert "annotation 5 (image box.png) has no segmentation" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # opt-in: the bbox filled, by pycocotools' box rule
    out = convert_vision_coco(tmp_path / "src", tmp_path / "o3", boxes_as_masks=True)
    expected = np.zeros((12, 16), bool)
    expected[3:7, 2:8] = True
    np.testing.assert_array_equal(_label(out, "scratch_box.png"), expected)


# --------------------------------------------------------------------------------------------
# Roboflow's layout and splits
# --------------------------------------------------------------------------------------------
def _roboflow(root: Path) -> Path:
    poly = [[2, 2, 10, 2, 10, 9, 2, 9]]
    # train: images beside the JSON (.jpg, Roboflow's names); valid: in images/; test: beside
    _write_export(root / "train", [("a_jpg.rf.111.jpg", 16, 12), ("b_jpg.rf.222.jpg", 16, 12)],
                  [{"image_id": 1, "segmentation": poly}])
    _write_export(root / "valid", [("c_jpg.rf.333.jpg", 16, 12)], [{"image_id": 1, "segmentation": poly}],
                  image_dir=root / "valid" / "images")
    _write_export(root / "test", [("d_jpg.rf.444.jpg", 16, 12)], [{"image_id": 1, "segmentation": poly}],
                  image_dir=root / "test" / "images")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_roboflow_layout_keeps_splits_in_place(tmp_path, capsys):
    src = _roboflow(tmp_path / "export")
    before = _snapshot(src)
    out = tmp_path / "out"
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(out)]) == 0
    assert "train 2, val 1, test 1" in capsys.readouterr().out
    assert _snapshot(src) == before                                 # nothing moved or changed
    assert is_split_root(out)
    assert set(_rows(out / "train")) == {"scratch_a_jpg.rf.111.jpg", "free_b_jpg.rf.222.jpg"}
    assert set(_rows(out / "val")) == {"scratch_c_jpg.rf.333.jpg"}
    assert set(_rows(out / "test")) == {"scratch_d_jpg.rf.444.jpg"}
    assert _rows(out / "val")["scratch_c_jpg.rf.333.jpg"]["source_split"] == "valid"
    assert json.loads((out / "split.json").read_text())["counts"] == {"train": 2, "val": 1, "test": 1}
    assert (out / "test" / "images" / "scratch_d_jpg.rf.444.jpg").read_bytes() == \
        (src / "test" / "images" / "d_jpg.rf.444.jpg").read_bytes()

    from data_prep.prepare import prepare_data  # DATA=folder:OUT uses it in place
    info = prepare_data(tmp_path / "work", source="folder", source_path=str(out), log=lambda *_: None)
    assert info["split_root"] == str(out)

    # merged on request (and the Python default), the source split kept in a column
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(tmp_path / "flat"), "--no-keep-splits"]) == 0
    rows = _rows(tmp_path / "flat")
    assert len(rows) == 4 and {r["source_split"] for r in rows.values()} == {"train", "valid", "test"}
    assert set(_rows(convert_vision_coco(src, tmp_path / "flat2"))) == set(rows)


def test_pipeline_data_coco_keeps_the_export_split(tmp_path):
    """make reproduce DATA=coco:EXPORT: the export's train/valid/test are kept, never re-split."""
    from data_prep.prepare import prepare_data

    src = _roboflow(tmp_path / "export")
    info = prepare_data(tmp_path / "work", source="coco", source_path=str(src), log=lambda *_: None)
    root = Path(info["split_root"])
    assert is_split_root(root)
    assert set(_rows(root / "train")) == {"scratch_a_jpg.rf.111.jpg", "free_b_jpg.rf.222.jpg"}
    assert set(_rows(root / "val")) == {"scratch_c_jpg.rf.333.jpg"}
    assert set(_rows(root / "test")) == {"scratch_d_jpg.rf.444.jpg"}
    again = prepare_data(tmp_path / "work", source="coco", source_path=str(src), log=lambda *_: None)
    assert again["reused"] and again["split_root"] == info["split_root"]


def test_missing_image_lists_where_it_looked(tmp_path, capsys):
    src = _roboflow(tmp_path / "export")
    (src / "valid" / "images" / "c_jpg.rf.333.jpg").unlink()
    with pytest.raises(DataPrepError, match=r"c_jpg\.rf\.333\.jpg.*not found; looked for .*valid.images"):
        convert_vision_coco(src, tmp_path / "o")
    with pytest.raises(SystemExit):
        cli_main(["prepare", "coco", "--help"])
    assert "images/ beside it" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------
def test_exif_rotated_jpeg_reads_upright_and_matches_its_mask(tmp_path):
    h, w = 40, 64                                   # upright: landscape, bright block top-left
    upright = np.full((h, w, 3), 30, np.uint8)
    upright[4:20, 8:32] = 230
    stored = Image.fromarray(upright).rotate(90, expand=True)      # stored portrait (64 x 40 pixels)
    exif = Image.Exif()
    exif[0x0112] = 6                                # Orientation: rotate 90 clockwise to display
    folder = tmp_path / "src"
    folder.mkdir()
    stored.save(folder / "photo.jpg", quality=95, exif=exif.tobytes())

    rgb = read_rgb(folder / "photo.jpg")
    assert rgb.shape == (h, w, 3)
    assert (np.abs(rgb.astype(int) - upright).max()) < 40

    _write_export(folder, [], [])
    data = json.loads((folder / "_annotations.coco.json").read_text())
    data["images"] = [{"id": 1, "file_name": "photo.jpg", "width": w, "height": h}]   # COCO: upright size
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[8, 4, 32, 4, 32, 20, 8, 20]]}]
    (folder / "_annotations.coco.json").write_text(json.dumps(data))
    out = convert_vision_coco(folder, tmp_path / "out")
    img = read_rgb(out / "images" / "scratch_photo.jpg")
    lbl = _label(out, "scratch_photo.jpg")
    assert img.shape[:2] == lbl.shape == (h, w)
    np.testing.assert_array_equal(img.mean(axis=2) > 128, lbl)
