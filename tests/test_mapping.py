import json

import numpy as np
import pytest
from PIL import Image

from seggpt_lib import cli
from seggpt_lib.data import layout as L
from seggpt_lib.eval import mapping as MP


def _write(root, stem, value, ext="png", label=True, pattern=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    img = np.full((16, 16), value, np.uint8) if pattern is None else pattern.astype(np.uint8)
    Image.fromarray(img).convert("RGB").save(root / "images" / f"{stem}.{ext}")
    if label:
        lab = np.zeros((16, 16), np.uint8)
        lab[4:8, 4:8] = 1
        Image.fromarray(lab).save(root / "labels" / f"{stem}.png")


@pytest.fixture
def dataset(tmp_path):
    """3 defect classes (3, 2, 1 images) and 2 defect-free images, classes from names."""
    root = tmp_path / "ds"
    for i, stem in enumerate(["mouse_bite_000001", "mouse_bite_000002", "mouse_bite_000003",
                              "short_000001", "short_000002", "spur_000001"]):
        _write(root, stem, 20 * i, ext="jpg" if stem.startswith("short") else "png")
    _write(root, "free_000001", 200, label=False)
    _write(root, "free_000002", 210, ext="bmp", label=False)
    return root


def test_mapping_uses_the_layout_rules():
    # no copy of the layout's rules here: the class rule and the manifest are seggpt_lib.data.layout's
    for name in ("class_from_name", "IMAGE_EXTENSIONS", "_read_classes_csv"):
        assert not hasattr(MP, name), name
    assert MP.read_manifest is L.read_manifest and MP.image_dir is L.image_dir
    assert MP.FREE == L.FREE_CLASS
    assert L.class_from_filename("mouse_bite_000518.jpg") == "mouse_bite"
    assert L.class_from_filename("Porosity_12.png") == "Porosity"
    assert L.class_from_filename("front.png") == "front"
    assert L.class_from_filename("a_1_2.png") == "a"  # the leading alphabetic tokens


def test_read_manifest_names_and_labels(dataset):
    df = L.read_manifest(dataset, labels=False)  # the listing the mappings read
    assert list(df.columns) == ["file", "class", "is_free", "image", "label"]
    assert df["file"].tolist() == sorted(df["file"])
    cls = dict(zip(df["file"], df["class"]))
    assert cls["short_000001.jpg"] == "short"
    assert cls["free_000002.bmp"] == "free"
    lab = dict(zip(df["file"], df["label"]))
    assert lab["free_000001.png"] is None
    assert lab["spur_000001.png"].endswith("spur_000001.png")


def test_read_manifest_classes_csv(dataset):
    (dataset / "classes.csv").write_text(
        "file,class,surface\nmouse_bite_000001.png,open_circuit,top\nspur_000001,free,top\n")
    cls = dict(zip(*L.read_manifest(dataset, labels=False)[["file", "class"]].T.values))
    assert cls["mouse_bite_000001.png"] == "open_circuit"  # by file name
    assert cls["spur_000001.png"] == "free"  # by stem
    assert cls["short_000002.jpg"] == "short"  # not listed: name rule


def test_positive(dataset):
    (dataset / "images" / "spur_000001.png").unlink()  # a class with one image has no prompt
    m = MP.build_mapping(dataset, dataset, "positive", k=1, seed=0)
    assert len(m) == 5
    assert all(not q.startswith("free") for q in m)
    for q, ps in m.items():
        assert len(ps) == 1 and ps[0] != q
        assert L.class_from_filename(ps[0]) == L.class_from_filename(q)


def test_positive_error_names_class_and_folder(dataset):
    # spur has a single image: no possible positive prompt
    with pytest.raises(ValueError, match=r"class 'spur'.*images"):
        MP.build_mapping(dataset, dataset, "positive")
    (dataset / "images" / "spur_000001.png").unlink()
    m = MP.build_mapping(dataset, dataset, "positive", k=1)
    assert sorted(m) == ["mouse_bite_000001.png", "mouse_bite_000002.png", "mouse_bite_000003.png",
                         "short_000001.jpg", "short_000002.jpg"]
    with pytest.raises(ValueError, match="only 1 possible"):
        MP.build_mapping(dataset, dataset, "positive", k=2)


def test_negative(dataset):
    m = MP.build_mapping(dataset, dataset, "negative", k=2, seed=3)
    assert len(m) == 6
    for q, ps in m.items():
        assert len(ps) == 2 and len(set(ps)) == 2
        for p in ps:
            assert L.class_from_filename(p) not in (L.class_from_filename(q), "free")


def test_free(dataset):
    m = MP.build_mapping(dataset, dataset, "free", k=3, seed=1)
    assert sorted(m) == ["free_000001.png", "free_000002.bmp"]
    for ps in m.values():
        assert len(set(ps)) == 3 and not any(p.startswith("free") for p in ps)


def test_free_without_free_queries(dataset, tmp_path):
    q = tmp_path / "q"
    _write(q, "short_000009", 5)
    with pytest.raises(ValueError, match="defect-free"):
        MP.build_mapping(q, dataset, "free")


def test_separate_query_and_prompt_roots(dataset, tmp_path):
    q = tmp_path / "q"
    _write(q, "spur_000009", 5)
    _write(q, "mouse_bite_000001", 5)  # same name as a prompt: never its own prompt
    m = MP.build_mapping(q, dataset, "positive", k=1, seed=0)
    assert sorted(m) == ["mouse_bite_000001.png", "spur_000009.png"]
    assert m["spur_000009.png"] == ["spur_000001.png"]  # spur's only image is usable here
    assert m["mouse_bite_000001.png"][0] in ("mouse_bite_000002.png", "mouse_bite_000003.png")
    with pytest.raises(ValueError, match=r"only 1 possible class 'spur'.*k=2"):
        MP.build_mapping(q, dataset, "positive", k=2, seed=0)


def test_seeded_reproducible(dataset):
    a = MP.build_mapping(dataset, dataset, "negative", k=2, seed=7)
    b = MP.build_mapping(dataset, dataset, "negative", k=2, seed=7)
    assert json.dumps(a) == json.dumps(b)
    assert list(a) == sorted(a)
    others = [MP.build_mapping(dataset, dataset, "negative", k=2, seed=s) for s in range(8)]
    assert any(o != a for o in others)  # the seed matters


def test_adding_a_query_keeps_other_draws(dataset, tmp_path):
    a = MP.build_mapping(dataset, dataset, "negative", k=1, seed=4)
    _write(dataset, "short_000003", 99)
    b = MP.build_mapping(dataset, dataset, "negative", k=1, seed=4)
    assert "short_000003.png" in b
    assert b["short_000001.jpg"] == a["short_000001.jpg"]  # its candidates did not change


def test_retrieval(tmp_path):
    root = tmp_path / "r"
    yy, xx = np.mgrid[0:16, 0:16]
    _write(root, "a_000001", 0, pattern=xx * 16)  # horizontal ramp
    _write(root, "a_000002", 0, pattern=xx * 15 + 3)  # horizontal ramp, near-identical
    _write(root, "b_000001", 0, pattern=yy * 16)  # vertical ramp
    _write(root, "b_000002", 0, pattern=255 - xx * 16)  # reversed ramp (anti-correlated)
    _write(root, "free_000001", 0, pattern=yy * 15, label=False)
    m = MP.build_mapping(root, root, "retrieval", k=2)
    assert m["a_000001.png"] == ["a_000002.png", "b_000001.png"]
    assert m["free_000001.png"][0] == "b_000001.png"  # free queries included, free prompts not
    assert all("free_000001.png" not in ps for ps in m.values())
    assert all(q not in ps for q, ps in m.items())
    same = MP.build_mapping(root, root, "retrieval", k=1, same_class=True)
    assert "free_000001.png" not in same
    assert same["b_000001.png"] == ["b_000002.png"]
    assert MP.build_mapping(root, root, "retrieval", k=2, seed=99) == m  # deterministic


def test_empty_folder_error(tmp_path, dataset):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="no query images"):
        MP.build_mapping(empty, dataset, "positive")
    with pytest.raises(ValueError, match="no prompt images"):
        MP.build_mapping(dataset, empty, "negative")
    with pytest.raises(FileNotFoundError, match="nope"):
        MP.build_mapping(tmp_path / "nope", dataset, "negative")


