"""In-context (prompt) tuning: the loss falls, SegGPT is untouched, files round-trip, errors, CLI."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from seggpt_lib import build_seggpt
from seggpt_lib.data.layout import DefectIndex, read_label, read_rgb
from seggpt_lib.engine.prompt_tuning import (
    LearnedPrompt,
    LearnedPromptError,
    PromptTuningConfig,
    load_learned_prompt,
    predictor_kwargs,
    prompt_loss,
    prompt_pair_tensors,
    prompt_predict,
    save_learned_prompt,
    tune_prompt,
)
from seggpt_lib.model.checkpoint import save_weights


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: torch's intra-op pool only adds overhead (and stalls on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from data_prep.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("pt") / "set"
    generate_synthetic(root, seed=0, per_class=6, size=64, classes=["pit", "scratch"], show_progress=False)
    return root


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_seggpt("vit_nano", **kw)  # 32x32 per image


def _real_prompt(synth: Path, model, cls: str = "pit") -> LearnedPrompt:
    index = DefectIndex.scan(synth, verify=False)
    row = next(i for i in range(len(index)) if index.class_of(i) == cls and not index.is_free[i])
    return LearnedPrompt.from_pair(read_rgb(index.image_path(row)), read_label(index.label_path(row)),
                                   model.cfg.image_size, class_name=cls, model_config=model.cfg.to_dict())


def _queries(synth: Path, n: int = 3) -> torch.Tensor:
    from seggpt_lib.engine.prompt_tuning import _Images
    from seggpt_lib.utils.colors import normalize

    index = DefectIndex.scan(synth, verify=False)
    data = _Images(index, range(n), (32, 32))
    return normalize(data.images)


def test_tuning_lowers_loss_and_leaves_seggpt_untouched(synth):
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init = _real_prompt(synth, model)
    loss0 = prompt_loss(model, init, synth, "pit")

    prompt, history = tune_prompt(model, synth, "pit", PromptTuningConfig(steps=20), start_from=init, progress=False)

    loss1 = prompt_loss(model, prompt, synth, "pit")
    assert loss1 < loss0 * 0.99, (loss0, loss1)
    assert prompt.info["initial_loss"] == pytest.approx(loss0, rel=1e-5)
    assert prompt.final_loss == pytest.approx(loss1, rel=1e-5)
    assert prompt.steps == 20 and len(history) == 20
    assert not torch.equal(prompt.image, init.image) and not torch.equal(prompt.label, init.label)
    # SegGPT: bit-for-bit the same, never given a gradient, flags and mode restored
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    # the schedule: lr 0.1 peak, cosine towards 0
    lrs = [r["lr"] for r in history]
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    # the prompt stays in the range of real pixels (clamped)
    assert prompt.pixel_image().dtype == np.uint8 and prompt.mask().shape == (32, 32)


def test_options_and_determinism(synth):
    model = _model()
    cfg = PromptTuningConfig(steps=3, batch_size=3, init="random", mask="query+random", negative_share=0.34,
                             fg_weight=3.0, seed=5)
    a, ha = tune_prompt(model, synth, "scratch", cfg, progress=False)
    b, hb = tune_prompt(model, synth, "scratch", cfg, progress=False)
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert a.info["init"] == "random" and a.class_name == "scratch"
    c, _ = tune_prompt(model, synth, "scratch", PromptTuningConfig(steps=2, batch_size=2, init="real",
                       init_file="scratch_000003", evaluate=False, warmup_steps=1), progress=False)
    assert c.info["init_file"].startswith("scratch_000003") and c.final_loss is not None
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="not in the dataset"):
        tune_prompt(model, synth, "dent", PromptTuningConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="mask must be"):
        tune_prompt(model, synth, "pit", PromptTuningConfig(steps=1, mask="all"), progress=False)
    with pytest.raises(ValueError, match="not a defect image of class"):
        tune_prompt(model, synth, "pit", PromptTuningConfig(steps=1, init_file="scratch_000000"), progress=False)
    with pytest.raises(ValueError, match="precision must be"):
        PromptTuningConfig(precision="fp16")
    assert PromptTuningConfig(steps=3).to_dict()["steps"] == 3


def test_save_load_gives_identical_predictions(synth, tmp_path):
    model = _model()
    prompt, _ = tune_prompt(model, synth, "pit", PromptTuningConfig(steps=2, batch_size=2), progress=False)
    path = save_learned_prompt(prompt, tmp_path / "pit.safetensors")
    again = load_learned_prompt(path, model=model)
    assert torch.equal(prompt.image, again.image) and torch.equal(prompt.label, again.label)
    for k in ("class_name", "model_config", "defect_color", "mean", "std", "steps", "final_loss", "info"):
        assert getattr(again, k) == getattr(prompt, k), k
    q = _queries(synth)
    out1, out2 = prompt_predict(model, prompt, q), prompt_predict(model, again, q)
    assert out1.shape == (3, 3, 32, 32) and torch.equal(out1, out2)
    img, tgt = prompt_pair_tensors(again, model)
    assert img.shape == tgt.shape == (3, 32, 32) and not img.requires_grad


def test_errors_wrong_size_missing_and_corrupt(synth, tmp_path):
    model = _model()
    prompt = _real_prompt(synth, model)
    path = save_learned_prompt(prompt, tmp_path / "p.safetensors")
    other = _model(img_size=(128, 64), pretrain_img_size=64)  # 64x64 per image
    with pytest.raises(LearnedPromptError, match="32x32 .*64x64"):
        load_learned_prompt(path, model=other)
    with pytest.raises(LearnedPromptError, match="model takes"):
        prompt_pair_tensors(prompt, other)
    with pytest.raises(LearnedPromptError):
        prompt_predict(other, prompt, torch.zeros(1, 3, 64, 64))
    with pytest.raises(FileNotFoundError, match="learned prompt not found"):
        load_learned_prompt(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LearnedPromptError, match="cannot read"):
        load_learned_prompt(bad)
    weights = save_weights(model, tmp_path / "w.safetensors")
    with pytest.raises(LearnedPromptError, match="not a learned prompt"):
        load_learned_prompt(weights)
    with pytest.raises(LearnedPromptError, match="one shape"):
        LearnedPrompt(torch.zeros(3, 32, 32), torch.zeros(3, 16, 32))


def test_cli_end_to_end(synth, tmp_path, capsys):
    from seggpt_lib.cli import main

    model = _model()
    weights = save_weights(model, tmp_path / "w.safetensors")
    out = tmp_path / "prompts" / "pit.safetensors"
    args = ["tune-prompt", "--weights", str(weights), "--data", str(synth), "--class", "pit", "--steps", "4",
            "--batch-size", "2", "--lr", "0.1", "--init", "real", "--out", str(out), "--device", "cpu", "--seed", "1",
            "--no-progress", "--history", str(tmp_path / "h.csv"), "--preview", str(tmp_path / "p.png")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "learned prompt for 'pit'" in text and "s/step" in text
    prompt = load_learned_prompt(out, model=model)
    assert prompt.class_name == "pit" and prompt.steps == 4 and prompt.info["weights"] == "w.safetensors"
    assert math.isfinite(prompt.final_loss) and prompt.final_loss < prompt.info["initial_loss"]
    rows = list(csv.DictReader(open(tmp_path / "h.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size == (96, 32)
    # refuses to overwrite, reports bad input
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    bad = [a if a != "pit" else "dent" for a in args] + ["--overwrite"]
    assert main(bad) == 2
    assert "not in the dataset" in capsys.readouterr().err


def test_learned_prompt_plugs_into_predictor(synth):
    inference = pytest.importorskip("seggpt_lib.predict.predictor")
    from seggpt_lib.engine.prompt_tuning import to_prompt_pairs

    model = _model()
    index = DefectIndex.scan(synth, verify=False)
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(read_rgb(index.image_path(0))).resize((32, 32)))
    mask = (read_label(index.label_path(0))[::2, ::2] != 0)
    prompt = LearnedPrompt.from_pair(img, mask, (32, 32), class_name=index.class_of(0))
    predictor = inference.SegGPTPredictor(model, **predictor_kwargs(prompt))
    # at model size a real prompt pair and the learned prompt initialised from it are the same tensors
    pp = predictor.prompt_pairs([img], [mask])
    mine = to_prompt_pairs(prompt, predictor)
    assert torch.allclose(pp.images, mine.images, atol=1e-6) and torch.allclose(pp.targets, mine.targets, atol=1e-6)
    query = read_rgb(index.image_path(1))
    pred = predictor.predict(query, prompt_pairs=mine)
    assert pred.mask.shape == query.shape[:2]
    wrong = inference.SegGPTPredictor(model, defect_color=(255, 0, 0))
    with pytest.raises(LearnedPromptError, match="defect_color"):
        to_prompt_pairs(prompt, wrong)
