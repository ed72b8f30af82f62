"""Class-index masks: label values 1..K named by labels.txt / class_index.json, multi-class
images kept as one image, pair targets built from the prompt's class only."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from seggpt_lib import data as D
from seggpt_lib.data.layout import header_size, read_class_names

NAMES = ["crack", "scratch", "pit"]


def _write(root, stem, label, rgb=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    h, w = label.shape
    img = rgb if rgb is not None else np.full((h, w, 3), 90, np.uint8)
    Image.fromarray(img).save(root / "images" / f"{stem}.png")
    Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{stem}.png")


def _numbered_set(root, n=12, size=32, seed=0):
    """Numbered files (no class in the name, no classes.csv): every image holds one to three of
    the classes as rectangles of values 1..3, some hold none."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        lbl = np.zeros((size, size), np.uint8)
        present = [] if i % 6 == 5 else sorted(rng.choice(3, size=1 + i % 3, replace=False).tolist())
        for k, c in enumerate(present):
            y = 2 + 10 * k
            lbl[y:y + 6, 4 + c * 8:10 + c * 8] = c + 1
        _write(root, f"{i:06d}", lbl)
        truth[f"{i:06d}.png"] = [NAMES[c] for c in present]
    return truth


def test_numbered_folder_with_labels_txt_gets_k_classes(tmp_path):
    truth = _numbered_set(tmp_path)
    (tmp_path / "labels.txt").write_text("background\n" + "\n".join(NAMES) + "\n")
    idx = D.DefectIndex.scan(tmp_path)
    assert idx.multiclass
    assert set(idx.class_names) - {D.FREE_CLASS} == set(NAMES)  # K classes, not one per file
    for i, f in enumerate(idx.files):
        assert idx.classes_in(i) == sorted(truth[f])
        assert bool(idx.is_free[i]) == (not truth[f])
    assert [idx.label_value(c) for c in NAMES] == [1, 2, 3]
    # one image, several classes: never copied per class
    assert len(idx) == len(truth)
    assert any(len(m) > 1 for m in idx.members)
    df = idx.to_frame()
    assert "classes" in df.columns


def test_without_labels_txt_numbered_files_are_one_class_each(tmp_path):
    _numbered_set(tmp_path, n=6)
    idx = D.DefectIndex.scan(tmp_path)
    assert not idx.multiclass
    assert len(idx.class_names) == 6  # the name rule: each stem its own class (what labels.txt fixes)


def test_class_index_json_and_errors(tmp_path):
    _numbered_set(tmp_path, n=6)
    (tmp_path / "class_index.json").write_text(json.dumps({"background": 0, "crack": 1, "scratch": 2, "pit": 3}))
    assert read_class_names(tmp_path) == {1: "crack", 2: "scratch", 3: "pit"}
    (tmp_path / "labels.txt").write_text("crack\nscratch\n")  # labels.txt wins; value 3 is then unnamed
    with pytest.raises(D.DatasetError, match=r"labels\.txt.*|values \[3\]"):
        D.DefectIndex.scan(tmp_path)
    (tmp_path / "labels.txt").write_text("crack\ncrack\n")
    with pytest.raises(D.DatasetError, match="named twice"):
        read_class_names(tmp_path)
    (tmp_path / "labels.txt").write_text("crack\nfree\n")
    with pytest.raises(D.DatasetError, match="defect-free"):
        read_class_names(tmp_path)


def _multi_index(tmp_path, n=30, size=32):
    truth = _numbered_set(tmp_path, n=n, size=size, seed=1)
    (tmp_path / "labels.txt").write_text("\n".join(NAMES) + "\n")
    return D.DefectIndex.scan(tmp_path), truth


