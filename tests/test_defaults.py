"""Every default in one place: :class:`seggpt_lib.experiments.config.PipelineConfig`.

``configs/pipeline.json`` (what ``make reproduce`` runs) holds every key with the dataclass's
value; another ``configs/*.json`` holds only documented overrides; every notebook's parameters
cell assigns the config's default to each config key it declares (a parameter that is no config
key must be listed in ``NOTEBOOK_ONLY_PARAMETERS`` with a reason); the recipe's keys are
TrainConfig fields of the right type; SMOKE and the study's settings use valid keys only; the
protocol thresholds are the metrics module's constants."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from seggpt_lib.engine.trainer import TrainConfig
from seggpt_lib.eval.metrics import CATCH_IOU, YIELD_RESPONSE
from seggpt_lib.experiments import config as CFG
from seggpt_lib.experiments import study as S

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
ALL_NOTEBOOKS = list(CFG.NOTEBOOKS) + [CFG.EXPLORER_NOTEBOOK]
DEFAULTS = CFG.PipelineConfig().to_dict()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _parameters_cell(name: str) -> dict:
    """The literal values the notebook's parameters cell assigns (parsed, not executed)."""
    text = (NB_DIR / f"{name}.py").read_text()
    cells = re.split(r"^# %%", text, flags=re.M)
    tagged = [c for c in cells if c.lstrip().startswith('tags=["parameters"]')]
    assert len(tagged) == 1, f"{name}: needs exactly one parameters cell"
    body = tagged[0].split("\n", 1)[1]
    values = {}
    for node in ast.parse(body).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, f"{name}: parameters cell: only assignments"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_defaults_derived_from_the_dataclass():
    assert CFG.DEFAULTS == DEFAULTS
    assert DEFAULTS["train"] == CFG.PIPELINE_RECIPE and DEFAULTS["synthetic"] == CFG.SYNTHETIC
    assert DEFAULTS["catch_iou"] == CATCH_IOU and DEFAULTS["yield_response"] == YIELD_RESPONSE
    assert CFG.PipelineConfig.from_dict(DEFAULTS) == CFG.PipelineConfig()
    with pytest.raises(CFG.PipelineError, match="unknown key 'nope'; valid keys: .*grids"):
        CFG.PipelineConfig.from_dict({"nope": 1})


def test_pipeline_json_is_the_defaults():
    """configs/pipeline.json: every key, each equal to the dataclass default (comments aside)."""
    raw = {k: v for k, v in _json(REPO / "configs" / "pipeline.json").items() if not k.startswith("_")}
    assert set(raw) == set(DEFAULTS), f"missing {sorted(set(DEFAULTS) - set(raw))}, extra {sorted(set(raw) - set(DEFAULTS))}"
    for k, v in DEFAULTS.items():
        assert raw[k] == v, f"configs/pipeline.json: {k}={raw[k]!r}, PipelineConfig: {v!r}"


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.json") if p.name != "pipeline.json"))
def test_other_configs_hold_documented_overrides_only(path):
    """A key in another config differs from the default and says why in ``_overrides``; the
    ``train`` recipe, when given, is compared key by key."""
    raw = _json(REPO / "configs" / path)
    overrides = raw.get("_overrides", {})
    keys = {k: v for k, v in raw.items() if not k.startswith("_")}
    CFG.load_config(REPO / "configs" / path)  # valid keys and values
    for k, v in keys.items():
        if k in CFG.PipelineConfig.MERGED and isinstance(v, dict):
            for kk, vv in v.items():
                assert vv != DEFAULTS[k].get(kk) or False, f"{path}: {k}.{kk}={vv!r} repeats the default: leave it out"
                assert f"{k}.{kk}" in overrides, f"{path}: {k}.{kk} differs from the default without a reason"
        else:
            assert v != DEFAULTS[k], f"{path}: {k}={v!r} repeats the default: leave it out"
            assert k in overrides and overrides[k].strip(), f"{path}: {k} differs from the default without a reason"
    stale = set(overrides) - set(keys) - {f"{k}.{kk}" for k in CFG.PipelineConfig.MERGED for kk in keys.get(k, {})}
    assert not stale, f"{path}: _overrides documents keys it does not set: {sorted(stale)}"


def test_magnetic_tile_config_splits_as_the_study():
    mt = CFG.load_config(REPO / "configs" / "magnetic_tile.json")
    assert (mt["val"], mt["test"]) == (S.FULL.val, S.FULL.test) == (S.QUICK.val, S.QUICK.test)
    assert mt["train"] == CFG.PIPELINE_RECIPE  # the pipeline's recipe (fg_weight and all)


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_parameters_are_the_defaults(name):
    """Every parameter of the cell: a config key with the config's default, or listed in
    NOTEBOOK_ONLY_PARAMETERS (none skipped)."""
    values = _parameters_cell(name)
    for k, v in values.items():
        if k in CFG.NOTEBOOK_OWN_MEANING and k not in CFG.NOTEBOOK_PARAMETERS[name]:
            continue  # another meaning here (the runner never passes it; NOTEBOOK_OWN_MEANING says why)
        if k in DEFAULTS:
            assert v == DEFAULTS[k], f"{name}: {k} = {v!r}, the config's default is {DEFAULTS[k]!r}"
            assert type(v) is type(DEFAULTS[k]) or v is None, f"{name}: {k} = {v!r}: another type than the default"
        else:
            assert k in CFG.NOTEBOOK_ONLY_PARAMETERS, (
                f"{name}: parameter {k!r} is no config key; add it to the config or to NOTEBOOK_ONLY_PARAMETERS with a reason")
    for k in CFG.NOTEBOOK_PARAMETERS[name]:
        assert k in DEFAULTS or k in CFG.NOTEBOOK_ONLY_PARAMETERS, f"NOTEBOOK_PARAMETERS[{name}]: {k!r} is no config key"


