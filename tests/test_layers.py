"""Lower layers never import upper ones: engine, kvstore, catalog, personas, model never import textual, app.ui
or the server (app.serve, starlette, uvicorn)."""

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"
LOWER = ["engine", "kvstore", "catalog", "personas", "model"]
FORBIDDEN = ("textual", "app.ui", "rich", "app.serve", "starlette", "uvicorn")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layer_does_not_import_ui(layer):
    files = list((APP / layer).rglob("*.py"))
    assert files, f"app/{layer} has no modules"
    offenders = {
        f"{f.relative_to(APP)} imports {name}"
        for f in files
        for name in imported_modules(f)
        if name.split(".")[0] in FORBIDDEN or name.startswith(("app.ui", "app.serve"))
    }
    assert not offenders, sorted(offenders)


def test_catalog_and_personas_do_not_import_mlx():
    offenders = [
        str(f.relative_to(APP))
        for layer in ("catalog", "personas")
        for f in (APP / layer).rglob("*.py")
        if any(n.split(".")[0] in ("mlx", "mlx_lm") for n in imported_modules(f))
    ]
    assert not offenders


def test_server_does_not_import_mlx_or_the_ui():
    """app.serve is an upper layer like app.ui: it talks to the engine thread, never to MLX or Textual."""
    offenders = {
        f"{f.relative_to(APP)} imports {name}"
        for f in (APP / "serve").rglob("*.py")
        for name in imported_modules(f)
        if name.split(".")[0] in ("mlx", "mlx_lm", "textual") or name.startswith("app.ui")
    }
    assert not offenders, sorted(offenders)
