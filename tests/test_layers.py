"""The layers point one way: the model core knows neither HTTP nor the store, serving knows no HTTP, and only the
HTTP edge gives an exception a status. A test rather than a convention, so a stray import fails CI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lpt_serve

PACKAGE = Path(lpt_serve.__file__).parent
HTTP = ("fastapi", "starlette", "uvicorn", "fastapi_offline", "multipart")
FORBIDDEN = {
    "model": (*HTTP, "lpt_serve.serving", "lpt_serve.api", "lpt_serve.training", "lpt_client"),
    "serving": (*HTTP, "lpt_serve.api", "lpt_serve.training"),
    "training": (*HTTP, "lpt_serve.serving", "lpt_serve.api"),
}
LEAVES = ("errors.py", "format.py", "paths.py")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    offences = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                offences.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offences


def test_the_leaves_import_no_layer():
    for leaf in LEAVES:
        names = imported_modules(PACKAGE / leaf)
        assert not [n for n in names if n.startswith(("lpt_serve.model", "lpt_serve.serving", "lpt_serve.api"))]
        assert not [n for n in names if n.split(".")[0] in (*HTTP, "torch")]


def test_only_the_edge_gives_an_exception_a_status():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "api"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and "Error" in b.id or
                                                      isinstance(b, ast.Name) and b.id.endswith("Exception")
                                                      for b in node.bases):
                for item in ast.walk(node):
                    if isinstance(item, ast.Name) and item.id in ("status", "status_code"):
                        offences.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert not offences