def test_bad_arguments(dataset):
    with pytest.raises(ValueError, match="kind"):
        MP.build_mapping(dataset, dataset, "postive")
    with pytest.raises(ValueError, match="k must"):
        MP.build_mapping(dataset, dataset, "negative", k=0)


def test_validate_mapping_lists_all_missing(dataset):
    good = MP.build_mapping(dataset, dataset, "negative", k=1)
    MP.validate_mapping(good, dataset, dataset)  # no error
    MP.validate_mapping(good, dataset / "images", dataset / "images")  # image folder also accepted
    bad = dict(good)
    bad["ghost_000001.png"] = ["short_000001.jpg", "phantom_1.png"]
    bad["mouse_bite_000001.png"] = ["spook_1.png"]
    with pytest.raises(FileNotFoundError) as e:
        MP.validate_mapping(bad, dataset, dataset)
    msg = str(e.value)
    for name in ("ghost_000001.png", "phantom_1.png", "spook_1.png"):
        assert name in msg
    assert "1 query image(s)" in msg and "2 prompt image(s)" in msg
    with pytest.raises(ValueError, match="empty prompt list"):
        MP.validate_mapping({"short_000001.jpg": []}, dataset, dataset)
    with pytest.raises(ValueError):
        MP.validate_mapping(["short_000001.jpg"], dataset, dataset)


def test_cli_make_mapping(dataset, tmp_path, capsys):
    out = tmp_path / "maps" / "neg.json"
    argv = ["make-mapping", "--queries", str(dataset), "--prompts", str(dataset),
            "--kind", "negative", "--k", "2", "--seed", "5", "--out", str(out)]
    assert cli.main(argv) == 0
    text = out.read_text()
    data = json.loads(text)
    assert data == MP.build_mapping(dataset, dataset, "negative", k=2, seed=5)
    assert list(data) == sorted(data)
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # never over an existing file
    assert cli.main(argv + ["--overwrite"]) == 0 and out.read_text() == text  # byte-identical rerun
    assert MP.load_mapping(out) == data

    rc = cli.main(["make-mapping", "--queries", str(dataset), "--kind", "positive"])
    assert rc == 2
    assert "spur" in capsys.readouterr().err
