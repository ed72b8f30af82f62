"""The pretraining set (data_prep.shapes), the pretraining run and its export
(seggpt_lib.experiments.pretrain), ``seggpt pretrain`` and ``weights: "pretrained"``.

Everything trains the 235 k-parameter ``vit_nano`` for a handful of steps on a few dozen
64-pixel shapes images: the whole file takes well under a minute on two CPU threads.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data_prep.shapes import SHAPE_CLASSES, generate_shapes, render_shapes
from seggpt_lib.data import DefectIndex
from seggpt_lib.data.layout import read_class_names
from seggpt_lib.experiments import pretrain as P
from seggpt_lib.experiments.config import PipelineError, resolve_weights
from seggpt_lib.experiments.pretrain import (
    PretrainConfig,
    PretrainedError,
    export_pretrained,
    file_sha256,
    run_pretraining,
    shipped_checkpoint,
)
from seggpt_lib.model.checkpoint import build_from_checkpoint

N_TRAIN, N_VAL, SIZE = 40, 12, 64
# four steps teach the model nothing: its validations warn of a collapse, as they should
pytestmark = pytest.mark.filterwarnings("ignore:collapse at step")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (relative path -> (SHA-256, mtime_ns)): "untouched" means equal."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# the shapes set
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """A small shapes set: ``train`` (40 images + 2 free) and ``val`` (12 + 1 free), 64 px."""
    base = tmp_path_factory.mktemp("shapes")
    return {
        "train": generate_shapes(base / "train", n_images=N_TRAIN, seed=0, size=SIZE, show_progress=False),
        "val": generate_shapes(base / "val", n_images=N_VAL, seed=1_000_003, size=SIZE, show_progress=False),
    }


def test_same_seed_gives_identical_files_another_seed_differs(shapes, tmp_path):
    again = generate_shapes(tmp_path / "again", n_images=N_TRAIN, seed=0, size=SIZE, show_progress=False)
    a, b = _tree(shapes["train"]), _tree(again)
    assert a.keys() == b.keys()
    assert {"labels.txt", "classes.csv", "shapes.json"} <= set(a)
    for k in a:
        assert a[k] == b[k], k
    other = _tree(generate_shapes(tmp_path / "other", n_images=N_TRAIN, seed=1, size=SIZE, show_progress=False))
    assert other.keys() == a.keys()  # the same names ...
    images = [k for k in a if k.startswith("images")]
    assert sum(a[k] != other[k] for k in images) == len(images)  # ... none of the same pictures
    # in memory too: render_shapes is a pure function of (seed, index)
    x1, y1, c1 = render_shapes(3, 7, size=SIZE)
    x2, y2, c2 = render_shapes(3, 7, size=SIZE)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and c1 == c2
    assert not np.array_equal(render_shapes(4, 7, size=SIZE)[0], x1)


def test_render_shapes_masks_hold_the_classes_it_names():
    counts = []
    for i in range(60):
        img, label, held = render_shapes(5, i, size=SIZE)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
        # the mask's values are exactly the held classes' indices (1..16, in SHAPE_CLASSES order)
        values = set(np.unique(label).tolist()) - {0}
        assert values == {SHAPE_CLASSES.index(c) + 1 for c in held}
        assert len(set(held)) == len(held)
        counts.append(len(held))
    # two to four classes are drawn per image; one covered by later objects down to a few pixels
    # is dropped from the label (the module's rule), so an image rarely holds fewer than two
    assert max(counts) <= 4 and min(counts) >= 1
    assert sum(c >= 2 for c in counts) >= 0.9 * len(counts)
    assert set(counts) >= {2, 3, 4}
    img, label, held = render_shapes(5, 0, size=SIZE, free=True)
    assert held == [] and not label.any()


def test_class_colours_keep_the_shapes_and_paint_each_class_its_own_colour():
    """class_colours draws the same shapes (same masks, same classes) and paints every flat
    object near its class's colour: within the jitter of it, nearer its own than any other class's."""
    from data_prep.shapes import CLASS_JITTER, _TEXTURED, class_palette
    palette = class_palette()
    assert len(np.unique(palette[:, 0].round(), axis=0)) == len(SHAPE_CLASSES)  # one colour per class
    near = 0
    for i in range(30):
        img_r, lab_r, held_r = render_shapes(9, i, size=SIZE)
        img_c, lab_c, held_c = render_shapes(9, i, size=SIZE, class_colours=True)
        assert np.array_equal(lab_r, lab_c) and held_r == held_c
        for c in held_c:
            if c in _TEXTURED:
                continue
            k = SHAPE_CLASSES.index(c)
            mean = img_c[lab_c == k + 1].reshape(-1, 3).astype(float).mean(0)
            d = np.abs(palette[:, 0] - mean).max(1)  # distance to every class's colour
            assert d[k] <= CLASS_JITTER * 128 + 20  # the jitter plus the image noise
            near += int(d.argmin() == k)
    assert near >= 20
    assert not np.array_equal(render_shapes(9, 0, size=SIZE)[0], render_shapes(9, 0, size=SIZE, class_colours=True)[0])


def test_shapes_layout_is_a_multiclass_dataset(shapes):
    root = shapes["train"]
    names = (root / "labels.txt").read_text().split("\n")
    assert names[0] == "background" and names[1:17] == list(SHAPE_CLASSES)
    assert read_class_names(root) == {k + 1: c for k, c in enumerate(SHAPE_CLASSES)}
    meta = json.loads((root / "shapes.json").read_text())
    assert meta["seed"] == 0 and meta["n_images"] == N_TRAIN and meta["classes"] == list(SHAPE_CLASSES)
    n_free = meta["n_free"]
    assert n_free == round(0.05 * N_TRAIN) == 2

    index = DefectIndex.scan(root)
    assert index.multiclass and len(index) == N_TRAIN + n_free
    rows = {r["file"]: r for r in csv.DictReader(open(root / "classes.csv", newline=""))}
    assert set(rows) == set(index.files)
    for i, name in enumerate(index.files):
        k = int(Path(name).stem.split("_")[-1])
        _, label, held = render_shapes(0, k, size=SIZE, free=k >= N_TRAIN)
        stored = np.asarray(Image.open(index.label_path(i)))
        assert np.array_equal(stored, label), name
        # every mask value is a class index named in labels.txt, and each class the image holds
        # is one membership of the index
        assert set(np.unique(stored).tolist()) - {0} <= set(range(1, len(SHAPE_CLASSES) + 1))
        assert index.classes_in(i) == sorted(held), name
        assert rows[name]["defects"] == ";".join(held)
        assert bool(index.is_free[i]) == (not held) == (k >= N_TRAIN)
        if held:
            assert 1 <= len(held) <= 4
            assert index.class_of(i) in held
    for c in index.class_names:
        if c in SHAPE_CLASSES:
            assert index.label_value(c) == SHAPE_CLASSES.index(c) + 1
    # several classes per image: memberships outnumber the defect images
    assert len(index.member_img) > int((~index.is_free).sum())


def test_generate_shapes_refuses_bad_input_and_existing_output(shapes, tmp_path):
    from data_prep.common import DataPrepError

    with pytest.raises(DataPrepError, match="seed"):
        generate_shapes(tmp_path / "a", n_images=2, seed=-1, show_progress=False)
    with pytest.raises(DataPrepError, match="size"):
        generate_shapes(tmp_path / "a", n_images=2, size=16, show_progress=False)
    before = _tree_digest(shapes["val"])
    with pytest.raises(DataPrepError):
        generate_shapes(shapes["val"], n_images=2, size=SIZE, show_progress=False)  # no overwrite
    assert _tree_digest(shapes["val"]) == before


# ------------------------------------------------------------------------------------------
# the pretraining run
# ------------------------------------------------------------------------------------------
def _cfg(**kw) -> PretrainConfig:
    d = dict(images=N_TRAIN, val_images=N_VAL, image_size=SIZE, preset="vit_nano", steps=4, batch_size=4,
             warmup_steps=1, eval_every=2, val_pairs=8)
    d.update(kw)
    return PretrainConfig(**d)


def _run(cfg: PretrainConfig, shapes, run_dir: Path, **kw) -> dict:
    return run_pretraining(cfg, shapes["train"], shapes["val"], run_dir, device="cpu", progress=False,
                           log=lambda m: None, **kw)


def _weights(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "checkpoints" / which / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(shapes, tmp_path_factory) -> Path:
    """An uninterrupted four-step run."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "full"
    res = _run(_cfg(), shapes, run_dir)
    assert res["steps"] == 4 and res["resumed"] is False and res["interrupted"] is False
    assert res["run_dir"] == str(run_dir)
    return run_dir


