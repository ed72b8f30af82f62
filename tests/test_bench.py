"""The benchmark runs on a tiny CPU config and reports sane numbers (JSON on the last line)."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from seggpt_lib.cli import bench
from seggpt_lib.experiments import bench as bench_lib

pytest.importorskip("transformers")

TINY = ["--device", "cpu", "--preset", "vit_micro", "--set", "depth=3", "--set", "out_indices=[2]",
        "--iters", "1", "--warmup", "1", "--batch-infer", "2", "--batch-train", "2", "--json"]


def _run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_cpu_benchmark_json(capsys):
    lines, res = _run_cli(TINY, capsys)
    assert any("ours/theirs" in line for line in lines)  # the table came first
    for key in ("inference_speedup", "train_speedup", "device", "config", "precision", "attn_impl_infer",
                "ours_infer_samples_per_s", "theirs_infer_samples_per_s", "ours_train_samples_per_s",
                "theirs_train_samples_per_s", "ours_infer_tflops", "theirs_train_tflops",
                "model_flops_infer_per_sample", "model_flops_train_per_sample", "max_abs_diff"):
        assert key in res, key
    assert res["device"] == "cpu" and res["precision"] == "fp32"
    assert res["config"]["preset"] == "vit_micro" and res["config"]["depth"] == 3
    for key in ("inference_speedup", "train_speedup", "ours_infer_samples_per_s", "theirs_train_samples_per_s"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["inference_speedup"] == pytest.approx(res["ours_infer_samples_per_s"] / res["theirs_infer_samples_per_s"])
    # the whole-pair decoding (transformers' way) is measured and reported beside the predictor's path
    assert res["inference_speedup_full_decode"] == pytest.approx(
        res["ours_full_infer_samples_per_s"] / res["theirs_infer_samples_per_s"])
    assert any("whole pair decoded" in line for line in lines)
    # the two networks are the same network
    assert res["max_abs_diff"] < 1e-4
    # training costs about three forwards; FLOPs are counted on the HF network, batch 1
    assert 2.0 < res["model_flops_train_per_sample"] / res["model_flops_infer_per_sample"] < 4.0
    assert res["ours_infer_peak_gib"] is None  # no per-job peak on CPU
    assert res["attn_impl_infer"] in bench_impls() and res["attn_impl_train"] in bench_impls()


def bench_impls():
    from seggpt_lib.model.attention import ATTENTION_IMPLS

    return ATTENTION_IMPLS


def test_attention_only_json(capsys):
    lines, res = _run_cli(["--attention", "--device", "cpu", "--preset", "vit_micro", "--iters", "1", "--warmup", "0",
                           "--batch-infer", "1", "--json"], capsys)
    assert res["grid"] == [16, 8] and res["heads"] == 4 and res["head_dim"] == 32
    assert set(res["impls"]) == set(bench_impls())
    for r in res["impls"].values():
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0


def test_models_share_weights():
    ours, theirs = bench_lib.build_models("vit_micro", {"depth": 3, "out_indices": [2]}, torch.device("cpu"))
    sd = theirs.state_dict()
    assert torch.equal(sd["model.encoder.layers.0.attention.rel_pos_h"], ours.blocks[0].attn.rel_pos_h)
    assert ours.blocks[0].attn.rel_pos_h.abs().sum() > 0  # the bias is exercised
    assert theirs.config._attn_implementation == "eager"


def test_table_formats_none_memory():
    res = {"config": {"preset": "p", "overrides": {}, "grid": [2, 2]}, "device": "cpu", "device_name": "x",
           "precision": "fp32", "attn_impl_infer": "a", "attn_impl_train": "b", "compile": False, "act_ckpt": False,
           "torch": "t", "transformers": "t", "batch_infer": 8, "batch_train": 4, "model_flops_infer_per_sample": 1e9,
           "model_flops_train_per_sample": 3e9, "max_abs_diff": 0.0}
    for kind in ("infer", "train"):
        for who in ("ours", "theirs"):
            res[f"{who}_{kind}_samples_per_s"] = 2.0
            res[f"{who}_{kind}_tflops"] = 0.1
            res[f"{who}_{kind}_peak_gib"] = None
        res[f"{kind}_memory_ratio"] = None
    text = bench_lib.format_table(res)
    assert "n/a" in text and "1.00x" in text


def test_compile_argument():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).compile is False
    assert parser.parse_args(["--compile"]).compile == "blocks"
    assert parser.parse_args(["--compile", "full"]).compile == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "everything"])
    with pytest.raises(ValueError, match="compile must be"):
        bench_lib.run_benchmark("cpu", preset="vit_micro", compile="everything", log=None)
