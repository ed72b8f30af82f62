"""The notebook suite: jupytext pairs in sync, papermill parameters, each notebook's tables and
figures from one tiny run (``seggpt reproduce --smoke``), the explorer notebook and its
callbacks driven from Python."""
from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("papermill")
pytest.importorskip("jupytext")

import jupytext  # noqa: E402
import pandas as pd  # noqa: E402
import papermill as pm  # noqa: E402

from seggpt_lib.experiments import config as CFG  # noqa: E402
from seggpt_lib.experiments import evaluation as EV
from seggpt_lib.experiments import results as RES
from seggpt_lib.experiments import runner as RUN

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
ALL = list(CFG.NOTEBOOKS) + [CFG.EXPLORER_NOTEBOOK]
ALLOWED_IMPORTS = {"seggpt_lib", "data_prep", "pandas", "numpy", "matplotlib", "IPython", "ipywidgets",
                   "pathlib", "json", "math", "time"}


def _table(results: Path, name: str) -> pd.DataFrame:
    p = results / "tables" / f"{name}.csv"
    assert p.is_file(), f"missing table {p.name}"
    assert (results / "tables" / f"{name}.md").is_file(), f"missing {name}.md"
    return pd.read_csv(p)


def _png(results: Path, name: str) -> None:
    p = results / "figures" / f"{name}.png"
    assert p.is_file(), f"missing figure {p.name}"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def _unit(values) -> None:
    vals = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
    assert vals, "no values"
    assert all(0.0 <= v <= 1.0 for v in vals), vals


# ------------------------------------------------------------------------------------------
# the sources
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_py_and_ipynb_in_sync(name):
    py, ipynb = NB_DIR / f"{name}.py", NB_DIR / f"{name}.ipynb"
    assert py.is_file() and ipynb.is_file()
    a, b = jupytext.read(py), jupytext.read(ipynb)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(a) == cells(b), f"{name}: .py and .ipynb differ; run `jupytext --sync notebooks/{name}.py`"
    assert a.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    raw = json.loads(ipynb.read_text())
    for c in raw["cells"]:
        if c["cell_type"] == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"{name}.ipynb is committed with outputs"


@pytest.mark.parametrize("name", ALL)
def test_parameters_cell(name):
    nb = jupytext.read(NB_DIR / f"{name}.py")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    assigned = {t.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign) for t in node.targets}
    declared = pm.inspect_notebook(str(NB_DIR / f"{name}.ipynb"))
    # papermill must parse every line (a quote or '=' in a comment hides the parameter)
    assert set(declared) == assigned, f"{name}: papermill sees {sorted(declared)}, the cell assigns {sorted(assigned)}"
    missing = set(CFG.NOTEBOOK_PARAMETERS[name]) - set(declared)
    assert not missing, f"{name}: the pipeline passes {sorted(missing)}, which the notebook does not declare"
    # the cell's values against the config's defaults: tests/test_defaults.py


@pytest.mark.parametrize("name", ALL)
def test_no_private_library_names(name):
    """Notebooks call the library's public names only (no ``X._name``)."""
    tree = ast.parse((NB_DIR / f"{name}.py").read_text())
    private = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")})
    assert not private, f"{name} uses private names {private}"


def test_notebooks_numbered_in_pipeline_order():
    assert [int(n[:2]) for n in CFG.NOTEBOOKS] == list(range(1, len(CFG.NOTEBOOKS) + 1))
    assert not CFG.EXPLORER_NOTEBOOK[:1].isdigit()  # the explorer is not a stage
    on_disk = {p.stem for p in NB_DIR.glob("*.py")}
    assert on_disk == set(ALL) == set(CFG.NOTEBOOK_PARAMETERS)


