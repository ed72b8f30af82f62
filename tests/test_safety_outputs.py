"""Safe by default: no command writes into its input, over an existing output without --overwrite,
or leaves a half-made output behind (the rule: seggpt_lib.utils.outputs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from seggpt_lib import build_seggpt, save_weights
from seggpt_lib.cli import main
from seggpt_lib.utils import outputs as O


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if O.TMP_MARK in p.name or O.OLD_MARK in p.name]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from data_prep.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("safety")
    data = generate_synthetic(root / "data", seed=0, per_class=2, size=32, classes=["scratch", "pit"], n_free=1,
                              show_progress=False)
    torch.manual_seed(0)
    save_weights(build_seggpt("vit_nano"), root / "w.safetensors")
    mapping = {"scratch_000000.png": ["scratch_000001.png"], "pit_000000.png": ["pit_000001.png"]}
    (root / "map.json").write_text(json.dumps(mapping))
    return root, data


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _main_fails(argv: list[str]) -> bool:
    """The command failed: a non-zero exit code, or an exception out of it."""
    try:
        return main(argv) != 0
    except Exception:
        return True


def _infer_argv(root: Path, data: Path, outdir: Path, *extra: str) -> list[str]:
    return ["infer", "--weights", str(root / "w.safetensors"), "--mapping", str(root / "map.json"),
            "--prompt-img-dir", str(data / "images"), "--prompt-label-dir", str(data / "labels"),
            "--dataset-dir", str(data), "--outdir", str(outdir), "--device", "cpu", "--no-progress", *extra]


# ------------------------------------------------------------------------------------------
# the rule itself
# ------------------------------------------------------------------------------------------
def test_rule_inside_equal_parent_symlink(tmp_path):
    src = tmp_path / "data"
    (src / "images").mkdir(parents=True)
    ok = tmp_path / "out"
    O.check_output(ok, {"--src": src})  # beside the input: fine
    O.check_output(tmp_path / "data2", {"--src": src})  # a name sharing the prefix is not inside
    with pytest.raises(O.OutputError, match=r"--out .* is inside the source folder --src .*data"):
        O.check_output(src / "pred", {"--src": src}, what="--out")
    with pytest.raises(O.OutputError, match="is the source folder"):
        O.check_output(src, {"--src": src}, what="--out", overwrite=True)
    with pytest.raises(O.OutputError, match="contains the source folder"):
        O.check_output(tmp_path, {"--src": src}, what="--out", overwrite=True)
    with pytest.raises(O.OutputError, match="inside the source"):
        O.check_output(src / "images" / ".." / "x", {"--src": src})  # .. is resolved too
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(O.OutputError, match=r"\(resolved: .*data.pred\) is inside the source folder --src"):
        O.check_output(link / "pred", {"--src": src}, what="--out")
    with pytest.raises(O.OutputError, match="is the source folder"):
        O.check_output(link, {"--src": src}, what="--out", overwrite=True)
    # the input given through a symlink, the output through the real path
    with pytest.raises(O.OutputError, match="inside the source"):
        O.check_output(src / "p", {"--src": link})
    # an input file: the output may not be it, nor a folder holding it
    f = tmp_path / "map.json"
    f.write_text("{}")
    with pytest.raises(O.OutputError, match="is the source file"):
        O.check_output(f, {"--mapping": f}, folder=False, overwrite=True)
    with pytest.raises(O.OutputError, match="contains the source file"):
        O.check_output(tmp_path, {"--mapping": f}, overwrite=True)
    # None / "" inputs are skipped
    O.check_output(ok, {"--prompts": None, "--x": ""})
    assert O.is_within(link / "a", src) and not O.is_within(tmp_path / "data2", src)


def test_rule_existing_outputs_need_overwrite(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    O.check_output(d)  # an empty folder counts as new
    (d / "x").write_text("x")
    with pytest.raises(O.OutputError, match="not empty.*--overwrite"):
        O.check_output(d, what="--outdir")
    O.check_output(d, overwrite=True)
    f = tmp_path / "f.json"
    f.write_text("{}")
    with pytest.raises(O.OutputError, match="exists.*--overwrite"):
        O.check_output(f, folder=False)
    O.check_output(f, folder=False, overwrite=True)
    with pytest.raises(O.OutputError, match="not a folder"):
        O.check_output(f, overwrite=True)
    with pytest.raises(O.OutputError, match="is a folder"):
        O.check_output(d, folder=False, overwrite=True)


def test_rule_staged_outputs_all_or_nothing(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(RuntimeError):
        with O.output_dir(out) as tmp:
            assert tmp.parent == out.parent and tmp.name.startswith(".out")
            (tmp / "a").write_text("half")
            raise RuntimeError("boom")
    assert not (tmp_path / "deep").exists()  # nothing left, not even the parents made for it
    with O.output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and _leftovers(out.parent) == []
    with pytest.raises(RuntimeError):
        with O.output_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "1" and _leftovers(out.parent) == []  # the old output untouched
    with O.output_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    # replace=names: only the owned names are replaced, other files stay
    (out / "notes.txt").write_text("mine")
    with O.output_dir(out, overwrite=True, replace=("a", "b")) as tmp:
        (tmp / "a").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["a", "notes.txt"] and _leftovers(out.parent) == []
    # files
    f = tmp_path / "f" / "m.json"
    with pytest.raises(RuntimeError):
        with O.output_file(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not (tmp_path / "f").exists()
    with O.output_file(f) as tmp:
        tmp.write_text("1")
    with pytest.raises(O.OutputError, match="--overwrite"):
        with O.output_file(f):
            pass
    with O.output_file(f, overwrite=True) as tmp:
        tmp.write_text("2")
    assert f.read_text() == "2" and _leftovers(f.parent) == []


# ------------------------------------------------------------------------------------------
# every writing command
# ------------------------------------------------------------------------------------------
def test_infer_refuses_outdir_inside_its_inputs(work, tmp_path, capsys):
    root, data = work
    before = _snapshot(data)
    for outdir, flag in ((data / "pred", "--dataset-dir"), (data / "labels" / "pred", "--dataset-dir"),
                         (data, "--dataset-dir"), (root, "--dataset-dir")):
        assert main(_infer_argv(root, data, outdir, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --outdir") and flag in err and str(data) in err, err
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    assert main(_infer_argv(root, data, link / "pred")) == 2
    assert "inside the source folder" in capsys.readouterr().err
    assert _snapshot(data) == before and not (data / "pred").exists()


def test_infer_failure_leaves_no_output_and_rerun_works(work, tmp_path, capsys):
    root, data = work
    bad = tmp_path / "q"
    (bad / "images").mkdir(parents=True)
    for name in ("scratch_000000.png", "pit_000000.png"):
        (bad / "images" / name).write_bytes((data / "images" / name).read_bytes())
    good = (bad / "images" / "pit_000000.png").read_bytes()
    (bad / "images" / "pit_000000.png").write_bytes(good[: len(good) // 2])  # truncated: header still readable
    out = tmp_path / "runs" / "pred"
    argv = _infer_argv(root, data, out)
    argv[argv.index("--dataset-dir") + 1] = str(bad)
    assert _main_fails(argv)
    capsys.readouterr()
    assert not out.exists() and not (tmp_path / "runs").exists()
    (bad / "images" / "pit_000000.png").write_bytes(good)
    assert main(argv) == 0, capsys.readouterr().err  # no --overwrite needed
    assert (out / "summary.json").is_file() and sorted(p.name for p in (out / "label").iterdir()) == [
        "pit_000000.png", "scratch_000000.png"]
    assert _leftovers(out.parent) == []
    # with --overwrite a failing rerun leaves the previous outputs as they were
    before = _snapshot(out)
    (bad / "images" / "pit_000000.png").write_bytes(good[: len(good) // 2])
    assert _main_fails(argv + ["--overwrite"])
    capsys.readouterr()
    assert _snapshot(out) == before and _leftovers(out.parent) == []


def test_make_mapping_refuses_inside_input_and_overwrite(work, tmp_path, capsys):
    root, data = work
    base = ["make-mapping", "--queries", str(data), "--kind", "positive"]
    assert main(base + ["--out", str(data / "map.json")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--queries" in err and "inside the source" in err
    assert not (data / "map.json").exists()
    other = tmp_path / "queries"
    other.mkdir()
    assert main(["make-mapping", "--queries", str(other), "--prompts", str(data), "--kind", "positive",
                 "--out", str(data / "sub" / "m.json")]) == 2
    assert "--prompts" in capsys.readouterr().err and not (data / "sub").exists()
    out = tmp_path / "m.json"
    out.write_text("keep me")
    assert main(base + ["--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(base + ["--out", str(out), "--overwrite"]) == 0
    assert isinstance(json.loads(out.read_text()), dict) and _leftovers(tmp_path) == []


def test_tune_prompt_refuses_out_inside_data(work, tmp_path, capsys):
    root, data = work
    args = ["tune-prompt", "--weights", str(root / "w.safetensors"), "--data", str(data), "--class", "pit",
            "--steps", "1", "--batch-size", "2", "--device", "cpu", "--no-progress", "--no-eval"]
    assert main(args + ["--out", str(data / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--data" in err and "inside the source" in err
    assert not (data / "p.safetensors").exists()
    out = tmp_path / "p.safetensors"
    assert main(args + ["--out", str(out), "--history", str(data / "h.csv")]) == 2
    assert "--history" in capsys.readouterr().err and not (data / "h.csv").exists() and not out.exists()
    # the weights are an input too: never overwritten, even with --overwrite
    w = root / "w.safetensors"
    size = w.stat().st_size
    assert main(args + ["--out", str(w), "--overwrite"]) == 2
    assert "--weights" in capsys.readouterr().err and w.stat().st_size == size


def test_train_refuses_log_dir_inside_data(work, tmp_path, capsys):
    root, data = work
    for log_dir in (data / "runs", data, root):
        cfg = {"preset": "vit_nano", "train_dataset_dir": str(data), "val_dataset_dir": "", "max_steps": 1,
               "batch_size": 2, "num_workers": 0, "eval_per_epoch": 0, "log_dir": str(log_dir), "run_id": "r"}
        cp = tmp_path / "cfg.json"
        cp.write_text(json.dumps(cfg))
        assert main(["train", "--config", str(cp), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "log_dir" in err and "train_dataset_dir" in err and str(data) in err, err
    assert not (data / "runs").exists() and not (data / "r").exists()
    val = tmp_path / "val"
    val.mkdir()
    cfg.update(val_dataset_dir=str(val), log_dir=str(val / "runs"))
    cp.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(cp), "--no-progress"]) == 2
    assert "val_dataset_dir" in capsys.readouterr().err and not (val / "runs").exists()


def test_prepare_refuses_inside_source_naming_options(work, tmp_path, capsys):
    root, data = work
    before = _snapshot(data)
    assert main(["prepare", "split", "--src", str(data), "--out", str(data / "split")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--src" in err and "inside the source" in err
    assert main(["prepare", "coco", "--src", str(data), "--out", str(data / "coco")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--src" in err and "inside the source" in err
    # stats / preview: an existing file is replaced only with --overwrite
    st = tmp_path / "stats.json"
    st.write_text("keep me")
    assert main(["prepare", "stats", "--src", str(data), "--out", str(st)]) == 2
    assert "--overwrite" in capsys.readouterr().err and st.read_text() == "keep me"
    assert main(["prepare", "stats", "--src", str(data), "--out", str(st), "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads(st.read_text())["images"] == 5
    png = tmp_path / "sheet.png"
    png.write_text("keep me")
    assert main(["prepare", "preview", "--src", str(data), "--out", str(png)]) == 2
    assert "--overwrite" in capsys.readouterr().err and png.read_text() == "keep me"
    assert main(["prepare", "preview", "--src", str(data), "--out", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and _leftovers(tmp_path) == []
    assert _snapshot(data) == before


def test_reproduce_refuses_results_dir_inside_data(work):
    from seggpt_lib.cli.reproduce import _check_results_dir
    from seggpt_lib.experiments.config import PipelineError

    root, data = work
    with pytest.raises(PipelineError, match=r"results_dir .* inside the source folder data"):
        _check_results_dir({"data": f"folder:{data}", "results_dir": str(data / "results"), "weights": None})
    with pytest.raises(PipelineError, match="contains the source file weights"):
        _check_results_dir({"data": "synthetic", "results_dir": str(root), "weights": str(root / "w.safetensors")})
    _check_results_dir({"data": f"folder:{data}", "results_dir": str(root / "results"), "weights": None})
    assert os.path.isdir(data)