def test_negative_pairs_never_hold_the_prompt_class(tmp_path):
    idx, _ = _multi_index(tmp_path)
    s = D.PairSampler(idx, 4000, seed=3, negative_share=0.5, free_share=0.1)
    prompt, query, kind, cls = s.draw_classes(np.arange(4000))
    assert (kind == 1).sum() > 500
    members = idx.members
    for p, q, k, c in zip(prompt, query, kind, cls):
        name = idx.class_names[c]
        assert name in members[p]  # the prompt shows a class it holds
        if k == 0:
            assert name in members[q] and p != q
        elif k == 1:
            assert name not in members[q] and members[q]
        else:
            assert not members[q]
    # deterministic
    again = D.PairSampler(idx, 4000, seed=3, negative_share=0.5, free_share=0.1).draw_classes(np.arange(4000))
    for a, b in zip((prompt, query, kind, cls), again):
        assert np.array_equal(a, b)


def test_pair_target_holds_only_the_prompt_class(tmp_path):
    idx, _ = _multi_index(tmp_path)
    cfg = D.PairConfig(image_size=(32, 32), patch_size=16, train=False, length=60, seed=0,
                       negative_share=0.4, free_share=0.1, negative_target="empty", augment=D.AugmentConfig.off())
    ds = D.PairDataset(idx, cfg)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        pair = ds.pair(i)
        value = idx.label_value(item["prompt_class"])
        p_raw = np.asarray(Image.open(idx.label_path(pair.prompt)))
        q_raw = np.asarray(Image.open(idx.label_path(pair.query)))
        labels = item["labels"].numpy()
        assert np.array_equal(labels[:32], (p_raw == value).astype(np.uint8))  # prompt: its class only
        expected = (q_raw == value) if item["kind"] == "positive" else np.zeros_like(q_raw, bool)
        assert np.array_equal(labels[32:], expected.astype(np.uint8))
        seen.add(item["kind"])
        if item["kind"] == "positive":
            other = (q_raw != 0) & (q_raw != value)
            assert not labels[32:][other].any()  # the query's other classes stay background
    assert seen == {"positive", "negative", "free"}


def test_single_class_draws_unchanged_by_memberships():
    """Binary sets: the membership pools are the old per-image pools (same pairs for the same seed)."""
    classes = ["a"] * 5 + ["b"] * 4 + ["c"] * 3
    idx = D.DefectIndex([f"{c}_{i}.png" for i, c in enumerate(classes)], classes, [False] * 12)
    s = D.PairSampler(idx, 500, seed=0, negative_share=0.3)
    p, q, k, c = s.draw_classes(np.arange(500))
    assert np.array_equal(c, idx.class_ids[p])  # the prompt's class is its image's class
    neg = k == 1
    assert (idx.class_ids[p][neg] != idx.class_ids[q][neg]).all()
    assert (idx.class_ids[p][k == 0] == idx.class_ids[q][k == 0]).all()


def test_header_size_follows_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "turned.jpg"
    img.save(path, exif=exif)
    assert header_size(path) == (20, 40)
    assert D.decoded_size(path) == (20, 40)
    assert D.read_rgb(path).shape[:2] == (40, 20)  # (H, W) of the upright picture


# ---------------------------------------------------------------------------------------------
# ignore pixels (labels_ignore/: COCO crowd regions)
# ---------------------------------------------------------------------------------------------
def _ignore_set(root, n=4, size=32):
    for i in range(n):
        lbl = np.zeros((size, size), np.uint8)
        lbl[4:12, 4:12] = 255
        _write(root, f"crack_{i}", lbl)
        ig = np.zeros((size, size), np.uint8)
        ig[20:28, 20:28] = 255
        (root / "labels_ignore").mkdir(exist_ok=True)
        Image.fromarray(ig).save(root / "labels_ignore" / f"crack_{i}.png")


