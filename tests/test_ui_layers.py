"""Static checks of app/ui: it talks to the engine only through commands, events and the worker (never MLX),
and every key action is also in the command palette."""

import ast
from pathlib import Path

import pytest


def test_ui_imports_only_the_allowed_layers():
    allowed = ("app.engine.commands", "app.engine.events", "app.engine.worker", "app.engine.scene", "app.catalog", "app.personas",
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


def test_every_key_action_is_in_the_command_palette():
    from app.ui.palette import ACTIONS, APP_ACTIONS
    from app.ui.app import ParleyApp
    from app.ui.screens import ChatScreen

    in_palette = {action for _, _, action in ACTIONS + APP_ACTIONS}
    keyed = {b.action for b in ChatScreen.BINDINGS + ParleyApp.BINDINGS if not b.action.startswith("show_tab")}
    assert keyed <= in_palette, keyed - in_palette


@pytest.mark.slow  # a subprocess
def test_the_scene_module_the_ui_uses_imports_no_mlx_at_module_level():
    """app.ui imports app.engine.scene (create_scene, check_members): it must load MLX only inside functions."""
    import subprocess
    import sys

    code = "import sys, app.engine.scene; assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_the_help_is_built_from_the_bindings_and_names_every_key_action():
    from app.ui.app import ParleyApp
    from app.ui.screens import ChatScreen
    from app.ui.screens.help import (PLACEHOLDER, TEMPLATE, actions_in_help, binding_sources, help_text,
                                     keys_by_action, render)

    keyed = {b.action for b in ChatScreen.BINDINGS + ParleyApp.BINDINGS if not b.action.startswith("show_tab")}
    assert keyed <= actions_in_help(), keyed - actions_in_help()
    text = help_text()
    assert not PLACEHOLDER.search(text) and "| **ctrl+r** | regenerate the last reply" in text
    assert "| **F6 / F7** (or **ctrl+pageup / ctrl+pagedown**) | previous / next tab |" in text
    keys = keys_by_action(binding_sources())
    keys["regenerate"] = ["ctrl+y"]  # a key rebound in BINDINGS changes in the help by itself
    assert "| **ctrl+y** | regenerate the last reply" in render(TEMPLATE, keys)
    del keys["scenes"]  # an action that loses its key cannot be left in the help
    with pytest.raises(KeyError, match="scenes"):
        render(TEMPLATE, keys)