def test_run_writes_checkpoints_and_its_recipe(full_run):
    ck = full_run / "checkpoints"
    for name in ("last", "best", "step_2", "step_4"):
        assert (ck / name / "model.safetensors").is_file(), name
    assert json.loads((full_run / "pretrain.json").read_text()) == _cfg().to_dict()
    rows = list(csv.DictReader(open(full_run / "metrics.csv", newline="")))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert {int(r["step"]) for r in rows if r["val_loss"] not in ("", "nan")} == {2, 4}  # eval_every 2


def test_interrupted_run_resumes_to_the_same_weights(shapes, full_run, tmp_path):
    run_dir = tmp_path / "part"
    first = _run(_cfg(), shapes, run_dir, stop_at_step=2)
    assert first["steps"] == 2 and first["resumed"] is False
    assert not (run_dir / "checkpoints" / "step_4").exists()
    second = _run(_cfg(), shapes, run_dir)
    assert second["steps"] == 4 and second["resumed"] is True
    a, b = _weights(full_run), _weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the trainer's bitwise resume (tests/test_train.py)
    steps = [int(r["step"]) for r in csv.DictReader(open(run_dir / "metrics.csv", newline=""))]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # the curve continues without duplicate rows


def test_another_recipe_in_the_same_run_dir_is_refused(shapes, full_run):
    before = _tree_digest(full_run)
    with pytest.raises(ValueError, match=r"another recipe.*\['lr'\]"):
        _run(_cfg(lr=5e-4), shapes, full_run)
    with pytest.raises(ValueError, match=r"\['batch_size', 'fg_weight'\]"):
        _run(_cfg(batch_size=2, fg_weight=1.0), shapes, full_run)
    assert _tree_digest(full_run) == before


