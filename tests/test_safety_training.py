"""Safe by default (training side): no unsafe unpickling anywhere, interrupts keep the run, clear errors.

* every ``torch.load`` in the source tree is ``weights_only=True``; a crafted trainer state is
  refused by ``--resume`` and never runs;
* SIGINT stops ``seggpt train`` after the current step with ``checkpoints/last`` written (exit
  130, the resume command printed), and the resumed run ends with the weights of an
  uninterrupted one; ``--resume`` falls back to the newest complete ``step_N``;
* ``seggpt info --weights`` on a broken file, a NaN loss before any checkpoint, and an explicit
  ``max_steps`` beyond the epoch count each get a clear, true message.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seggpt_lib.cli import main
from seggpt_lib.engine.trainer import NonFiniteLoss, TrainConfig, resume, train

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = "vit_nano"
SCANNED = ("seggpt_lib", "data_prep", "benchmarks", "tests", "notebooks")


def _cfg_dict(synth: Path, tmp_path: Path, **kw) -> dict:
    d = dict(
        preset=TINY_PRESET, train_dataset_dir=str(synth), val_dataset_dir=str(synth), lr=1e-3,
        warmup_steps=2, cycle_steps=1000, batch_size=4, epoch=100, max_steps=6, num_workers=0, eval_per_epoch=0,
        log_dir=str(tmp_path / "runs"), run_id="r", val_pairs=8, log_interval=1, fg_weight=10.0, seed=0,
        defect_color=[255, 255, 255], query_mask_share=0.5,
    )
    d.update(kw)
    return d


def _cfg(synth: Path, tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig.from_dict(_cfg_dict(synth, tmp_path, **kw))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (k, (a[k] - b[k]).abs().max().item())


# ------------------------------------------------------------------------------------------
# item 1: weights_only everywhere; a crafted trainer state never runs
# ------------------------------------------------------------------------------------------
def _unsafe_loads(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    found = [f"{path}:{text[: m.start()].count(chr(10)) + 1}: weights_only=False"
             for m in re.finditer(r"weights_only\s*=\s*False", text)]
    if path.suffix != ".py":
        return found + [f"{path}: torch.load without weights_only=True" for m in re.finditer(r"torch\.load\(", text)
                        if not re.match(r"[^)]*weights_only\s*=\s*True", text[m.end():])]
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    return found


def test_no_unsafe_torch_load_in_the_source_tree():
    me = Path(__file__).resolve()
    files = [f for d in SCANNED if (REPO / d).is_dir() for f in sorted((REPO / d).rglob("*"))
             if f.suffix in (".py", ".ipynb") and f.resolve() != me and ".ipynb_checkpoints" not in f.parts]
    assert any(f.name == "trainer.py" for f in files) and any(f.name == "checkpoint.py" for f in files)
    problems = [p for f in files for p in _unsafe_loads(f)]
    assert not problems, "unsafe unpickling (use weights_only=True, safetensors or JSON):\n" + "\n".join(problems)


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_crafted_trainer_state_is_refused_by_resume_and_never_runs(synth, tmp_path, capsys):
    run = train(_cfg(synth, tmp_path, max_steps=2, run_id="evil"), progress=False).run_dir
    marker = tmp_path / "pwned"
    state = run / "checkpoints" / "last" / "trainer_state.pt"
    torch.save({"step": _Evil(marker), "optimizer": {}, "scaler": {}, "rng": {}}, state)
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--no-progress", "--set", "max_steps=4"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the crafted trainer state ran code"
    assert rc == 2
    assert "cannot be read safely" in err and str(state) in err, err
    assert "weights_only=False" not in err


def test_state_in_the_previous_format_still_resumes(synth, tmp_path):
    """Run folders written before this change (no checkpoint.json, only the torch RNG state):
    their trainer state holds tensors and plain values only, so a safe load reads it."""
    run = train(_cfg(synth, tmp_path, max_steps=2, run_id="old"), progress=False).run_dir
    last = run / "checkpoints" / "last"
    state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=True)
    state["rng"] = {"torch": state["rng"]["torch"]}
    torch.save(state, last / "trainer_state.pt")
    (last / "checkpoint.json").unlink()
    assert resume(run, progress=False, overrides={"max_steps": 3}).step == 3


# ------------------------------------------------------------------------------------------
# item 2: an interrupt keeps the run
# ------------------------------------------------------------------------------------------
def _rows(csv_path: Path) -> int:
    try:
        return max(0, len(csv_path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def test_sigint_saves_last_and_resume_matches_an_uninterrupted_run(synth, tmp_path, capsys):
    steps = 16
    full = train(_cfg(synth, tmp_path, max_steps=steps, run_id="full"), progress=False)
    d = _cfg_dict(synth, tmp_path, max_steps=steps, run_id="cut", ckpt_interval=2)
    cfg_path = tmp_path / "cut.json"
    cfg_path.write_text(json.dumps(d))
    run = Path(d["log_dir"]) / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "seggpt_lib", "train", "--config", str(cfg_path), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _rows(run / "metrics.csv") < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert f"seggpt train --resume {run}" in err, err[-3000:]
    marker = json.loads((run / "checkpoints" / "last" / "checkpoint.json").read_text())
    cut_at = marker["step"]
    assert 3 <= cut_at < steps, cut_at
    assert (run / "checkpoints" / "step_2" / "checkpoint.json").is_file()
    assert not any(p.name.endswith((".tmp", ".old")) for p in (run / "checkpoints").iterdir())

    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"at step {cut_at} from {run / 'checkpoints' / 'last'}" in err, err
    _assert_same(_weights(full.run_dir / "checkpoints" / "last"), _weights(run / "checkpoints" / "last"))


def test_resume_falls_back_to_the_newest_complete_step_checkpoint(synth, tmp_path, capsys):
    full = train(_cfg(synth, tmp_path, run_id="full"), progress=False)
    part = train(_cfg(synth, tmp_path, run_id="part", ckpt_interval=2), stop_at_step=5, progress=False)
    ck = part.run_dir / "checkpoints"
    assert json.loads((ck / "last" / "checkpoint.json").read_text())["step"] == 5
    (ck / "last" / "model.safetensors").unlink()  # last is now incomplete: step_4 is the newest complete one
    capsys.readouterr()
    res = resume(part.run_dir, progress=False)
    err = capsys.readouterr().err
    assert f"at step 4 from {ck / 'step_4'}" in err and "missing or incomplete" in err, err
    assert res.step == 6
    _assert_same(_weights(full.run_dir / "checkpoints" / "last"), _weights(ck / "last"))
    steps = [int(line.split(",")[0]) for line in (part.run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 7))  # the row of step 5 (past step_4) was dropped, then re-done once


# ------------------------------------------------------------------------------------------
# item 3: clear messages
# ------------------------------------------------------------------------------------------
def test_info_on_a_broken_weights_file_is_a_one_line_error(tmp_path, capsys):
    import random

    blobs = {"random.pth": random.Random(0).randbytes(4096), "empty.pt": b"", "random.safetensors": random.Random(1).randbytes(512)}
    errs = {}
    for name, blob in blobs.items():
        p = tmp_path / name
        p.write_bytes(blob)
        capsys.readouterr()
        assert main(["info", "--weights", str(p)]) == 2, name
        err = errs[name] = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(p) in err, err
        assert "weights_only" not in err and "Traceback" not in err, err
    assert "empty" in errs["empty.pt"]
    assert "not a readable checkpoint" in errs["random.pth"]


def test_nan_loss_before_any_checkpoint_says_there_is_none(synth, tmp_path, monkeypatch):
    from seggpt_lib.model.seggpt import SegGPT

    original = SegGPT.forward_loss
    monkeypatch.setattr(SegGPT, "forward_loss", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(NonFiniteLoss) as e:
        train(_cfg(synth, tmp_path, run_id="nan0"), progress=False)
    msg = str(e.value)
    assert "at step 0" in msg and "No checkpoint has been written yet" in msg, msg
    assert "checkpoints/last" not in msg and "checkpoints" not in msg, msg


def test_explicit_max_steps_is_honoured_beyond_the_epoch_count(synth, tmp_path, capsys):
    # 8 pairs per epoch at batch 4: one epoch is 2 steps; max_steps=5 asks for 5
    res = train(_cfg(synth, tmp_path, run_id="ms", epoch=1, data_count=8, max_steps=5), progress=False)
    assert res.step == 5
    err = capsys.readouterr().err
    assert "training to step 5: max_steps=5" in err and "epoch=1" in err, err
