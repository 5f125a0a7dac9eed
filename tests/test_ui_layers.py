"""app/ui talks to the engine only through commands, events and the worker; it never imports MLX."""

import ast
from pathlib import Path


def test_ui_imports_only_the_allowed_layers():
    allowed = ("app.engine.commands", "app.engine.events", "app.engine.worker", "app.catalog", "app.personas",
               "app.paths", "app.errors", "app.ui")
    ui = Path(__file__).resolve().parent.parent / "app" / "ui"
    bad = []
    for path in ui.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in ("mlx", "mlx_lm") or (name.startswith("app") and name != "app"
                                                                and not name.startswith(allowed)):
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