def test_a_folder_of_something_else_is_never_touched(shapes, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my data")
    with pytest.raises(ValueError, match=r"mine exists and holds files of something else"):
        _run(_cfg(), shapes, other)
    assert (other / "notes.txt").read_text() == "my data" and len(list(other.iterdir())) == 1


def test_checkpoints_without_the_run_files_are_a_clear_error(shapes, full_run, tmp_path):
    stray = tmp_path / "stray"
    (stray / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(full_run / "checkpoints" / "last", stray / "checkpoints" / "last")
    before = _tree_digest(stray)
    with pytest.raises(ValueError, match=r"stray holds checkpoints but no config.json or pretrain.json"):
        _run(_cfg(), shapes, stray)
    assert _tree_digest(stray) == before


def test_a_run_recorded_before_a_new_recipe_key_still_resumes(shapes, tmp_path):
    run_dir = tmp_path / "older"
    _run(_cfg(), shapes, run_dir, stop_at_step=2)
    recipe = json.loads((run_dir / "pretrain.json").read_text())
    del recipe["init_weights"]  # as a run written before the key existed
    (run_dir / "pretrain.json").write_text(json.dumps(recipe))
    assert _run(_cfg(), shapes, run_dir)["steps"] == 4


def test_init_weights_starts_from_a_checkpoint(shapes, full_run, tmp_path):
    """A run started from other weights (here: a trained run's, shifted by 0.25, so no random
    initialisation resembles them) records them and, at a learning rate too small to move
    anything, ends where they are."""
    from safetensors.torch import save_file
    src = tmp_path / "shifted.safetensors"
    shifted = {k: (v + 0.25 if v.is_floating_point() else v) for k, v in _weights(full_run).items()}
    save_file(shifted, str(src))
    _run(_cfg(init_weights=str(src), steps=2, lr=1e-12, min_lr=1e-13), shapes, tmp_path / "cont")
    assert json.loads((tmp_path / "cont" / "pretrain.json").read_text())["init_weights"] == str(src)
    ended = _weights(tmp_path / "cont")
    for k, v in shifted.items():
        assert torch.allclose(ended[k].float(), v.float(), atol=1e-6), k
    with pytest.raises(Exception, match="missing.safetensors"):
        _run(_cfg(init_weights=str(tmp_path / "missing.safetensors")), shapes, tmp_path / "bad")


def test_unknown_recipe_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown pretraining keys \['bogus'\].*valid keys"):
        PretrainConfig.from_dict({"bogus": 1})
    assert PretrainConfig.from_dict(_cfg().to_dict()) == _cfg()


# ------------------------------------------------------------------------------------------
# export and the shipped checkpoint
# ------------------------------------------------------------------------------------------
def test_export_writes_weights_hash_recipe_and_curve(full_run, tmp_path):
    out = tmp_path / "pretrained"
    cfg = _cfg()
    info = export_pretrained(full_run, cfg, "seggpt pretrain --steps 4", out, name="tiny", wall_s=1.5)
    weights, meta, curve = out / "tiny.safetensors", out / "tiny.json", out / "tiny_metrics.csv"
    assert weights.is_file() and meta.is_file() and curve.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json", "tiny.safetensors", "tiny_metrics.csv"]  # no .tmp
    assert json.loads(meta.read_text()) == info
    assert info["sha256"] == file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["bytes"] == weights.stat().st_size
    assert info["command"] == "seggpt pretrain --steps 4"
    assert info["recipe"] == cfg.to_dict() and info["preset"] == "vit_nano"
    assert info["steps"] == 4 and info["checkpoint"] == "last" and info["wall_s_last_call"] == 1.5
    assert info["file"] == "tiny.safetensors" and info["curve"] == "tiny_metrics.csv"
    assert info["final_val_miou"] is not None
    assert weights.read_bytes() == (full_run / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert [r["step"] for r in csv.DictReader(open(curve, newline=""))] == \
        [r["step"] for r in csv.DictReader(open(full_run / "metrics.csv", newline=""))]
    # it loads strictly, as the architecture it records
    model = build_from_checkpoint(weights)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    ref = build_from_checkpoint(full_run / "checkpoints" / "last" / "model.safetensors").state_dict()
    sd = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    # the default name is <preset>_shapes
    assert export_pretrained(full_run, cfg, "x", out)["file"] == "vit_nano_shapes.safetensors"


def test_export_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(PretrainedError, match="no last checkpoint"):
        export_pretrained(tmp_path / "nothing", _cfg(), "x", tmp_path / "out")
    assert not (tmp_path / "out" / "vit_nano_shapes.json").exists()


def test_shipped_checkpoint_checks_its_hash(full_run, tmp_path):
    out = tmp_path / "pretrained"
    export_pretrained(full_run, _cfg(), "x", out, name="tiny")
    path = out / "tiny.safetensors"
    assert shipped_checkpoint(out, "tiny") == path
    build_from_checkpoint(shipped_checkpoint(out, "tiny"))  # strict load
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="SHA-256.*differs from the recorded"):
        shipped_checkpoint(out, "tiny")
    assert shipped_checkpoint(out, "tiny", verify=False) == path
    path.unlink()
    with pytest.raises(PretrainedError, match="missing"):
        shipped_checkpoint(out, "tiny")
    export_pretrained(full_run, _cfg(), "x", out, name="tiny")
    (out / "tiny.json").unlink()
    with pytest.raises(PretrainedError, match="no shipped pretrained checkpoint"):
        shipped_checkpoint(out, "tiny")


def test_resolve_weights_pretrained(full_run, tmp_path, monkeypatch):
    out = tmp_path / "pretrained"
    out.mkdir()
    monkeypatch.setattr(P, "PRETRAINED_DIR", out)
    with pytest.raises(PipelineError, match=r'weights "pretrained".*no shipped pretrained checkpoint.*make pretrained'):
        resolve_weights("pretrained")
    export_pretrained(full_run, _cfg(), "x", out, name=P.SHIPPED_NAME)
    path = resolve_weights("pretrained")
    assert path == str(out / f"{P.SHIPPED_NAME}.safetensors")
    build_from_checkpoint(path)
    assert resolve_weights("") == "" and resolve_weights(None) == ""
    assert resolve_weights("some/file.safetensors") == "some/file.safetensors"
    Path(path).write_bytes(Path(path).read_bytes() + b" ")
    with pytest.raises(PipelineError, match="SHA-256"):
        resolve_weights("pretrained")


# ------------------------------------------------------------------------------------------
# seggpt pretrain
# ------------------------------------------------------------------------------------------
def _cli(*args: str) -> int:
    from seggpt_lib import cli

    return cli.main(["pretrain", *args])


def test_cli_trains_exports_and_reruns_as_a_no_op(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    args = ["--run-dir", str(run_dir), "--steps", "4", "--out", str(out), "--quiet", "--device", "cpu", "--set",
            f"images={N_TRAIN}", f"val_images={N_VAL}", "preset=vit_nano", "batch_size=4", "eval_every=2",
            "val_pairs=8", f"image_size={SIZE}"]
    assert _cli(*args) == 0
    text = capsys.readouterr().out
    assert "building the shapes set" in text and "step 4 of 4" in text and "exported" in text
    info = json.loads((out / "vit_nano_shapes.json").read_text())
    assert info["steps"] == 4 and info["recipe"]["preset"] == "vit_nano" and info["recipe"]["steps"] == 4
    assert info["recipe"]["images"] == N_TRAIN and info["recipe"]["image_size"] == SIZE
    assert info["command"].startswith("seggpt pretrain")
    assert info["sha256"] == file_sha256(out / "vit_nano_shapes.safetensors")
    assert shipped_checkpoint(out, "vit_nano_shapes") == out / "vit_nano_shapes.safetensors"
    data = tmp_path / "run_data"
    assert len(DefectIndex.scan(data / "train", verify=False)) == N_TRAIN + 2
    assert len(DefectIndex.scan(data / "val", verify=False)) == N_VAL + 1

    run_before, data_before = _tree_digest(run_dir / "checkpoints"), _tree_digest(data)
    for p in out.iterdir():
        p.unlink()
    assert _cli(*args) == 0  # finished: nothing to train, nothing rebuilt, exported again
    text = capsys.readouterr().out
    assert "building the shapes set" not in text and "step 4 of 4" in text and "exported" in text
    assert _tree_digest(run_dir / "checkpoints") == run_before
    assert _tree_digest(data) == data_before
    assert json.loads((out / "vit_nano_shapes.json").read_text())["sha256"] == info["sha256"]


def test_cli_unknown_key_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _cli("--run-dir", str(run_dir), "--out", str(tmp_path / "out"), "--quiet", "--set", "bogus=1") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "bogus" in err and "valid keys" in err
    assert not run_dir.exists() and not (tmp_path / "run_data").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# the shipped checkpoint reads its prompt
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _score(model, root: Path, pairs: int = 48, seed: int = 7) -> dict[str, float]:
    """The pretraining validation of ``model`` on the shapes set ``root`` (as
    :meth:`~seggpt_lib.engine.trainer.Trainer.evaluate`: fixed pairs, the query half hidden, the
    prediction snapped to the palette), plus the painted share of positive and negative queries."""
    from torch.utils.data import DataLoader

    from seggpt_lib import data as D
    from seggpt_lib.engine.trainer import TrainConfig, _snap_query
    from seggpt_lib.eval import metrics as M

    t = TrainConfig(train_dataset_dir=str(root))
    mean, std = t.image_mean, t.image_std
    ds = D.PairDataset(D.DefectIndex.scan(root), D.PairConfig.for_model(
        model.cfg, train=False, length=pairs, negative_share=t.val_negative_share, free_share=t.val_free_share,
        negative_target="empty", defect_color=[255, 255, 255], seed=seed, mean=mean, std=std))
    model.eval()
    records, painted = [], {"positive": [], "negative": [], "free": []}
    for batch in DataLoader(ds, batch_size=16, collate_fn=D.collate):
        _, pred, _ = model(**D.model_inputs(batch, "cpu"))
        lbl = _snap_query(model.unpatchify(pred.float()), batch["palette"], mean, std)
        for j in range(lbl.shape[0]):
            pr, gt = (lbl[j] > 0).numpy(), (batch["query_label"][j] > 0).numpy()
            kind = batch["kind"][j]
            painted[kind].append(float(pr.mean()))
            records.append(M.PairResult(query=batch["query_file"][j], prompts=[batch["prompt_file"][j]], kind=kind,
                                        query_class=batch["query_class"][j], pred=pr, gt=gt))
    _, summ = M.evaluate(records)
    return {"miou": summ["miou"], "pes": summ["pes"], "n_positive": summ["n_positive"],
            "n_negative": summ["n_negative"],
            **{f"painted_{k}": float(np.mean(v)) if v else float("nan") for k, v in painted.items()}}


def test_shipped_checkpoint_segments_what_its_prompt_shows(tmp_path):
    """The shipped checkpoint (4000 steps on this CPU) segments shapes in context: on shapes
    images it never saw its positive mIoU is several times the untrained model's. What it does not
    do yet is refuse a prompt of a class the query lacks: measured at export, a negative pair's
    query gets as much paint as a positive's (validation mIoU on negatives 0.21, positives 0.17;
    pretrained/vit_micro_shapes_metrics.csv). So this test does not claim it; fine-tuning with
    weight_query_defects is what teaches the pipeline's model to refuse."""
    weights = P.PRETRAINED_DIR / f"{P.SHIPPED_NAME}.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} is not there yet (make pretrained builds it)")
    from seggpt_lib.model.seggpt import SegGPT

    path = shipped_checkpoint()  # its SHA-256 checked against the recorded one
    info = P.shipped_info()
    model = build_from_checkpoint(path)  # strict
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # a fresh set: a seed the pretraining never rendered (training 0, validation 1_000_003)
    root = generate_shapes(tmp_path / "shapes", n_images=40, seed=424_242, size=info["recipe"]["image_size"],
                           show_progress=False)
    torch.manual_seed(0)
    scratch = SegGPT(model.cfg)  # the same architecture, untrained
    trained, random = _score(model, root, pairs=64), _score(scratch, root, pairs=64)
    assert trained["n_positive"] >= 20 and trained["n_negative"] >= 10
    # it segments the class its prompt shows, far better than the same architecture untrained
    assert trained["miou"] > 2 * random["miou"] and trained["miou"] > random["miou"] + 0.05, (trained, random)
    assert trained["painted_positive"] > 0, trained