def test_ignore_pixels_weigh_nothing_in_training(tmp_path):
    _ignore_set(tmp_path)
    idx = D.DefectIndex.scan(tmp_path)
    cfg = D.PairConfig(image_size=(32, 32), patch_size=16, train=True, length=4, seed=0, negative_share=0.0,
                       fg_weight=5.0, augment=D.AugmentConfig(), mask_ratio=0.5)
    ds = D.PairDataset(idx, cfg)
    for i in range(len(ds)):
        item = ds[i]
        valid = item["valid"][0].numpy()
        assert (valid == 0).sum() > 0  # the crowd squares (moved by the augmentation with their image)
        assert (valid == 5.0).sum() > 0 and (valid == 1.0).sum() > 0
    # no augmentation: exactly the ignore squares, prompt and query halves
    ds = D.PairDataset(idx, D.PairConfig(image_size=(32, 32), patch_size=16, train=False, length=2, seed=0,
                                         negative_share=0.0))
    valid = ds[0]["valid"][0].numpy()
    expected = np.zeros((64, 32), bool)
    expected[20:28, 20:28] = expected[52:60, 20:28] = True
    assert np.array_equal(valid == 0, expected)


def test_ignore_pixels_count_in_no_iou(tmp_path):
    from types import SimpleNamespace

    from seggpt_lib.eval.scoring import Folder, ScoringConfig, score_mapping

    _ignore_set(tmp_path, n=2)
    folder = Folder.of_dataset(tmp_path)
    assert folder.ignore is not None

    class Painter:  # paints the defect square and the crowd square
        def predict_batch(self, images, prompt_images=None, prompt_masks=None, **kw):
            m = np.zeros((32, 32), bool)
            m[4:12, 4:12] = m[20:28, 20:28] = True
            return [SimpleNamespace(mask=m, score=m.astype(float), n_pairs=1, timing={"total_s": 0.0},
                                    consistency=None) for _ in images]

    rows = list(score_mapping(Painter(), folder, {"crack_0.png": ["crack_1.png"]}, "positive",
                              ScoringConfig(queries_per_call=1), prompts=folder))
    r = rows[0].result
    inter = np.logical_and(r.pred, r.gt).sum()
    union = np.logical_or(r.pred, r.gt).sum()
    assert inter == union == 64  # the crowd square is neither a hit nor a false alarm
    assert rows[0].prediction.mask[20:28, 20:28].all()  # the prediction itself is kept as painted


# ---------------------------------------------------------------------------------------------
# the multi-class synthetic set
# ---------------------------------------------------------------------------------------------
def test_multiclass_synthetic_set(tmp_path):
    import csv

    from data_prep.synthetic import DEFECT_CLASSES, SURFACE_OF, class_value, generate_synthetic

    classes = ("scratch", "pit", "crack", "open", "short")
    a = generate_synthetic(tmp_path / "a", seed=3, per_class=4, size=64, n_free=2, classes=classes,
                           multi_share=0.75, workers=1)
    rows = {r["file"]: r for r in csv.DictReader(open(a / "classes.csv"))}
    idx = D.DefectIndex.scan(a)
    assert idx.multiclass and read_class_names(a) == {k + 1: c for k, c in enumerate(DEFECT_CLASSES)}
    n_multi = 0
    for i, f in enumerate(idx.files):
        label = np.asarray(Image.open(a / "labels" / f))
        drawn = [c for c in rows[f]["defects"].split(";") if c]
        # every drawn class is present with its own value, nothing else is (disjoint by construction)
        assert sorted(np.unique(label[label > 0]).tolist()) == sorted(class_value(c) for c in drawn)
        assert idx.classes_in(i) == sorted(drawn)
        assert len({SURFACE_OF[c] for c in drawn}) <= 1  # one surface family per image
        n_multi += len(drawn) > 1
    assert n_multi >= 5
    b = generate_synthetic(tmp_path / "b", seed=3, per_class=4, size=64, n_free=2, classes=classes,
                           multi_share=0.75, workers=2)
    for sub in ("images", "labels"):  # same seed, same bytes (whatever the worker count)
        for p in sorted((a / sub).iterdir()):
            assert p.read_bytes() == (b / sub / p.name).read_bytes(), p.name
    with pytest.raises(Exception, match="multi_share"):
        generate_synthetic(tmp_path / "c", per_class=1, size=64, multi_share=1.5)
