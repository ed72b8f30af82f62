"""Training engine: loss falls, no collapse, resume equivalence, DDP (gloo) equivalence, config errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seggpt_lib import build_seggpt, load_weights
from seggpt_lib.engine.trainer import TrainConfig, lr_at, resume, train

REPO = Path(__file__).resolve().parents[1]
# a 32x32-per-image SegGPT (the vit_nano preset): fast enough for many steps on 2 cores
TINY_PRESET = "vit_nano"


def _cfg(synth: Path, tmp_path: Path, **kw) -> TrainConfig:
    d = dict(
        preset=TINY_PRESET, train_dataset_dir=str(synth), val_dataset_dir=str(synth), lr=1e-3,
        warmup_steps=2, cycle_steps=1000, batch_size=4, epoch=100, max_steps=6, num_workers=0, eval_per_epoch=0,
        log_dir=str(tmp_path / "runs"), run_id="r", val_pairs=8, log_interval=1, fg_weight=10.0, seed=0,
        defect_color=[255, 255, 255], query_mask_share=0.5,  # the small-model recipe (benchmarks/README.md)
    )
    d.update(kw)
    return TrainConfig.from_dict(d)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_lr_schedule_warmup_cosine_restarts():
    cfg = TrainConfig(train_dataset_dir="x", lr=1.0, min_lr=0.0, warmup_steps=10, cycle_steps=100, cycle_mult=2.0, lr_decay_factor=0.5)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) < 0.01
    assert lr_at(100, cfg) == 0.0  # restart: second cycle (200 steps) warms up again
    assert lr_at(110, cfg) == pytest.approx(0.5)  # peak decayed by 0.5
    assert lr_at(300, cfg) == 0.0 and lr_at(310, cfg) == pytest.approx(0.25)


def test_loss_falls_in_30_steps(synth, tmp_path):
    result = train(_cfg(synth, tmp_path, max_steps=30), progress=False)
    losses = [float(r["loss"]) for r in result.history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # measured: about -15 % with fg x10
    run = result.run_dir
    assert (run / "config.json").is_file() and (run / "metrics.csv").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("step", "epoch", "lr", "loss", "fg_frac", "val_loss", "val_miou", "samples_per_s"):
        assert col in header
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    # the saved weights load back into the same architecture
    model = build_seggpt(TINY_PRESET)
    load_weights(model, run / "checkpoints" / "last")


def test_resume_gives_the_same_weights(synth, tmp_path):
    full = train(_cfg(synth, tmp_path, run_id="full"), progress=False)
    part = train(_cfg(synth, tmp_path, run_id="part"), stop_at_step=3, progress=False)
    assert part.step == 3
    resumed = resume(part.run_dir, progress=False)
    assert resumed.step == 6
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [int(r["step"]) for r in resumed.history]
    assert steps == sorted(set(steps))  # metrics.csv continues without duplicate rows


def test_short_default_run_does_not_collapse(synth, tmp_path):
    """With the small-model recipe of configs/pipeline.json the model paints something (no collapse)."""
    result = train(_cfg(synth, tmp_path, max_steps=60, eval_per_epoch=1, epoch=100, data_count=240, batch_size=8), progress=False)
    val_rows = [r for r in result.history if r["val_loss"] == r["val_loss"]]
    assert val_rows and result.collapse == "" and not result.collapse_steps
    assert max(r["val_fg_frac"] for r in val_rows) > 0.0
    # negative_target "query_mask" (this config): painting a negative's own defect is the target, so
    # IoU on positive or negative queries shows that it paints where the defects are
    assert max(max(r["val_miou_pos"], r["val_miou_neg"]) for r in val_rows) > 0.0
    assert (result.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(synth, tmp_path):
    # fg_weight 1 and only random masks: every sample then has the same loss weight in total, so
    # the mean of the two ranks' masked means equals the one-process masked mean (DDP averages
    # per-rank losses)
    common = dict(max_steps=3, fg_weight=1.0, query_mask_share=0.0)
    one = train(_cfg(synth, tmp_path, run_id="one", batch_size=4, **common), progress=False)
    cfg = _cfg(synth, tmp_path, run_id="ddp", batch_size=2, **common)
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "seggpt_lib", "train", "--config", str(cfg_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_dir = Path(cfg.log_dir) / "ddp"
    a, b = _weights(one.run_dir), _weights(ddp_dir)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # each rank's replica is identical: rank 1 wrote nothing, rank 0's weights are the DDP result
    assert not (ddp_dir / "checkpoints" / "last.tmp").exists()


def test_bad_config_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*lrr.*valid keys:.*lr"):
        TrainConfig.from_dict({"lrr": 1, "train_dataset_dir": "x"})
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="c.json"):
        TrainConfig.from_json(p)
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig.from_dict({"compile": "region", "train_dataset_dir": "x"})
    for ok in (False, True, "blocks", "full"):
        assert TrainConfig.from_dict({"compile": ok, "train_dataset_dir": "x"}).compile == ok


def test_unreadable_init_weights_names_the_file(synth, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(Exception, match="broken.pth"):
        train(_cfg(synth, tmp_path, init_weights=str(bad)), progress=False)
    from seggpt_lib.cli import main

    cfg = _cfg(synth, tmp_path, init_weights=str(tmp_path / "missing.pth"), run_id="m")
    cp = tmp_path / "m.json"
    cp.write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(cp), "--no-progress"]) == 2


def test_refuses_to_overwrite_an_existing_run(synth, tmp_path):
    train(_cfg(synth, tmp_path, max_steps=1, run_id="same"), progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(_cfg(synth, tmp_path, max_steps=1, run_id="same"), progress=False)


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good(synth, tmp_path, monkeypatch):
    from seggpt_lib.engine.trainer import NonFiniteLoss
    from seggpt_lib.model.seggpt import SegGPT

    first = train(_cfg(synth, tmp_path, run_id="nan", max_steps=2), progress=False)
    good = _weights(first.run_dir)
    original = SegGPT.forward_loss
    monkeypatch.setattr(SegGPT, "forward_loss", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(NonFiniteLoss, match="at step 2"):
        resume(first.run_dir, progress=False, overrides={"max_steps": 5})
    kept = _weights(first.run_dir)
    assert all(torch.equal(good[k], kept[k]) for k in good)  # the last good checkpoint is untouched