@pytest.mark.parametrize("name", ALL)
def test_imports_only_library_and_plotting(name):
    tree = ast.parse((NB_DIR / f"{name}.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    assert mods <= ALLOWED_IMPORTS, f"{name} imports {sorted(mods - ALLOWED_IMPORTS)}"


# ------------------------------------------------------------------------------------------
# each notebook's results (one tiny run)
# ------------------------------------------------------------------------------------------
def test_01_data_transformation(results):
    counts = _table(results, "01_class_counts")
    assert counts["class"].iloc[-1] == "all"
    body = counts.iloc[:-1]
    assert "free" in set(body["class"]) and len(body) == 10  # 9 synthetic defect classes + free
    assert (body[["train", "val", "test"]].sum(axis=1) == body["total"]).all()
    assert (body["test"] >= 1).all()
    stats = _table(results, "01_image_stats")
    assert list(stats["split"]) == ["train", "val", "test"]
    _unit(stats[["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "defect_fraction"]].to_numpy().ravel())
    for f in ("01_samples", "01_pair_colouring"):
        _png(results, f)
    frag = RES.load_fragment(results, RES.DataFragment)
    assert Path(frag.split_root, "train", "images").is_dir() and len(frag.mean) == 3
    assert (results / "work" / "01_data_transformation.ipynb").is_file()


def test_02_training(results):
    frag = RES.load_fragment(results, RES.TrainingFragment)
    assert frag.trained and frag.steps_done == 3
    assert Path(frag.weights).is_file()
    metrics = pd.read_csv(RUN.training_run_dir(results) / "metrics.csv")
    assert metrics["step"].max() == 3 and metrics["loss"].notna().all()
    _unit(metrics["val_miou"].dropna())  # the smoke split has validation pairs
    tab = _table(results, "02_training")
    assert int(tab["steps"].iloc[0]) == 3
    for f in ("02_curves", "02_panels_start", "02_panels_end"):
        _png(results, f)


def test_03_grid_ablation(results):
    tab = _table(results, "03_grid_miou")
    top1 = tab[tab["top_k"] == 1]
    assert list(top1["grid"]) == [1, 2, 4]
    assert (tab["queries"] == 9).all()
    _unit(tab["mIoU"])
    _unit(tab["catch_rate"])
    assert list(top1["original_mIoU"]) == [0.173, 0.538, 0.327]
    assert ((tab["grid"] == 2) & (tab["top_k"] == 3)).sum() == 1  # the top-3 row
    per_class = _table(results, "03_per_class_iou")
    assert len(per_class) == 9 and {"grid_1", "grid_2", "grid_4"} <= set(per_class.columns)
    _unit(per_class[["grid_1", "grid_2", "grid_4"]].to_numpy().ravel())
    per_image = _table(results, "03_per_image")
    assert len(per_image) == 4 * 9
    for f in ("03_grid_miou", "03_per_class_iou", "03_best_cases", "03_worst_cases"):
        _png(results, f)
    frag = RES.load_fragment(results, RES.GridAblationFragment)
    assert frag.miou_by_grid().keys() == {1, 2, 4} and frag.best_grid in (1, 2, 4) and frag.queries == 9


def test_04_pair_evaluation(results):
    comp = _table(results, "04_summary")
    metrics = list(comp["metric"])
    for m in ("positive mIoU", "catch rate", "negative mIoU", "yield rate (negative prompts)", "defect-free yield", "PES"):
        assert m in metrics
    _unit(comp["ours"])
    row = comp.set_index("metric")
    assert row.loc["PES", "original"] == 0.546 and row.loc["catch rate", "original"] == 0.91
    assert row.loc["PES", "paint_nothing"] == 0.5 and row.loc["yield rate (negative prompts)", "paint_nothing"] == 1.0
    pos, neg, free = _table(results, "04_positive"), _table(results, "04_negative"), _table(results, "04_free")
    assert len(pos) == 9 and len(neg) == 9 and len(free) >= 1
    _unit(pos["iou"])
    _unit(neg["response_rate"])
    assert set(pos["catch"].astype(str)) <= {"True", "False"}
    side = _table(results, "04_per_image")
    assert {"positive_iou", "negative_iou", "negative_response_rate"} <= set(side.columns)
    assert len(_table(results, "04_original_per_image")) == 11
    for f in ("04_summary", "04_rates", "04_positive_worst", "04_negative_strongest", "04_catch_yield",
              "04_catch_yield_by_class", "04_consistency"):
        _png(results, f)
    frag = RES.load_fragment(results, RES.PairEvaluationFragment)
    assert frag.grid == CFG.DEFAULTS["eval_grid"]
    s = frag.summary
    assert s["n_positive"] == 9 and abs(s["pes"] - (0.5 * s["catch_rate"] + 0.5 * s["yield_rate"])) < 1e-12
    # the line's decision: a calibrated row beside the raw one, chosen on the validation split
    cal = s["calibrated"]
    assert cal["n_positive"] == 9 and abs(cal["pes"] - (0.5 * cal["catch_rate"] + 0.5 * cal["yield_rate"])) < 1e-12
    assert "calibrated" in set(comp.columns) and row.loc["PES", "calibrated"] == cal["pes"]
    dec = _table(results, "04_decision").set_index("row")
    assert list(dec.index) == ["model, raw (snapped mask)", "model, calibrated on val", "paint nothing",
                               "paint everything", "original (published)"]
    assert dec.loc["model, raw (snapped mask)", "PES"] == s["pes"] and dec.loc["model, calibrated on val", "PES"] == cal["pes"]
    assert dec.loc["original (published)", "catch_rate"] == 0.91 and dec.loc["paint nothing", "yield_rate"] == 1.0
    _unit(dec[["catch_rate", "yield_rate", "PES"]].to_numpy().ravel())
    op = frag.operating_point
    assert op["objective"] == CFG.DEFAULTS["calibration_objective"]
    split_root = Path(RES.load_fragment(results, RES.DataFragment).split_root)
    assert Path(op["settings"]["val_dir"]).resolve() == (split_root / "val").resolve()
    assert op["validation"]["pairs"]["positive"] > 0
    # the smoke run trains its weights inside the results folder: the point lies beside them
    weights = Path(RES.load_fragment(results, RES.TrainingFragment).weights)
    assert (results / op["path"]).resolve() == (weights.parent / "operating_point.json").resolve()
    assert json.loads((results / op["path"]).read_text())["default"] == op["default"]
    for k in ("auc_negative", "auc_free"):
        assert 0.0 <= frag.curve[k] <= 1.0
    assert 0.0 <= frag.consistency["auroc"] <= 1.0 and "separate" in frag.consistency["sentence"]


def test_reports_rendered(results):
    for name in CFG.NOTEBOOKS:
        html = (results / "reports" / f"{name}.html").read_text(encoding="utf-8")
        assert "data:image/png;base64" in html  # figures embedded: the page stands alone
        assert "Traceback" not in html


# ------------------------------------------------------------------------------------------
# the explorer
# ------------------------------------------------------------------------------------------
def test_explorer_notebook_runs(results, tmp_path):
    params = RUN.notebook_parameters(CFG.EXPLORER_NOTEBOOK, CFG.load_config(None, {"results_dir": str(results)}))

    def run():
        return RUN.execute_notebook(CFG.EXPLORER_NOTEBOOK, tmp_path / "explorer.ipynb", params, timeout=120)

    # Nondeterminism named (as in tests/test_explorer.py): on a loaded 2-core machine the kernel of
    # this widget notebook has stopped answering inside a cell (seen once here, with a training
    # job beside the suite); a cell timeout turns that into an error and one retry tells a stuck
    # kernel from a broken notebook (which fails twice).
    try:
        out = run()
    except Exception as e:  # nbclient's CellTimeoutError / DeadKernelError, possibly wrapped
        if not any(w in f"{type(e).__name__} {e}" for w in ("Timeout", "DeadKernel", "timed out")):
            raise
        out = run()
    import nbformat

    nb = nbformat.read(str(out), as_version=4)
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "positive |" in texts and "negative |" in texts
    kinds = {k for c in nb.cells if c.cell_type == "code" for o in c.outputs for k in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in kinds and "image/png" in kinds


def test_explorer_callbacks_from_python(results):
    from matplotlib.figure import Figure

    from seggpt_lib.experiments.viz import Explorer

    em = EV.load_eval_model(results, device="cpu")
    split_root = Path(RES.load_fragment(results, RES.DataFragment).split_root)
    q_root, p_root = EV.eval_roots(split_root)
    ex = Explorer(em.predictor, q_root, p_root, work_size=64)
    q = next(f for f in ex.queries if ex.query_class(f) != "free")
    out = ex.update(query=q, top_k=1, grid=2)
    assert out["kind"] == "positive" and out["query"] == q and len(out["prompts"]) == 1
    assert 0.0 <= out["iou"] <= 1.0 and 0.0 <= out["response_rate"] <= 1.0
    assert out["catch"] in (True, False) and out["yield"] is None
    assert isinstance(out["figure"], Figure)
    assert "positive" in ex.metrics_text(out)
    # top-k: the first k of the given prompts are used
    prompts = ex.default_prompts(q, 3)
    out3 = ex.update(query=q, prompts=prompts, top_k=2, grid=1, figure=False)
    assert out3["prompts"] == prompts[:2] and out3["n_pairs"] == 2 and "figure" not in out3
    # a prompt of another class: a negative pair, scored by yield
    other = next(f for f in ex.prompt_files if ex.prompt_index.class_of(ex.prompt_index.find(f)) != out["query_class"])
    neg = ex.update(query=q, prompts=[other], grid=1)
    assert neg["kind"] == "negative" and neg["yield"] in (True, False) and neg["catch"] is None
    free = [f for f in ex.queries if ex.query_class(f) == "free"]
    if free:
        assert ex.update(query=free[0], grid=1, figure=False)["kind"] == "free"
    with pytest.raises(ValueError, match="not a prompt image"):
        ex.update(query=q, prompts=["no_such_file.png"])
    # the widget calls update on every change
    ui = ex.widget()
    row, prompt_box = ui.children[0], ui.children[1]
    split_dd, topk = row.children[1], row.children[2]
    split_dd.value = 2
    assert ex.last["grid"] == 2 and ex.last["query"] == row.children[0].value
    topk.value = 2
    assert ex.last["top_k"] == 2
    prompt_box.value = (other,)
    assert ex.last["kind"] == "negative" and ex.last["prompts"] == [other] and topk.value == 1
    assert "response rate" in ui.children[2].value and "yield" in ui.children[2].value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
