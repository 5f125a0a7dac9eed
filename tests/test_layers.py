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


def test_kvstore_does_not_import_the_catalog():
    """The block pool is handed its store of cache records (app.catalog.caches.CacheStore) instead."""
    offenders = {
        f"{f.relative_to(APP)} imports {name}"
        for f in (APP / "kvstore").rglob("*.py")
        for name in imported_modules(f)
        if name == "app.catalog" or name.startswith("app.catalog.")
    }
    assert not offenders, sorted(offenders)


def test_server_does_not_import_mlx_or_the_ui():
    """app.serve is an upper layer like app.ui: it talks to the engine thread, never to MLX or Textual."""
    offenders = {
        f"{f.relative_to(APP)} imports {name}"
        for f in (APP / "serve").rglob("*.py")
        for name in imported_modules(f)
        if name.split(".")[0] in ("mlx", "mlx_lm", "textual") or name.startswith("app.ui")
    }
    assert not offenders, sorted(offenders)


# -- private names stay private ------------------------------------------------------------------------------
# A `_name` is its module's own business: another module that needs it gets a public, named API instead.
# Entries here are known debts, each owned by a branch that removes it; the lead deletes an entry when that branch
# is merged (the stale-entry check below says which).
ALLOWED_PRIVATE = {
    # issue-19c (cpu_fast split by concern): cpu_rewrite.py calls the `_cpu_prepare` hook of the mixins in
    # cpu_attention.py / cpu_blocks.py; a public hook name (e.g. `cpu_prepare`) removes this entry
    ("model", "_cpu_prepare"),
    # issue-19u restructures app/ui: ChatScreen reads ChatPane's `_closing` / `_pruning` flags
    ("ui", "_closing"), ("ui", "_pruning"),
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str, filename: str = "<source>") -> list[tuple[int, str, str]]:
    """(line, name, what) for each use of another module's private name in `source`.

    Caught: `from app.x import _name`; and `obj._name` where obj is not self/cls, not a module from outside
    `app` (argparse._SubParsersAction is the standard library's own business), and `_name` is not defined
    in this module (a def, a class, a module-level or local name, or an attribute set on self/cls).
    """
    tree = ast.parse(source, filename)
    outside, defined = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside.update((a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("app"))
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("app"):
            outside.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
              and node.value.id in ("self", "cls")):
            defined.add(node.attr)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("app"):
            found += [(node.lineno, a.name, f"from {node.module} import {a.name}") for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in defined:
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in outside):
                continue
            found.append((node.lineno, node.attr, f"{ast.unparse(base)}.{node.attr}"))
    return sorted(found)


def app_private_uses() -> list[tuple[str, str, str]]:
    """(package, name, where) for every private name an app module takes from another module."""
    return [(f.relative_to(APP).parts[0] if len(f.relative_to(APP).parts) > 1 else "", name,
             f"{f.relative_to(APP)}:{line}: {what}")
            for f in sorted(APP.rglob("*.py")) for line, name, what in private_uses(f.read_text(), str(f))]


def test_no_module_uses_another_modules_private_names():
    offenders = [where for package, name, where in app_private_uses() if (package, name) not in ALLOWED_PRIVATE]
    assert not offenders, "give these a public name in their own module:\n" + "\n".join(offenders)


def test_every_allowed_private_name_is_still_used():
    """An allow-list entry whose debt is paid goes, so it cannot cover a new use later."""
    used = {(package, name) for package, name, _ in app_private_uses()}
    assert not ALLOWED_PRIVATE - used, f"remove from ALLOWED_PRIVATE: {sorted(ALLOWED_PRIVATE - used)}"


def test_the_private_name_check_catches_imports_and_reaching_in():
    """The check itself: each way of taking a private name is reported, a module's own use is not."""
    source = (
        "import argparse\n"
        "from app.model.cpu_fast import _ptr, fast\n"
        "from app.model import cpu_fast\n"
        "class Runner:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def run(self, session, sub: argparse._SubParsersAction):\n"
        "        session._turn()\n"
        "        session._scene_decoder = None\n"
        "        cpu_fast._CpuMLP()\n"
        "        return self._mine, self._own()\n"
    )
    assert [(line, name) for line, name, _ in private_uses(source)] == [
        (2, "_ptr"), (8, "_turn"), (9, "_scene_decoder"), (10, "_CpuMLP")]
