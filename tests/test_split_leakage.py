"""Leak-free splits: groups (classes.csv ``group``, COCO per-category copies), near-duplicates
(rotated / flipped / re-encoded copies), refused splits and the one-class-per-image warning."""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import common
from data_prep import near_duplicates as nd
from data_prep.common import DataPrepError, DataPrepWarning, FilenameClassWarning, Sample, scan_dataset
from data_prep.split import allocate, cut_groups, plan_split, split_dataset
from data_prep.vision_coco import convert_vision_coco
from seggpt_lib.cli import main as cli_main

SPLITS = ("train", "val", "test")


def _photo(rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    """A small textured RGB "photo": blurred noise plus a few flat rectangles."""
    a = rng.normal(128, 45, (h + 2, w + 2, 3))
    a = (a[:-2, :-2] + a[1:-1, 1:-1] + a[2:, 2:] + a[:-2, 2:] + a[2:, :-2]) / 5  # a little blur
    for _ in range(3):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        a[y:y + rng.integers(4, 12), x:x + rng.integers(4, 12)] = rng.integers(0, 255, 3)
    return a.clip(0, 255).astype(np.uint8)


def _mask(h: int = 40, w: int = 48, free: bool = False) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if not free:
        m[5:12, 8:20] = 255
    return m


def _save(path: Path, a: np.ndarray, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality is None:
        Image.fromarray(a).save(path)
    else:
        Image.fromarray(a).save(path, format="JPEG", quality=quality)


def _split_of(out: Path) -> dict[str, str]:
    plan = json.loads((out / "split.json").read_text())
    return {f: sp for sp in SPLITS for f in plan["files"][sp]}


def _leaks(out: Path, source_of: dict[str, str]) -> int:
    """Source photos whose files lie in more than one split."""
    where: dict[str, set[str]] = {}
    for f, sp in _split_of(out).items():
        where.setdefault(source_of[f], set()).add(sp)
    return sum(len(v) > 1 for v in where.values())


class _no_warning:
    """Fail when a warning of ``category`` is emitted inside the block."""

    def __init__(self, category):
        self.category = category

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        bad = [w for w in self._log if issubclass(w.category, self.category)]
        assert not bad, [str(w.message) for w in bad]


def _rows(root: Path) -> list[dict]:
    with open(root / "classes.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ the hash
def test_hash_same_for_the_8_dihedral_transforms_and_different_for_other_images():
    rng = np.random.default_rng(0)
    a = _photo(rng)
    variants = nd.dihedral(a)  # rotations and flips of an (H, W, 3) array: first two axes
    assert len(variants) == 8 and {v.shape[:2] for v in variants} == {(40, 48), (48, 40)}
    hashes = {nd.image_hash(np.ascontiguousarray(v)) for v in variants}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64
    # the same through files: PNG copies rotated / flipped by PIL
    im = Image.fromarray(a)
    pil = [im.transpose(t) for t in (Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270, Image.FLIP_LEFT_RIGHT,
                                     Image.FLIP_TOP_BOTTOM, Image.TRANSPOSE, Image.TRANSVERSE)]
    assert {nd.image_hash(p) for p in pil} == hashes
    # a rotated copy re-encoded as JPEG is close; other photos are far
    buf = io.BytesIO()
    im.transpose(Image.ROTATE_90).save(buf, format="JPEG", quality=60)
    jpeg = nd.hash_variants(Image.open(io.BytesIO(buf.getvalue())))
    assert nd.hash_distance(nd.hash_variants(a), jpeg) <= nd.DEFAULT_DISTANCE
    others = [nd.hash_variants(_photo(rng)) for _ in range(6)]
    assert len({nd.image_hash(_photo(np.random.default_rng(k))) for k in range(1, 7)}) == 6
    assert min(nd.hash_distance(nd.hash_variants(a), o) for o in others) > 2 * nd.DEFAULT_DISTANCE
    assert nd.image_hash(np.full((20, 30), 7, np.uint8)) is None  # flat: no hash, never merged


def test_union_find_and_cuts():
    uf = nd.UnionFind("abcde")
    assert uf.union("a", "c") and uf.union("c", "e") and not uf.union("e", "a")
    assert uf.sets() == [["a", "c", "e"], ["b"], ["d"]]
    for n in range(0, 40):  # one image per group: the image-wise allocation
        i, j = cut_groups([1] * n, 0.15, 0.15)
        assert (i, j - i, n - j) == allocate(n, 0.15, 0.15)
    # 17 images: allocate says 11 / 3 / 3; the cuts fall where the image counts come nearest
    assert cut_groups([8, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.2, 0.2) == (4, 7)
    assert cut_groups([1, 1, 1, 1, 1, 1, 1, 1, 1, 8], 0.2, 0.2) == (8, 9)  # the big group last: test gets it
    assert cut_groups([5, 5, 5], 0.2, 0.2) == (1, 2)                        # 3 groups: one in each split
    assert cut_groups([5, 5], 0.2, 0.2) == (2, 2)                           # fewer: allocate of the groups


# ------------------------------------------------------------------------------------------ near-duplicates
def _copies_dataset(root: Path, per_class: int = 6) -> dict[str, str]:
    """Two classes of photos, each photo also as a rotated PNG and a flipped JPEG (quality 70) copy.
    Returns file -> source photo."""
    rng = np.random.default_rng(3)
    source = {}
    for cls in ("scratch", "pit"):
        for k in range(per_class):
            a, m = _photo(rng), _mask()
            src = f"{cls}_{k:03d}"
            for tag, img, lbl, q in (("a", a, m, None), ("rot", np.rot90(a), np.rot90(m), None),
                                     ("flip", a[:, ::-1], m[:, ::-1], 70)):
                name = f"{src}_{tag}." + ("jpg" if q else "png")
                _save(root / "images" / name, np.ascontiguousarray(img), q)
                _save(root / "labels" / f"{src}_{tag}.png", np.ascontiguousarray(lbl))
                source[name] = src
    return source


def test_rotated_flipped_and_jpeg_copies_never_land_in_two_splits(tmp_path, capsys):
    src = tmp_path / "copies"
    source = _copies_dataset(src)
    leaky = split_dataset(src, tmp_path / "before", seed=0, val=0.25, test=0.25, dedup=False)
    assert _leaks(leaky, source) > 0                       # the old behaviour: copies split independently
    out = split_dataset(src, tmp_path / "after", seed=0, val=0.25, test=0.25)
    assert _leaks(out, source) == 0
    plan = json.loads((out / "split.json").read_text())
    nd_report = plan["near_duplicates"]
    assert nd_report["enabled"] and nd_report["merged"] == 12 and nd_report["images"] == 36
    assert all(len(ex) == 3 for ex in nd_report["examples"]) and len(nd_report["examples"]) == 5
    groups = plan["groups"]
    assert groups["total"] == 12 and sum(groups["counts"].values()) == 12 and not groups["from_column"]
    assert len(groups["shared"]) == 12
    for g in groups["shared"].values():                    # split.json records each group with its split
        assert len(g["files"]) == 3 and all(_split_of(out)[f] == g["split"] for f in g["files"])
    for sp in SPLITS:                                      # every class in every split, groups as column
        rows = _rows(out / sp)
        assert {r["class"] for r in rows} == {"scratch", "pit"}
        assert all(r["group"] == r["file"] or r["group"] in groups["shared"] for r in rows)
    # the CLI prints images and groups per split, and the merged near-duplicates
    assert cli_main(["prepare", "split", "--src", str(src), "--out", str(tmp_path / "cli"), "--val", "0.25",
                     "--test", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "images in" in printed and "groups" in printed and "near-duplicates (distance <= 24): 12 group(s)" in printed
    assert cli_main(["prepare", "split", "--src", str(src), "--out", str(tmp_path / "cli2"), "--no-dedup",
                     "--val", "0.25", "--test", "0.25"]) == 0
    assert "not searched" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ COCO groups
def _multi_category_coco(root: Path, n: int = 18) -> Path:
    """A COCO export (``root/train``) whose photos each hold two of three categories."""
    rng = np.random.default_rng(5)
    folder = root / "train"
    folder.mkdir(parents=True)
    cats = [{"id": 1, "name": "crack"}, {"id": 2, "name": "dent"}, {"id": 3, "name": "stain"}]
    images, anns = [], []
    for i in range(n):
        name = f"p{i:03d}.png"
        _save(folder / name, _photo(rng))
        images.append({"id": i, "file_name": name, "width": 48, "height": 40})
        for k, cid in enumerate(((1, 2), (2, 3), (1, 3))[i % 3]):
            x, y = 4 + 20 * k, 6
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid, "iscrowd": 0,
                         "segmentation": [[x, y, x + 10, y, x + 10, y + 10, x, y + 10]], "bbox": [x, y, 10, 10]})
    (folder / "_annotations.coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                "categories": cats}))
    return root


def test_coco_multi_category_photo_is_one_image_and_in_one_split(tmp_path, capsys):
    """The default: a photo holding several categories is ONE image (a class-index mask), so no
    copy of it can land in another split; ``prepare split`` stratifies it by its main class."""
    src = _multi_category_coco(tmp_path / "export")
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(tmp_path / "ds"), "--no-keep-splits"]) == 0
    ds = tmp_path / "ds"
    rows = _rows(ds)
    assert len(rows) == 18 and len({r["group"] for r in rows}) == 18          # one image per photo
    assert (ds / "labels.txt").read_text().split() == ["crack", "dent", "stain"]
    pairs = {(1, 2): "crack;dent", (2, 3): "dent;stain", (1, 3): "crack;stain"}
    for r in rows:
        i = int(r["group"].rsplit("p", 1)[1])
        held = ((1, 2), (2, 3), (1, 3))[i % 3]
        assert r["classes"] == pairs[held] and r["class"] == ["crack", "dent", "stain"][held[0] - 1]
        lbl = np.asarray(Image.open(ds / "labels" / (Path(r["file"]).stem + ".png")))
        assert set(np.unique(lbl)) == {0, *held}
    capsys.readouterr()
    assert cli_main(["prepare", "split", "--src", str(ds), "--out", str(tmp_path / "split"), "--no-dedup"]) == 0
    plan = json.loads((tmp_path / "split" / "split.json").read_text())
    listed = [f for sp in SPLITS for f in plan["files"][sp]]
    assert sorted(listed) == sorted(r["file"] for r in rows)                   # each photo in exactly one split
    assert all(plan["files"][sp] for sp in SPLITS)
    for sp in SPLITS:
        assert (tmp_path / "split" / sp / "labels.txt").read_text() == (ds / "labels.txt").read_text()


def test_coco_per_category_copies_share_a_group_and_stay_together(tmp_path):
    src = _multi_category_coco(tmp_path / "export")
    ds = convert_vision_coco(src, tmp_path / "ds", keep_splits=False, multiclass=False)  # --per-category-copies
    rows = _rows(ds)
    assert len(rows) == 36 and all(r["group"] == "train/" + r["file"].split("_", 1)[1][:-4] for r in rows)
    source = {r["file"]: r["group"] for r in rows}

    # before: without the group column and without the near-duplicate search, copies are split apart
    old = tmp_path / "old"
    (old / "images").mkdir(parents=True)
    for sub in ("images", "labels"):
        (old / sub).mkdir(exist_ok=True)
        for p in (ds / sub).iterdir():
            (old / sub / p.name).write_bytes(p.read_bytes())
    common.write_classes_csv(old, [{k: v for k, v in r.items() if k != "group"} for r in rows])
    before = _leaks(split_dataset(old, tmp_path / "s_old", seed=0, dedup=False), source)
    assert before > 0
    # after: the group column alone keeps them together, and so does the near-duplicate search alone
    after_column = split_dataset(ds, tmp_path / "s_col", seed=0, dedup=False)
    after_dedup = split_dataset(old, tmp_path / "s_dedup", seed=0)
    assert _leaks(after_column, source) == 0 and _leaks(after_dedup, source) == 0
    plan = json.loads((after_column / "split.json").read_text())
    assert plan["groups"]["from_column"] and plan["groups"]["total"] == 18 and len(plan["groups"]["shared"]) == 18
    assert sum(plan["groups"]["counts"].values()) == 18 and min(plan["groups"]["counts"].values()) >= 1
    dedup_plan = json.loads((after_dedup / "split.json").read_text())
    assert dedup_plan["near_duplicates"]["merged"] == 18 and dedup_plan["groups"]["total"] == 18


def test_group_spanning_classes_goes_with_its_main_class(tmp_path):
    def s(file, cls, group=None):
        extra = {"file": file, "class": cls, **({"group": group} if group else {})}
        return Sample(Path(file).stem, Path("images") / file, Path("labels") / file, cls, extra)

    samples = [s(f"a_{i}.png", "a", f"g{i}") for i in range(6)] + [s(f"b_{i}.png", "b", f"g{i}") for i in range(2)]
    samples += [s(f"b_x{i}.png", "b") for i in range(4)]
    plan = plan_split(samples, seed=1, val=0.2, test=0.2)
    split_of = {f: sp for sp in SPLITS for f in plan["files"][sp]}
    for i in range(2):  # g0, g1 hold an "a" and a "b": a tie, so the rarer class b takes them; never apart
        assert split_of[f"a_{i}.png"] == split_of[f"b_{i}.png"]
    assert plan["groups"]["total"] == 10 and set(plan["groups"]["shared"]) == {"g0", "g1"}
    assert plan_split(samples, seed=1, val=0.2, test=0.2) == plan  # deterministic
    # a held-out class pulls its whole group into test
    held = plan_split(samples, seed=1, val=0.2, test=0.2, holdout_classes=["b"])
    assert all(f in held["files"]["test"] for f in ("a_0.png", "a_1.png", "b_0.png", "b_1.png"))


# ------------------------------------------------------------------------------------------ refusals
def _flat_dataset(root: Path, counts: dict[str, int], with_csv: bool = True) -> Path:
    rng = np.random.default_rng(7)
    rows = []
    for cls, n in counts.items():
        for i in range(n):
            name = f"{cls}_{i:03d}"
            _save(root / "images" / f"{name}.png", _photo(rng))
            _save(root / "labels" / f"{name}.png", _mask(free=cls == "free"))
            rows.append({"file": f"{name}.png", "class": cls})
    if with_csv:
        common.write_classes_csv(root, rows)
    return root


def test_a_split_leaving_a_class_without_val_or_test_is_refused(tmp_path):
    src = _flat_dataset(tmp_path / "d", {"scratch": 5, "pit": 5, "rare": 1, "free": 4})
    with pytest.raises(DataPrepError, match=r"class 'rare' has 1 group \(1 image\): val and test would be empty"):
        split_dataset(src, tmp_path / "o1")
    with pytest.raises(DataPrepError, match="lower --val/--test"):
        split_dataset(src, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    split_dataset(src, tmp_path / "o2", holdout_classes=["rare"])          # held out: test-only by design
    split_dataset(src, tmp_path / "o3", val=0.0, test=0.0)                  # nothing held back: nothing missing
    with pytest.warns(DataPrepWarning, match="incomplete classes: class 'rare'"):
        split_dataset(src, tmp_path / "o4", allow_incomplete=True)
    # rotated copies count once: three files of one photo are one group
    rng = np.random.default_rng(11)
    a = _photo(rng)
    for k in range(3):
        _save(src / "images" / f"twin_{k}.png", np.ascontiguousarray(np.rot90(a, k)))
        _save(src / "labels" / f"twin_{k}.png", np.ascontiguousarray(np.rot90(_mask(), k)))
    common.write_classes_csv(src, [r for r in _rows(src) if r["class"] != "rare"]
                             + [{"file": f"twin_{k}.png", "class": "twin"} for k in range(3)])
    for p in (src / "images" / "rare_000.png", src / "labels" / "rare_000.png"):
        p.unlink()
    with pytest.raises(DataPrepError, match=r"class 'twin' has 1 group \(3 images\)"):
        split_dataset(src, tmp_path / "o5")
    split_dataset(src, tmp_path / "o6", dedup=False)  # without the search they look like 3 photos
    # the whole val split empty: refused even when incomplete classes are allowed
    tiny = _flat_dataset(tmp_path / "t", {"x": 1, "y": 1})
    with pytest.raises(DataPrepError, match="whole val split would be empty"), pytest.warns(DataPrepWarning):
        split_dataset(tiny, tmp_path / "o7", allow_incomplete=True)


def test_numbered_files_without_classes_csv_warn_and_the_split_says_why(tmp_path, capsys):
    src = tmp_path / "numbered"
    rng = np.random.default_rng(2)
    for i in range(8):
        _save(src / "images" / f"{i:06d}.png", _photo(rng))
        _save(src / "labels" / f"{i:06d}.png", _mask())
    with pytest.warns(FilenameClassWarning, match=r"8 classes for 8 images.*classes\.csv.*labels\.txt"):
        samples = scan_dataset(src)
    assert len({s.cls for s in samples}) == 8
    assert cli_main(["prepare", "split", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "warning:" in err and "one class per image" in err
    assert "error: refusing the split" in err and "numbered files" in err and "class '000000' has 1 group" in err
    # a few classes with one image each, or classes.csv, or labels.txt: no warning
    with _no_warning(FilenameClassWarning):
        scan_dataset(_flat_dataset(tmp_path / "ok", {"a": 2, "b": 1, "c": 1}, with_csv=False))
    (src / "labels.txt").write_text("background\ndefect\n")  # class-index masks: value 1 = defect
    for i in range(8):
        _save(src / "labels" / f"{i:06d}.png", _mask() // 255)
    with _no_warning(FilenameClassWarning):
        assert {s.cls for s in scan_dataset(src)} == {"defect"}  # the class comes from the masks
    (src / "labels.txt").unlink()
    common.write_classes_csv(src, [{"file": f"{i:06d}.png", "class": "dent"} for i in range(8)])
    with _no_warning(FilenameClassWarning):
        scan_dataset(src)
