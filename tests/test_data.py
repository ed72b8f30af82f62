"""Tests for seggpt_lib.data (layout, cache, pairs, transforms, stats): index, cache, pair sampling, colouring, masks, augmentation."""
from __future__ import annotations

import csv
import pickle
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from seggpt_lib import data as D
from seggpt_lib.utils.colors import denormalize
from seggpt_lib.utils.masking import query_half_mask

IMG = (32, 32)  # model per-image size in most tests
PATCH = 8


# ------------------------------------------------------------------------------------------
# tiny datasets written with PIL
# ------------------------------------------------------------------------------------------
def _square(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    sh, sw = int(rng.integers(h // 4, h // 2)), int(rng.integers(w // 4, w // 2))
    y, x = int(rng.integers(0, h - sh)), int(rng.integers(0, w - sw))
    return y, x, sh, sw


def make_dataset(
    root: Path,
    classes: dict[str, int] | None = None,
    n_free: int = 2,
    size: tuple[int, int] = (40, 48),
    csv_file: bool = True,
    multi: bool = False,
    ext: str = ".png",
    seed: int = 0,
) -> Path:
    """Dark noisy images with one bright square per defect image; the mask is that square."""
    classes = {"dent": 4, "scratch": 5} if classes is None else classes
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = []
    jobs = [(c, i) for c, n in classes.items() for i in range(n)] + [("free", i) for i in range(n_free)]
    cls_value = {c: k + 1 for k, c in enumerate(classes)}
    h, w = size
    for c, i in jobs:
        img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if c != "free":
            y, x, sh, sw = _square(rng, h, w)
            img[y : y + sh, x : x + sw] = 255
            mask[y : y + sh, x : x + sw] = cls_value[c] if multi else 255
        name = f"{c}_{i:04d}{ext}"
        Image.fromarray(img).save(root / "images" / name)
        Image.fromarray(mask).save(root / "labels" / f"{c}_{i:04d}.png")
        rows.append({"file": name, "class": c})
    if csv_file:
        with open(root / "classes.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["file", "class"])
            wr.writeheader()
            wr.writerows(rows)
    return root


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "set")


@pytest.fixture(scope="module")
def index(ds_root) -> D.DefectIndex:
    return D.DefectIndex.scan(ds_root)


def fake_index(n_classes: int = 5, per_class: int = 20, n_free: int = 10, sizes=None) -> D.DefectIndex:
    files, classes, free = [], [], []
    sizes = sizes or [per_class] * n_classes
    for k, n in enumerate(sizes):
        for i in range(n):
            files.append(f"c{k}_{i:05d}.png")
            classes.append(f"c{k}")
            free.append(False)
    for i in range(n_free):
        files.append(f"free_{i:05d}.png")
        classes.append("free")
        free.append(True)
    return D.DefectIndex(files, classes, free)


def dataset(index, cache=None, pairs=None, **kw) -> D.PairDataset:
    kw.setdefault("image_size", IMG)
    kw.setdefault("patch_size", PATCH)
    return D.PairDataset(index, D.PairConfig.from_dict(kw), cache=cache, pairs=pairs)


# ------------------------------------------------------------------------------------------
# index and manifest
# ------------------------------------------------------------------------------------------
def test_scan_records(index, ds_root):
    assert len(index) == 11
    assert index.class_names == ["dent", "free", "scratch"]
    r = index.record(index.find("dent_0000.png"))
    assert r.cls == "dent" and not r.is_free and (r.height, r.width) == (40, 48)
    assert r.image == ds_root / "images" / "dent_0000.png" and r.label == ds_root / "labels" / "dent_0000.png"
    assert index.is_free.sum() == 2
    assert all(index.class_of(i) == "free" for i in np.flatnonzero(index.is_free))
    df = D.read_manifest(ds_root)
    assert list(df.columns[:5]) == ["file", "class", "is_free", "image", "label"]
    assert len(df) == 11 and df["is_free"].sum() == 2
    assert Path(df["image"][0]).is_file() and Path(df["label"][0]).is_file()


def test_class_from_filename_without_csv(tmp_path):
    root = make_dataset(tmp_path / "d", {"mouse_bite": 2, "open_circuit": 2}, n_free=1, csv_file=False, ext=".jpg")
    idx = D.DefectIndex.scan(root)
    assert D.class_from_filename("mouse_bite_000518.jpg") == "mouse_bite"
    assert idx.class_names == ["free", "mouse_bite", "open_circuit"]
    # a defect class whose mask is empty still counts as defect-free
    assert idx.is_free[idx.find("free_0000")]


def test_readers_and_resize(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    assert D.header_size(tmp_path / "a.png") == (30, 20) and D.decoded_size(tmp_path / "a.png") == (30, 20)
    assert np.array_equal(D.read_rgb(tmp_path / "a.png"), img)
    with pytest.raises(D.DatasetError, match=r"b\.png: file not found"):
        D.header_size(tmp_path / "b.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    small, m = D.resize_pair(img, mask, (8, 12))  # image bilinear, mask nearest
    assert small.shape == (8, 12, 3) and m.shape == (8, 12) and set(np.unique(m)) == {0, 255}
    assert np.array_equal(m, D.resize_image(mask, (8, 12), nearest=True))
    same, m2 = D.resize_pair(img, mask, (20, 30))
    assert same is img and m2 is mask  # already that size: untouched


def test_pair_config(index):
    with pytest.raises(ValueError, match=r"unknown PairConfig keys \['mask_ration'\]; valid keys"):
        D.PairConfig.from_dict({"mask_ration": 0.5})
    with pytest.raises(TypeError, match="PairConfig"):
        D.PairDataset(index, {"image_size": IMG, "patch_size": PATCH})
    with pytest.raises(ValueError, match="image_size and patch_size"):
        D.PairDataset(index, D.PairConfig())
    cfg = D.PairConfig.for_model(type("M", (), {"image_size": IMG, "patch_size": PATCH})(), train=False, seed=3)
    ds = D.PairDataset(index, cfg)
    assert ds.image_size == IMG and ds.patch_size == PATCH and not ds.train and ds.seed == 3 and ds.config is cfg


def test_transforms_are_module_level_classes():
    from seggpt_lib.data import transforms as T

    assert not hasattr(T, "__getattr__")
    for c in (T.ChannelGain, T.Resize, T.RandomResizedCrop):
        assert c.__module__ == T.__name__ and getattr(T, c.__qualname__) is c
    aug = pickle.loads(pickle.dumps(T.build_augment(T.AugmentConfig(), (16, 16))))
    assert {type(t).__name__ for t in aug.transforms} >= {"ChannelGain", "RandomResizedCrop"}


def test_subset_and_pickle(index):
    sub = index.subset(~index.is_free)
    assert len(sub) == 9 and not sub.is_free.any()
    again = pickle.loads(pickle.dumps(index))
    assert again.files == index.files and again.class_names == index.class_names


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
def _bad(tmp_path, what: str) -> tuple[Path, str]:
    root = make_dataset(tmp_path / what, {"dent": 3, "scratch": 3}, n_free=1)
    if what == "no_label":
        (root / "labels" / "dent_0001.png").unlink()
        return root, "dent_0001.png"
    if what == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "labels" / "scratch_0002.png")
        return root, "scratch_0002.png"
    if what == "truncated":
        p = root / "images" / "dent_0002.png"
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return root, "dent_0002.png"
    if what == "garbage":
        (root / "labels" / "scratch_0000.png").write_bytes(b"not a png at all")
        return root, "scratch_0000.png"
    if what == "csv_missing":
        with open(root / "classes.csv", "a") as f:
            f.write("ghost_0007.png,dent\n")
        return root, "ghost_0007.png"
    if what == "free_not_empty":
        m = np.zeros((40, 48), np.uint8)
        m[3:9, 3:9] = 255
        Image.fromarray(m).save(root / "labels" / "free_0000.png")
        return root, "free_0000"
    raise AssertionError(what)


BAD = ["no_label", "size", "truncated", "garbage", "csv_missing", "free_not_empty"]


@pytest.mark.parametrize("what", BAD)
def test_bad_input_raises_naming_file(tmp_path, what):
    root, name = _bad(tmp_path, what)
    with pytest.raises(D.DatasetError, match=name):
        D.DefectIndex.scan(root)


def test_skip_bad_warns_once_listing_every_file(tmp_path):
    root = make_dataset(tmp_path / "d", {"dent": 4, "scratch": 4}, n_free=2)
    (root / "labels" / "dent_0001.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "labels" / "scratch_0002.png")
    p = root / "images" / "dent_0002.png"
    p.write_bytes(p.read_bytes()[:60])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        idx = D.DefectIndex.scan(root, skip_bad=True)
    ours = [w for w in rec if issubclass(w.category, D.DatasetWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    for name in ("dent_0001.png", "scratch_0002.png", "dent_0002.png"):
        assert name in msg
    assert len(idx) == 10 - 3
    assert "dent_0001.png" not in idx.files


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "labels").mkdir()
    with pytest.raises(D.DatasetError, match="empty"):
        D.DefectIndex.scan(tmp_path / "e")
    with pytest.raises(D.DatasetError, match="empty"):
        D.DefectIndex.scan(tmp_path / "e", skip_bad=True)
    with pytest.raises(D.DatasetError, match="not found"):
        D.DefectIndex.scan(tmp_path / "nope")


def test_multiclass_label_out_of_range(tmp_path):
    root = make_dataset(tmp_path / "m", {"a": 2, "b": 2, "c": 2}, n_free=0, multi=True)
    idx = D.DefectIndex.scan(root)
    assert int(idx.label_max.max()) == 3
    with pytest.raises(D.DatasetError, match="n_classes=3"):
        dataset(idx, n_classes=3)
    ds = dataset(idx, n_classes=4, train=False)
    item = ds[0]
    assert item["palette"].shape == (4, 3)
    assert set(item["labels"].unique().tolist()) <= {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------
# pair sampling
# ------------------------------------------------------------------------------------------
def test_pair_balance_and_validity():
    idx = fake_index()
    s = D.PairSampler(idx, 20000, seed=3, negative_share=0.3, free_share=0.1)
    p, q, k = s.draw_arrays(np.arange(20000))
    assert abs((k == 1).mean() - 0.3) < 0.015
    assert abs((k == 2).mean() - 0.1) < 0.01
    cls, free = idx.class_ids, idx.is_free
    pos, neg, fr = k == 0, k == 1, k == 2
    assert (p[pos] != q[pos]).all() and (cls[p[pos]] == cls[q[pos]]).all()
    assert not free[p[pos]].any() and not free[q[pos]].any()
    assert (cls[p[neg]] != cls[q[neg]]).all() and not free[p[neg]].any() and not free[q[neg]].any()
    assert free[q[fr]].all() and not free[p[fr]].any()
    # every defect image shows up as a query, and both roles are used
    assert set(q[pos | neg].tolist()) == set(np.flatnonzero(~free).tolist())
    pairs = list(D.PairSampler(idx, 50, seed=3, negative_share=0.3, free_share=0.1))
    assert all(pr.is_negative == (pr.kind == "negative") for pr in pairs)
    assert [(pr.prompt, pr.query) for pr in pairs] == list(zip(p[:50].tolist(), q[:50].tolist()))


def test_class_balanced_queries():
    idx = fake_index(sizes=[200, 10, 10], n_free=0)
    _, q, _ = D.PairSampler(idx, 9000, seed=0, class_balanced=True, swap_prob=0).draw_arrays(np.arange(9000))
    share = np.bincount(idx.class_ids[q], minlength=3) / 9000
    assert np.allclose(share, 1 / 3, atol=0.03)
    _, q, _ = D.PairSampler(idx, 9000, seed=0, swap_prob=0).draw_arrays(np.arange(9000))
    assert np.bincount(idx.class_ids[q])[0] / 9000 > 0.8


def test_sampler_determinism_ranks_resume_epochs():
    idx = fake_index()
    one = list(D.PairSampler(idx, 301, seed=5))
    assert one == list(D.PairSampler(idx, 301, seed=5))
    assert one != list(D.PairSampler(idx, 301, seed=6))
    shards = [list(D.PairSampler(idx, 301, seed=5, rank=r, world_size=3, drop_last=False)) for r in range(3)]
    ids = [{p.sample for p in sh} for sh in shards]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert sorted(p for sh in shards for p in sh) == sorted(one)  # union covers the stream
    even = [len(D.PairSampler(idx, 301, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert even == [100, 100, 100]
    resumed = D.PairSampler(idx, 301, seed=5, start=120)
    assert list(resumed) == one[120:]
    s = D.PairSampler(idx, 301, seed=5)
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != one and all(p.epoch == 1 for p in e1)
    s.set_epoch(1, start=7)
    assert list(s) == e1[7:]
    fixed = D.PairSampler(idx, 301, seed=5, fixed=True)
    fixed.set_epoch(4)
    assert list(fixed) == one
    assert D.fixed_pairs(idx, 40, seed=1) == D.fixed_pairs(idx, 40, seed=1)


def test_sampler_memory_is_linear():
    idx = fake_index(n_classes=50, per_class=190, n_free=500)  # 10,000 images
    assert len(idx) == 10000
    tracemalloc.start()
    t0 = time.perf_counter()
    s = D.PairSampler(idx, length=10**9, seed=0)  # a billion pairs: nothing per pair is stored
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 2_000_000
    arrays = sum(v.nbytes for v in vars(s).values() if isinstance(v, np.ndarray))
    assert arrays < 40 * len(idx)
    assert not any(isinstance(v, (list, tuple)) and len(v) > 100 for v in vars(s).values())
    assert len(s) == 10**9
    first = next(iter(s))
    assert isinstance(first, D.Pair)


def test_index_memory_10k():
    files = [f"class{i % 7}_{i:06d}.png" for i in range(10000)]
    classes = [f"class{i % 7}" for i in range(10000)]
    tracemalloc.start()
    idx = D.DefectIndex(files, classes, np.zeros(10000, bool), np.full(10000, 256), np.full(10000, 256))
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(idx) == 10000
    assert cur < 2_000_000  # ~100 bytes per image


def test_sampler_degenerate_sets():
    one_class = D.DefectIndex(["a_1.png", "a_2.png", "a_3.png"], ["a"] * 3, [False] * 3)
    with pytest.warns(D.DatasetWarning, match="negative"):
        s = D.PairSampler(one_class, 100, negative_share=0.5)
    assert s.negative_share == 0 and all(p.kind == "positive" for p in s)
    singles = D.DefectIndex(["a_1.png", "b_1.png"], ["a", "b"], [False, False])
    with pytest.raises(D.DatasetError, match="positive"):
        D.PairSampler(singles, 10, negative_share=0.25)
    with pytest.raises(ValueError):
        D.PairSampler(one_class, 10, negative_share=0.8, free_share=0.5)


# ------------------------------------------------------------------------------------------
# items: colouring, masks, targets, weights, normalisation
# ------------------------------------------------------------------------------------------
def _colours(item):
    return denormalize(item["tgts"]).round().to(torch.uint8)  # (3, 2H, W)


def test_colouring(index):
    ds = dataset(index, train=True, seed=1, negative_share=0.0, length=12)
    palettes = []
    for i in range(12):
        it = ds[i]
        col, lab, pal = _colours(it), it["labels"], it["palette"]
        assert pal.shape == (2, 3) and pal[0].tolist() == [0, 0, 0]
        assert (col[:, lab == 0] == 0).all()  # black background
        h = IMG[0]
        top, bottom = col[:, :h][:, lab[:h] > 0], col[:, h:][:, lab[h:] > 0]
        assert top.numel() and bottom.numel()  # positives: both halves have defects
        assert (top == pal[1].view(3, 1)).all() and (bottom == pal[1].view(3, 1)).all()
        palettes.append(tuple(pal[1].tolist()))
    assert len(set(palettes)) >= 10  # one palette per sample


def test_masks_train_and_eval(index):
    grid = (2 * IMG[0] // PATCH, IMG[1] // PATCH)
    L = grid[0] * grid[1]
    tr = dataset(index, train=True, mask_ratio=0.75)
    m = [tr[i]["bool_masked_pos"] for i in range(5)]
    assert all(x.shape == (L,) and x.dtype == torch.bool and int(x.sum()) == round(0.75 * L) for x in m)
    assert not all(torch.equal(m[0], x) for x in m[1:])
    ev = dataset(index, train=False)
    assert torch.equal(ev[0]["bool_masked_pos"], query_half_mask(grid)[0])


@pytest.mark.parametrize("target", ["empty", "query_mask"])
def test_negative_target(index, target):
    ds = dataset(index, train=False, negative_share=1.0, negative_target=target, length=8)
    h = IMG[0]
    for i in range(8):
        it = ds[i]
        assert it["is_negative"] and it["prompt_class"] != it["query_class"]
        q_half = it["labels"][h:]
        if target == "empty":
            assert not q_half.any()
        else:
            _, raw = ds.cache.get(index.find(it["query_file"]))
            assert torch.equal(q_half, torch.from_numpy((raw != 0).astype(np.uint8)))
            assert q_half.any()
        assert torch.equal(it["query_label"], it["labels"][h:]) == (target == "query_mask")
        assert it["labels"][:h].any()  # the prompt keeps its defect


def test_free_queries_have_empty_targets(index):
    ds = dataset(index, train=True, negative_share=0.0, free_share=1.0, length=6)
    for i in range(6):
        it = ds[i]
        assert it["kind"] == "free" and it["query_class"] == "free"
        assert not it["labels"][IMG[0]:].any() and it["labels"][: IMG[0]].any()


def test_valid_weights(index):
    it = dataset(index, train=True, seed=2)[0]
    assert torch.equal(it["valid"], torch.ones(3, 2 * IMG[0], IMG[1]))
    it = dataset(index, train=True, seed=2, fg_weight=5.0)[0]
    fg = it["labels"] > 0
    assert fg.any()
    assert (it["valid"][:, fg] == 5.0).all() and (it["valid"][:, ~fg] == 1.0).all()


@pytest.mark.parametrize("stats", [None, ((0.178, 0.301, 0.194), (0.255, 0.220, 0.238))])
def test_normalisation_round_trip(index, stats):
    kw = {} if stats is None else {"mean": stats[0], "std": stats[1]}
    ds = dataset(index, train=False, **kw)
    it = ds[3]
    back = (denormalize(it["imgs"], *stats) if stats else denormalize(it["imgs"])).round().to(torch.uint8)
    p = index.find(it["prompt_file"])
    q = index.find(it["query_file"])
    ref = np.concatenate([ds.cache.get(p)[0], ds.cache.get(q)[0]], axis=0)
    assert torch.equal(back, torch.from_numpy(ref).permute(2, 0, 1))
    assert it["imgs"].shape == (3, 2 * IMG[0], IMG[1]) and it["imgs"].dtype == torch.float32
    assert it["seg_type"].item() == 0 and it["seg_type"].dtype == torch.long


def test_augmentation_keeps_image_and_mask_aligned(index):
    aug = D.AugmentConfig(blur_prob=0.0)  # flips + crop + per-channel brightness + contrast
    ds = dataset(index, train=True, augment=aug, seed=9, negative_share=0.0, length=30)
    assert ds.cache.size == (40, 40)  # cached 1.25x larger for the crop
    h = IMG[0]
    ious, positions, shifts = [], set(), []
    for i in range(30):
        it = ds[i]
        img = denormalize(it["imgs"]).mean(0)
        for half in (slice(0, h), slice(h, 2 * h)):
            bright = img[half] > 128
            lab = it["labels"][half] > 0
            if lab.sum() < 4:
                continue
            ious.append((bright & lab).sum().item() / (bright | lab).sum().item())
            ys, xs = torch.nonzero(lab, as_tuple=True)
            positions.add((int(ys.float().mean()), int(xs.float().mean())))
            by, bx = torch.nonzero(bright, as_tuple=True)
            shifts.append((by.float().mean() - ys.float().mean(), bx.float().mean() - xs.float().mean()))
    assert len(ious) > 30
    assert min(ious) > 0.7 and float(np.mean(ious)) > 0.93
    assert len(positions) > 20  # the views really move
    # no systematic sub-pixel shift between image and mask (plain NEAREST gives ~0.4 px)
    assert np.abs(np.mean(np.array(shifts, dtype=float), axis=0)).max() < 0.2


def test_augment_off_in_eval_and_prompt_query_independent(index):
    ds = dataset(index, train=False, augment=D.AugmentConfig())
    assert not ds.augment.enabled and ds.cache.size == IMG
    tr = dataset(index, train=True, seed=4, negative_share=0.0)
    same = 0
    for i in range(10):
        it = tr[i]
        same += torch.equal(it["imgs"][:, : IMG[0]], it["imgs"][:, IMG[0]:])
    assert same == 0
    assert D.AugmentConfig.from_dict(D.AugmentConfig().to_dict()) == D.AugmentConfig()


def test_item_reproducible_and_epochs_differ(index):
    a = dataset(index, train=True, seed=7)
    b = dataset(index, train=True, seed=7)
    x, y = a[3], b[3]
    for k in ("imgs", "tgts", "bool_masked_pos", "palette"):
        assert torch.equal(x[k], y[k])
    a.set_epoch(1)
    assert not torch.equal(a[3]["imgs"], x["imgs"])
    ev = dataset(index, train=False, seed=7, length=10)
    ev.set_epoch(3)
    pairs = D.fixed_pairs(index, 10, seed=7)
    assert [(ev[i]["prompt_file"], ev[i]["query_file"]) for i in range(10)] == [
        (index.files[p.prompt], index.files[p.query]) for p in pairs
    ]


def test_pairs_from_mapping(index):
    mapping = {"dent_0001.png": ["dent_0002.png", "scratch_0000.png"], "free_0000.png": ["dent_0000.png"]}
    pairs = D.PairDataset.pairs_from_mapping(index, mapping)
    assert [p.kind for p in pairs] == ["positive", "negative", "free"]
    ds = dataset(index, train=False, pairs=pairs)
    assert len(ds) == 3 and ds[1]["is_negative"] and ds[1]["query_file"] == "dent_0001.png"
    with pytest.raises(D.DatasetError, match="ghost"):
        D.PairDataset.pairs_from_mapping(index, {"ghost.png": ["dent_0000.png"]})


# ------------------------------------------------------------------------------------------
# loader, cache, stats, model
# ------------------------------------------------------------------------------------------
def _batches(ds, workers):
    loader = DataLoader(ds, batch_size=4, sampler=ds.make_sampler(), num_workers=workers,
                        collate_fn=D.collate, pin_memory=False)
    return list(loader)


def test_dataloader_workers_match(index):
    ds = dataset(index, train=True, seed=11, length=12, fg_weight=3.0)
    b0 = _batches(ds, 0)
    b2 = _batches(ds, 2)
    assert len(b0) == len(b2) == 3
    for x, y in zip(b0, b2):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k
    assert b0[0]["imgs"].shape == (4, 3, 2 * IMG[0], IMG[1])
    assert isinstance(b0[0]["prompt_file"], list) and b0[0]["is_negative"].dtype == torch.bool


def test_dataset_pickles_for_spawned_workers(index):
    ds = dataset(index, train=True, seed=12, length=4)
    first = ds[2]  # builds the transform pipeline
    clone = pickle.loads(pickle.dumps(ds))
    again = clone[2]
    for k in ("imgs", "tgts", "bool_masked_pos", "valid", "labels", "palette"):
        assert torch.equal(first[k], again[k]), k
    gain = pickle.loads(pickle.dumps(ds._transform))  # our v2 transforms pickle too
    assert type(gain).__name__ == "Compose"


def test_memmap_cache(index, tmp_path):
    mem = D.ImageCache(index, (24, 16))
    mm = D.ImageCache(index, (24, 16), mode="memmap", cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3
    stamp = [f.stat().st_mtime_ns for f in files]
    again = D.ImageCache(index, (24, 16), mode="memmap", cache_dir=tmp_path)  # reused, not rebuilt
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.iterdir())] == stamp
    clone = pickle.loads(pickle.dumps(again))
    lazy = D.ImageCache(index, (24, 16), mode="none")
    for i in range(len(index)):
        for c in (mm, clone, lazy):
            assert np.array_equal(c.get(i)[0], mem.get(i)[0]) and np.array_equal(c.get(i)[1], mem.get(i)[1])
    assert len(pickle.dumps(clone)) < 10_000  # the data is not pickled
    assert set(np.unique(mem.masks)) <= {0, 255}  # nearest-neighbour masks


def test_compute_stats(tmp_path):
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    a = np.zeros((4, 4, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 0, 255, 51
    b = np.zeros((4, 4, 3), np.uint8)
    b[..., 0], b[..., 1], b[..., 2] = 255, 255, 153
    for k, im in enumerate((a, b)):
        Image.fromarray(im).save(root / "images" / f"x_{k}.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "labels" / f"x_{k}.png")
    mean, std = D.compute_stats(root)
    assert np.allclose(mean, (0.5, 1.0, 0.4), atol=1e-6)
    assert np.allclose(std, (0.5, 0.0, 0.2), atol=1e-6)


def test_batch_runs_through_seggpt(index):
    from seggpt_lib.model.seggpt import build_seggpt

    model = build_seggpt("vit_micro", depth=3, out_indices=(2,), merge_index=1, embed_dim=32, num_heads=2)
    ds = D.PairDataset(index, D.PairConfig.for_model(model.cfg, train=True, fg_weight=2.0, length=2))
    batch = D.collate([ds[0], ds[1]])
    loss, pred, mask = model(**D.model_inputs(batch))
    assert torch.isfinite(loss) and pred.shape[0] == 2 and mask.shape == batch["bool_masked_pos"].shape


def test_synthetic_generator_if_present(tmp_path):
    synthetic = pytest.importorskip("data_prep.synthetic")
    root = synthetic.generate_synthetic(tmp_path / "syn", seed=0, per_class=2, size=64, workers=1)
    idx = D.DefectIndex.scan(root)
    assert len(idx) >= 4 and idx.is_free.any() and (~idx.is_free).any()
    ds = dataset(idx, train=True, negative_share=0.25, free_share=0.1, length=8)
    batch = D.collate([ds[i] for i in range(8)])
    assert batch["imgs"].shape == (8, 3, 2 * IMG[0], IMG[1])
    assert torch.isfinite(batch["imgs"]).all()


def test_fixed_defect_colour_and_query_mask_share(index):
    ds = dataset(index, train=True, seed=1, negative_share=0.0, length=40, defect_color=(255, 255, 255), query_mask_share=0.5)
    grid = (2 * IMG[0] // PATCH, IMG[1] // PATCH)
    n_half = 0
    for i in range(40):
        it = ds[i]
        assert it["palette"].tolist() == [[0, 0, 0], [255, 255, 255]]
        col, lab = _colours(it), it["labels"]
        assert (col[:, lab > 0] == 255).all() and (col[:, lab == 0] == 0).all()
        m = it["bool_masked_pos"].reshape(grid)
        if m[grid[0] // 2 :].all() and not m[: grid[0] // 2].any():
            n_half += 1
    assert 10 <= n_half <= 30  # about half the samples hide exactly the query half
    with pytest.raises(ValueError, match="defect_color"):
        dataset(index, train=True, defect_color=(1, 2))
    with pytest.raises(ValueError, match="query_mask_share"):
        dataset(index, train=True, query_mask_share=1.5)
