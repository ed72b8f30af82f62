"""The package's layers: each layer imports only the layers below it (an import-graph test).

    utils -> model -> data -> predict -> eval -> engine -> experiments -> cli

``data_prep/`` (the dataset converters and generators) sits beside the library: it uses
``seggpt_lib.utils`` and ``seggpt_lib.data`` (the one dataset layout module), never the reverse;
within the package only ``cli`` (the commands that build a dataset, then call the library) imports
it. The notebooks, top-level scripts, call both. Every import counts, including those inside
functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("utils", "model", "data", "predict", "eval", "engine", "experiments", "cli")
RANK = {name: i for i, name in enumerate(LAYERS)}
DATA_PREP_MAY_USE = {"utils", "data"}
MAY_USE_DATA_PREP = {"cli"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module imported by ``path`` (line, dotted name), relative imports resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    return _imports_of(path.read_text(), package, str(path))


def _imports_of(source: str, package: str, filename: str = "<source>") -> list[tuple[int, str]]:
    tree = ast.parse(source, filename=filename)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # ``from seggpt_lib import data`` names a subpackage
            if mod == "seggpt_lib":
                out += [(node.lineno, f"seggpt_lib.{a.name}") for a in node.names]
    return out


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "data_prep":
        return "data_prep"
    if parts[0] == "seggpt_lib" and len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    return None


def _library_modules() -> list[Path]:
    return sorted((REPO / "seggpt_lib").rglob("*.py"))


def test_every_library_module_is_in_a_layer():
    stray = [p.relative_to(REPO).as_posix() for p in _library_modules()
             if p.parent != REPO / "seggpt_lib" and p.relative_to(REPO / "seggpt_lib").parts[0] not in RANK]
    top = sorted(p.name for p in (REPO / "seggpt_lib").glob("*.py"))
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"
    assert top == ["__init__.py", "__main__.py"], f"loose modules at the package top: {top}"


def test_layers_import_only_downwards():
    bad = []
    for path in _library_modules():
        rel = path.relative_to(REPO / "seggpt_lib").parts
        if len(rel) == 1:  # seggpt_lib/__init__.py, __main__.py
            continue
        own = rel[0]
        for line, mod in _imports(path):
            dep = _layer_of(mod)
            if dep is None or dep == own:
                continue
            if dep == "data_prep":
                ok = own in MAY_USE_DATA_PREP
            else:
                ok = RANK[dep] < RANK[own]
            if not ok:
                bad.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {mod} ({dep})")
    assert not bad, "imports against the layer order " + " -> ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_package_top_exposes_only_the_model_layer():
    deps = {_layer_of(m) for _, m in _imports(REPO / "seggpt_lib" / "__init__.py")} - {None}
    assert deps <= {"model"}, deps


def test_data_prep_uses_only_the_data_layout_layers():
    bad = []
    for path in sorted((REPO / "data_prep").glob("*.py")):
        for line, mod in _imports(path):
            dep = _layer_of(mod)
            if dep not in (None, "data_prep") and dep not in DATA_PREP_MAY_USE:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_only_cli_modules_define_subcommands():
    """Argument parsing lives in ``cli/``; the library below takes config objects."""
    offenders = []
    for path in _library_modules():
        if path.relative_to(REPO / "seggpt_lib").parts[0] == "cli":
            continue
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if "add_arguments" in names:
            offenders.append(path.relative_to(REPO).as_posix())
    assert not offenders, offenders


@pytest.mark.parametrize("source, expected", [
    ("from .x import y", "seggpt_lib.eval.x"),
    ("from . import x", "seggpt_lib.eval"),
    ("from ..data import layout", "seggpt_lib.data"),
    ("from seggpt_lib import data", "seggpt_lib.data"),
    ("def f():\n    import data_prep.cli", "data_prep.cli"),
])
def test_import_parser_sees_every_import_form(source, expected):
    # the checker itself must see every form, or the layer test could pass vacuously
    found = [m for _, m in _imports_of(source, "seggpt_lib.eval")]
    assert any(m == expected or m.startswith(expected + ".") for m in found), found
