"""``seggpt ablate``: grids checked before anything runs, cells run / skipped / rerun, a failing cell
reported while the rest finish, the submitit path (its local executor), the aggregate (mean ± std,
winners only beyond the spread, figures, index linked from the results index), and the reports'
folded code.

The cells run a stand-in notebook (a notebook file given by path: it writes notebook 04's fragment
from its parameters in a second, without torch) so that a 2 x 2 grid with 2 seeds fits in a test;
one cell runs the real notebooks 01, 02 and 04 at the smoke settings through submitit."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from seggpt_lib import cli
from seggpt_lib.experiments import ablate as AB
from seggpt_lib.experiments import ablate_report as AR
from seggpt_lib.experiments import report as REP

REPO = Path(__file__).resolve().parents[1]

# pes: clearly higher with top_k 3 (its lead far beyond the seeds' spread); free_yield_rate: the seed
# moves it more than anything else (no winner); mask_ratio 0.9 makes the notebook fail
STAND_IN = '''# %% [markdown]
# # Stand-in
# writes notebook 04's fragment from its parameters

# %% tags=["parameters"]
results_dir = "results"
seed = 0
top_k = 1
train = {}

# %%
import json
import pathlib

if train.get("mask_ratio") == 0.9:
    raise ValueError("stand-in failure for mask_ratio 0.9")
R = pathlib.Path(results_dir)
(R / "work").mkdir(parents=True, exist_ok=True)
m = 0.3 + 0.2 * (top_k == 3) - 0.1 * abs(train["mask_ratio"] - 0.75) + 0.01 * seed
s = {"miou": m, "catch_rate": m, "yield_rate": 0.5, "free_yield_rate": 0.4 + 0.3 * seed + 0.01 * top_k,
     "pes": 0.5 * m + 0.25}
(R / "work" / "04_pair_evaluation.json").write_text(json.dumps({"summary": s, "grid": 2, "top_k": top_k}))

# %%
print("pes", round(s["pes"], 4))
'''


def _grid(tmp: Path, name: str = "g", **over) -> Path:
    nb = tmp / "stand_in.py"
    if not nb.is_file():
        nb.write_text(STAND_IN)
    spec = {"base": None, "set": {"results_dir": str(tmp / "results")},
            "grid": {"top_k": [1, 3], "train.mask_ratio": [0.5, 0.75]}, "seeds": 2,
            "notebooks": ["stand_in.py"], "metrics": ["pes", "free_yield_rate", "positive_miou"],
            "executor": {"kind": "local", "jobs": 2}, **over}
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(spec))
    return p


def _run(path: Path, *extra: str) -> int:
    return cli.main(["ablate", "--config", str(path), "--no-progress", *extra])


@pytest.mark.timeout(300)
def test_grid_runs_skips_and_reruns_one_cell(tmp_path, capsys):
    path = _grid(tmp_path)
    assert _run(path) == 0
    ab = AB.plan(path)
    assert len(ab.cells) == 8 and len({c.name for c in ab.cells}) == 8
    assert all(AB.is_finished(c) for c in ab.cells)
    c0 = ab.cells[0]
    assert c0.name.startswith("top_k-1__mask_ratio-0.5__seed-0__") and c0.dir.parent == ab.root
    assert ab.root == (tmp_path / "results" / "ablations" / "g").resolve()
    s = json.loads((c0.dir / "summary.json").read_text())
    assert s["status"] == "complete" and s["ablation"]["config_hash"] == c0.config_hash
    assert s["parameters"]["train"]["mask_ratio"] == 0.5 and s["headline"]["pes"] is not None
    assert (c0.dir / "reports" / "stand_in.html").is_file() and (c0.dir / "index.html").is_file()
    # the aggregate: 4 groups x 2 seeds, mean ± std, the winner only beyond the spread
    groups = pd.read_csv(ab.root / "tables" / "ablation.csv")
    assert len(groups) == 4 and set(groups["n"]) == {2}
    best = groups.loc[groups["pes_mean"].idxmax()]
    assert best["top_k"] == 3 and str(best["train.mask_ratio"]) == "0.75"
    assert math.isclose(best["pes_std"], 0.005 / math.sqrt(2), rel_tol=1e-6)  # the seeds' pes differ by 0.005
    assert groups["pes_winner"].sum() == 1 and bool(best["pes_winner"])
    assert not groups["free_yield_rate_winner"].any()  # the seeds' spread is larger than any lead
    md = (ab.root / "tables" / "ablation.md").read_text()
    assert "| **0.502 ± 0.004** |" in md and md.count("**") == 6  # pes and positive mIoU, and the note
    agg = json.loads((ab.root / "aggregate.json").read_text())
    assert agg["winners"]["pes"]["winner"] == best["group"] and agg["winners"]["free_yield_rate"]["winner"] is None
    assert agg["winners"]["positive_miou"]["winner"] == best["group"]
    assert len(pd.read_csv(ab.root / "tables" / "cells.csv")) == 8
    for key in ("top_k", "train_mask_ratio"):
        assert (ab.root / "figures" / f"ablation_{key}.png").is_file()
    page = (ab.root / "index.html").read_text()
    assert "★" in page and "8 complete" in page and "<script" not in page and c0.name in page
    assert "ablations/g/index.html" in (tmp_path / "results" / "index.html").read_text()
    prog = json.loads((ab.root / "progress.json").read_text())
    assert prog["done"] == 8 and prog["total"] == 8 and prog["eta_s"] == 0
    out = capsys.readouterr().out
    assert "[8/8]" in out and "left" in out  # cells done / total with the time left

    # rerun: every cell finished, none runs
    stamps = {c.name: (c.dir / "summary.json").stat().st_mtime_ns for c in ab.cells}
    assert _run(path) == 0
    assert "8 finished, skipped; 0 to run" in capsys.readouterr().out
    assert stamps == {c.name: (c.dir / "summary.json").stat().st_mtime_ns for c in ab.cells}

    # one cell deleted: only it runs again
    gone = ab.cells[5]
    shutil.rmtree(gone.dir)
    assert _run(path) == 0
    assert "7 finished, skipped; 1 to run" in capsys.readouterr().out
    assert AB.is_finished(gone)
    assert all(stamps[c.name] == (c.dir / "summary.json").stat().st_mtime_ns for c in ab.cells if c is not gone)

    # a changed base config: new cells (a new hash), the old folders left aside
    ab2 = AB.plan(path, overrides=["val=0.2"])
    assert not any(AB.is_finished(c) for c in ab2.cells)
    assert {c.group for c in ab2.cells} == {c.group for c in ab.cells}


@pytest.mark.timeout(300)
def test_failing_cell_is_reported_and_the_rest_finish(tmp_path, capsys):
    path = _grid(tmp_path, "f", grid={"top_k": [1], "train.mask_ratio": [0.75, 0.9]}, seeds=1,
                 executor={"kind": "local", "jobs": 2})
    assert _run(path) == 1
    out = capsys.readouterr()
    ab = AB.plan(path)
    ok, bad = ab.cells  # mask_ratio 0.75, then 0.9
    assert AB.is_finished(ok) and not AB.is_finished(bad)
    assert "FAILED" in out.out and "stand-in failure for mask_ratio 0.9" in out.out and str(bad.dir / "cell.log") in out.out
    s = json.loads((bad.dir / "summary.json").read_text())
    assert s["status"] == "failed" and "stand-in failure" in s["ablation"]["error"]
    page = (ab.root / "index.html").read_text()
    assert "Failed cells" in page and f"{bad.name}/cell.log" in page and "1 complete, 1 failed" in page
    report = (bad.dir / "reports" / "stand_in.html").read_text()
    assert "This run failed" in report  # the partial report opens with the error
    assert REP.ablation_links(tmp_path / "results")


@pytest.mark.timeout(300)
def test_submitit_local_executor_runs_a_real_cell(tmp_path):
    """The SLURM path through submitit's local executor: one cell of the real notebooks 01, 02
    and 04 at the smoke settings (a few training steps)."""
    pytest.importorskip("submitit")
    spec = {"base": None, "smoke": True, "set": {"results_dir": str(tmp_path / "results"), "heartbeat_s": 0,
                                                 "max_queries": 9, "n_panels": 1},
            "budget": {"steps": 2, "eval_every": 2}, "variants": {"defaults": {}}, "seeds": [0],
            "notebooks": ["01_data_transformation", "02_training", "04_pair_evaluation"],
            "executor": {"kind": "submitit-local", "poll_s": 0.5, "time_minutes": 10}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    assert _run(path) == 0
    ab = AB.plan(path)
    (cell,) = ab.cells
    assert cell.name.startswith("defaults__seed-0__") and AB.is_finished(cell)
    s = json.loads((cell.dir / "summary.json").read_text())
    assert s["steps"] == 2 and s["preset"] == "vit_nano" and 0 <= s["headline"]["pes"] <= 1
    assert list((ab.root / "submitit").rglob("*_result.pkl"))  # it went through submitit
    assert "submitit" in (cell.dir / "cell.log").read_text() or (cell.dir / "cell.log").stat().st_size > 0
    groups = pd.read_csv(ab.root / "tables" / "ablation.csv")
    assert len(groups) == 1 and groups["pes_mean"].between(0, 1).all()
    # the real reports open with their results and fold their code
    page = (cell.dir / "reports" / "02_training.html").read_text()
    assert "id=report-show-code" in page and "show code" in page and "celltag_report-results" in page
    assert page.index("celltag_report-results") < page.index("celltag_parameters")


@pytest.mark.parametrize("change, match", [
    ({"grid": {"stepz": [1, 2]}}, r"grid stepz=1: unknown key 'stepz'"),
    ({"grid": {"train.mask_ratoi": [0.5]}}, r"grid train.mask_ratoi=0.5: .*mask_ratoi"),
    ({"grid": {"top_k": []}}, r"grid 'top_k': an empty list"),
    ({"grid": {"top_k": ["three"]}}, r"grid top_k=\"three\": top_k must be int"),
    ({"grid": {"top_k": 3}}, r"grid 'top_k': the values must be a list"),
    ({"variants": {"a": {"train.negative_target": "nothing"}}}, r"variant 'a': train.negative_target must be"),
    ({"grid": {"results_dir": ["x"]}}, r"results_dir is set per cell"),
    ({"seeds": 0}, r"seeds must be"),
    ({"notebooks": ["06_nothing"]}, r"unknown notebook '06_nothing'"),
    ({"executor": {"kind": "cloud"}}, r"executor.kind must be one of"),
    ({"executor": {"jobz": 2}}, r"unknown executor key executor.jobz"),
    ({"gridd": {}}, r"unknown key gridd"),
    ({"grid": {"seed": [1, 2]}}, r"seed is set by the seeds"),
])
def test_bad_grids_are_clear_errors_before_anything_runs(tmp_path, capsys, change, match):
    path = _grid(tmp_path, **change)
    with pytest.raises(AB.AblationError, match=match):
        AB.plan(path)
    assert _run(path) == 1 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing ran, nothing written


def test_shipped_grids_resolve():
    full = AB.plan(REPO / "configs" / "ablations" / "original.json")
    quick = AB.plan(REPO / "configs" / "ablations" / "original.json", quick=True)
    assert full.name == "original" and quick.name == "original_quick"
    variants = {c.variant for c in full.cells}
    assert {"defaults", "mask_ratio_0.5", "negatives_query_mask", "colour_random", "top_k_3", "grid_1",
            "grid_4"} <= variants
    by = {c.variant: c.config for c in full.cells if c.seed == 0}
    assert by["negatives_query_mask"]["train"]["negative_target"] == "query_mask"
    assert by["defaults"]["train"]["negative_target"] == "empty"
    assert by["colour_random"]["train"]["defect_color"] is None and by["top_k_3"]["top_k"] == 3
    assert by["grid_4"]["eval_grid"] == 4 and by["defaults"]["eval_grid"] == 2
    assert len({c.seed for c in full.cells}) >= 2 and len(quick.cells) < len(full.cells)
    assert quick.cells[0].config["preset"] == "vit_nano"
    sweep = AB.plan(REPO / "configs" / "ablations" / "recipe_sweep.json")
    assert "best_val_miou" in sweep.spec.metrics and len(sweep.cells) >= 6
    assert not (REPO / "benchmarks" / "recipe_sweep.py").exists()


def test_report_folds_code_and_opens_with_results():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("x")]
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "RESULT-42"}, execution_count=1)]
    first = REP.results_first(nb)
    assert [c.cell_type for c in first.cells] == ["markdown", "markdown", "code", "code", "code"]
    assert first.cells[2].metadata["tags"] == [REP.RESULTS_TAG] and first.cells[2].outputs[0]["data"]["text/plain"] == "RESULT-42"
    page = REP.fold_code("<html><head></head><body class=x><main>cells</main></body></html>")
    assert page.index("report-show-code") < page.index("<main>") and "results index" in page
    assert "#report-show-code:not(:checked) ~ main .jp-CodeCell .jp-Cell-inputWrapper{display:none}" in page