def test_recipe_keys_are_train_config_fields():
    """The pipeline's recipe: TrainConfig field names and types; TrainConfig's own defaults are
    the original project's recipe (fg_weight 1), the pipeline's differ where documented."""
    hints = typing.get_type_hints(TrainConfig)
    for k, v in CFG.PIPELINE_RECIPE.items():
        assert k in hints, f"PIPELINE_RECIPE: {k!r} is no TrainConfig field"
        assert CFG.type_matches(v, hints[k]), f"PIPELINE_RECIPE: {k}={v!r} is not {hints[k]}"
    assert TrainConfig().fg_weight == 1.0 and CFG.PIPELINE_RECIPE["fg_weight"] == "auto"
    TrainConfig.from_dict({**CFG.PIPELINE_RECIPE, "train_dataset_dir": "d"})


def test_smoke_and_study_settings_use_valid_keys():
    assert set(CFG.SMOKE) <= set(DEFAULTS), sorted(set(CFG.SMOKE) - set(DEFAULTS))
    assert set(CFG.SMOKE["synthetic"]) <= set(CFG.SYNTHETIC)
    CFG.check_recipe(CFG.SMOKE["train"])
    CFG.load_config(None, smoke=True)
    fields = {f.name for f in dataclasses.fields(S.StudySettings)}
    assert set(dataclasses.asdict(S.QUICK)) == fields
    for st in (S.QUICK, S.FULL):
        CFG.check_recipe(st.train)


def test_beyond_config_defaults_follow_the_pipeline():
    b, p = CFG.PipelineConfig().beyond(), CFG.PipelineConfig()
    assert (b.top_k, b.grid, b.tune_steps, b.max_queries) == (p.beyond_top_k, p.beyond_grid, p.beyond_tune_steps,
                                                              p.beyond_max_queries)
    assert b.budget_minutes == p.train_minutes and b.full_recipe() == CFG.PIPELINE_RECIPE
    assert CFG.BeyondConfig().catch_iou == CATCH_IOU and CFG.BeyondConfig().yield_response == YIELD_RESPONSE


def test_run_settings_default_to_the_pipelines_values():
    """TrainSettings and BeyondConfig take their defaults from PipelineConfig: no second copy."""
    p = CFG.PipelineConfig()
    assert CFG.TrainSettings() == p.train_settings().__class__(**{**dataclasses.asdict(p.train_settings()), "recipe": {}})
    b = CFG.BeyondConfig()
    assert CFG.BeyondConfig() == dataclasses.replace(p.beyond(), recipe={})
    assert b.budget_minutes == p.train_minutes and b.tune_steps == p.beyond_tune_steps


def test_gpu_check_training_recipe_is_the_pipelines():
    """benchmarks/gpu_check.sh's training smoke run takes fg_weight from the pipeline's recipe."""
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert not re.search(r'"fg_weight":\s*[0-9]', text), "gpu_check.sh: a literal fg_weight; read PIPELINE_RECIPE"
    assert "PIPELINE_RECIPE" in text


def test_no_threshold_literals_beside_the_constants():
    """0.000239 / catch 0.3 are written once (seggpt_lib/eval/metrics.py): every other library module
    uses CATCH_IOU / YIELD_RESPONSE (configs and notebooks carry the value as a config key, checked
    above)."""
    for path in sorted((REPO / "seggpt_lib").rglob("*.py")):
        if path == REPO / "seggpt_lib" / "eval" / "metrics.py":
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        where = path.relative_to(REPO)
        assert "0.000239" not in code, f"{where}: the yield threshold as a literal"
        assert not re.search(r"catch[_-]iou\W+(?:float\s*=\s*|default=)?0\.3\b", code), f"{where}: the catch threshold as a literal"


def test_synthetic_defaults_are_the_generators():
    """The pipeline's synthetic set is data_prep's generator with its own defaults."""
    from data_prep.prepare import SYNTHETIC_DEFAULTS

    assert CFG.SYNTHETIC == SYNTHETIC_DEFAULTS


def test_data_sources_are_what_prepare_data_builds(tmp_path):
    from data_prep.common import DataPrepError
    from data_prep.prepare import prepare_data

    assert CFG.DATA_SOURCES == ("synthetic", "coco", "magnetic_tile", "folder")
    with pytest.raises(DataPrepError, match="source must be one of"):
        prepare_data(tmp_path, "zip")
