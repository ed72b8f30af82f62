"""The interactive explorer as a user opens and drives it: ``make lab``, the results folder found
from ``notebooks/``, and its callbacks (driven from Python, as the notebook's widgets call them):
a redraw on every query change, exactly the highlighted prompts used in clicked order, a title
that says what ran, the verdict that fits the pair."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from seggpt_lib.experiments import config as CFG
from seggpt_lib.experiments import evaluation as EV
from seggpt_lib.experiments import results as RES
from seggpt_lib.experiments import runner as RUN

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"


@pytest.fixture(scope="module")
def model_and_roots(results):
    em = EV.load_eval_model(results, device="cpu")
    q_root, p_root = EV.eval_roots(Path(RES.load_fragment(results, RES.DataFragment).split_root))
    return em.predictor, q_root, p_root


def _explorer(model_and_roots, swap: bool = False):
    from seggpt_lib.experiments.viz import Explorer

    predictor, q_root, p_root = model_and_roots
    if swap:  # queries from the training split: several per class (the smoke test split has one)
        q_root, p_root = p_root, q_root
    return Explorer(predictor, q_root, p_root, work_size=64, tile_pairing="aligned")


def _parts(ui):
    row, prompts, text = ui.children[0], ui.children[1], ui.children[2]
    query, grid, top_k = row.children[:3]
    return query, grid, top_k, prompts, text


# ------------------------------------------------------------------------------------------
# opening it
# ------------------------------------------------------------------------------------------
def test_make_lab_prints_a_jupyter_lab_command():
    if shutil.which("make") is None:
        pytest.skip("no make")
    run = lambda *a: subprocess.run(["make", "-n", "lab", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    res = run("NO_BROWSER=1")
    assert res.returncode == 0, res.stderr
    cmd = [line for line in res.stdout.splitlines() if "jupyter lab" in line]
    assert cmd, res.stdout
    assert "notebooks/explorer.ipynb" in cmd[0] and "--no-browser" in res.stdout
    assert "/lab/tree/notebooks/explorer.ipynb" in res.stdout  # the address is printed
    assert "--no-browser" not in run().stdout
    reqs = [line.split(">")[0].split("=")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert "jupyterlab" in reqs


def test_results_dir_found_from_notebooks_dir(monkeypatch):
    from seggpt_lib.experiments.viz import find_results_dir

    monkeypatch.chdir(NB_DIR)
    assert find_results_dir("results") == REPO / "results"
    assert find_results_dir(REPO / "configs") == REPO / "configs"  # absolute: as given
    monkeypatch.chdir(REPO)
    assert find_results_dir("notebooks") == Path("notebooks")  # found from the working directory


def test_explorer_notebook_runs_from_notebooks_dir(results, tmp_path):
    """Opened where it lives, with its default parameters: only ``results_dir`` differs, given
    relative to the repository root (as the default ``results`` is) and so not found from
    ``notebooks/`` itself."""
    import nbformat

    rel = os.path.relpath(results, REPO)
    assert not (NB_DIR / rel).exists()

    def run():
        return RUN.execute_notebook(CFG.EXPLORER_NOTEBOOK, tmp_path / "explorer.ipynb", {"results_dir": rel},
                                    cwd=NB_DIR, timeout=120)

    # Nondeterminism named: once in four full-suite runs on a 2-core machine the kernel stopped
    # answering inside a cell of this widget notebook (nbclient waited until pytest's 600 s
    # timeout; the same test passed alone and on the next run). A cell timeout turns that into
    # an error, and one retry tells a stuck kernel from a broken notebook (which fails twice).
    try:
        out = run()
    except Exception as e:  # nbclient's CellTimeoutError / DeadKernelError
        if "Timeout" not in type(e).__name__ and "DeadKernel" not in type(e).__name__:
            raise
        out = run()
    nb = nbformat.read(str(out), as_version=4)
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "positive |" in texts and "negative |" in texts
    assert str(Path(results).resolve()) in texts  # the results it read, printed


# ------------------------------------------------------------------------------------------
# the callbacks
# ------------------------------------------------------------------------------------------
def test_redraws_on_a_same_class_query_change(model_and_roots):
    ex = _explorer(model_and_roots, swap=True)
    ui = ex.widget()
    query, _, _, prompts, text = _parts(ui)
    first = query.value
    cls = ex.query_class(first)
    second = next(f for f in ex.queries if f != first and ex.query_class(f) == cls)
    assert ex.last["query"] == first
    before = ex.last
    query.value = second
    assert ex.last is not before and ex.last["query"] == second
    panel_titles = [ax.get_title() for ax in ex.last["figure"].axes]
    assert any(second in t for t in panel_titles) and not any(first in t for t in panel_titles)
    assert set(prompts.value) == set(ex.last["prompts"])


def test_uses_exactly_the_highlighted_prompts_in_clicked_order(model_and_roots):
    ex = _explorer(model_and_roots)
    ui = ex.widget()
    query, _, top_k, prompts, text = _parts(ui)
    # at start: the highlighted prompts are the ones used, top-k is their number
    assert set(prompts.value) == set(ex.last["prompts"]) and len(ex.last["prompts"]) == top_k.value == 1
    options = [v for _, v in prompts.options]
    late, early = options[4], options[1]  # click the later one first
    prompts.value = (late,)
    assert ex.last["prompts"] == [late]
    prompts.value = (early, late)  # a second click: the widget reports its value in list order
    assert ex.last["prompts"] == [late, early] and ex.last["n_pairs"] == 2
    assert set(prompts.value) == {late, early} and top_k.value == 2
    # top-k 1 keeps the first clicked, and only it stays highlighted
    top_k.value = 1
    assert ex.last["prompts"] == [late] and tuple(prompts.value) == (late,)
    # top-k 3 adds default prompts, all highlighted
    top_k.value = 3
    assert ex.last["prompts"][0] == late and len(ex.last["prompts"]) == 3
    assert set(prompts.value) == set(ex.last["prompts"])
    # highlighted by the explorer: moved to the top of the list, in the order used
    assert [v for _, v in prompts.options][:3] == ex.last["prompts"]
    # an empty selection falls back to the defaults and says so
    prompts.value = ()
    assert "no prompt selected" in text.value
    assert ex.last["prompts"] == ex.default_prompts(query.value, 3)
    assert set(prompts.value) == set(ex.last["prompts"])
    # and from Python: the order given
    out = ex.update(query=query.value, prompts=[late, early], top_k=2, figure=False)
    assert out["prompts"] == [late, early]


def test_title_reports_the_pairs_that_ran(model_and_roots):
    ex = _explorer(model_and_roots)
    q = next(f for f in ex.queries if ex.query_class(f) != "free")
    p = ex.default_prompts(q, 1)
    out = ex.update(query=q, prompts=p, top_k=4, grid=1)  # top-4 asked, one prompt given
    title = out["figure"].get_suptitle()
    assert out["n_pairs"] == 1 and out["top_k"] == 1
    assert "1 prompt, 1 pair ran" in title and "top-4" not in title and title == out["title"]
    out2 = ex.update(query=q, prompts=ex.default_prompts(q, 2), top_k=2, grid=2, figure=True)
    assert f"2 prompts, {out2['n_pairs']} pairs ran" in out2["figure"].get_suptitle()
    assert "grid 2" in out2["title"]
    # every prompt used is drawn, with the prompt-mask colour of the one legend
    from seggpt_lib.experiments.viz import EXPLORER_LEGEND

    assert sum("prompt" in ax.get_title() for ax in out2["figure"].axes) == 2
    labels = [t.get_text() for lg in out2["figure"].legends for t in lg.get_texts()]
    assert labels == [t for t, _ in EXPLORER_LEGEND]


def test_negative_and_defect_free_show_the_yield_not_an_iou(model_and_roots):
    ex = _explorer(model_and_roots)
    q = next(f for f in ex.queries if ex.query_class(f) != "free")
    other = next(f for f in ex.prompt_files if ex.prompt_index.class_of(ex.prompt_index.find(f)) != ex.query_class(q))
    neg = ex.update(query=q, prompts=[other], grid=1)
    assert neg["kind"] == "negative" and neg["iou"] is None and neg["yield"] in (True, False)
    assert "IoU" not in neg["title"] and "response rate" in neg["title"]
    assert neg["verdict"] in ("correct yield", "overkill") and neg["verdict"] in ex.metrics_text(neg)
    assert not ex.metrics_text(neg).split("|")[1].strip().startswith("IoU")
    pos = ex.update(query=q, grid=1, figure=False)
    assert pos["kind"] == "positive" and 0.0 <= pos["iou"] <= 1.0 and "IoU" in pos["title"]
    free = [f for f in ex.queries if ex.query_class(f) == "free"]
    if free:
        out = ex.update(query=free[0], grid=1)
        assert out["kind"] == "free" and out["iou"] is None and "IoU" not in out["title"]
        assert "no prompt chosen" in out["note"]  # no prompts given: the defaults, said so


def test_threshold_slider_redecides_without_running_the_model(model_and_roots):
    """The predictions carry a per-pixel defect score: a threshold slider redraws the mask, the
    score map and the pass/defect verdict; 0.5 is the snapped mask."""
    import numpy as np

    ex = _explorer(model_and_roots)
    calls = []
    predict = ex.predictor.predict
    ex.predictor = type("Counting", (), {"predict": lambda self, *a, **k: calls.append(1) or predict(*a, **k)})()
    ui = ex.widget()
    row = ui.children[0]
    assert len(row.children) == 4, "no threshold slider"
    slider = row.children[3]
    assert slider.value == 0.5 and ex.last["threshold"] == 0.5
    pred = ex.prediction
    assert ex.last["pred_pixels"] == int(pred.mask.sum())  # 0.5: today's snapping
    n_calls = len(calls)
    slider.value = 0.0  # every pixel scores >= 0
    assert len(calls) == n_calls  # decided again, not predicted again
    assert ex.last["pred_pixels"] == pred.mask.size and ex.last["defect"] is True
    assert "threshold 0.00: DEFECT" in ex.last["title"] and "threshold 0.00" in ui.children[2].value
    t = float(np.quantile(pred.score, 0.9)) + 1e-6
    slider.value = round(t, 2)
    assert ex.last["pred_pixels"] == int((pred.score >= slider.value).sum())
    slider.value = 1.0
    if not (pred.score >= 1.0).any():
        assert ex.last["pred_pixels"] == 0 and ex.last["defect"] is False and "PASS" in ex.last["title"]
    assert any("score" in ax.get_title() and "1.00" in ax.get_title() for ax in ex.last["figure"].axes)
