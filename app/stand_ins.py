"""Import a module while stand-ins fill in for some of its imports (the lazy imports of `app.model.light_mlx_lm`
and `app.catalog.light_sqlite_utils`), in one place.

The stand-ins are in `sys.modules` only for the time of that import: the module keeps the names it bound to them,
and any later `import` of those modules gets the real ones.
"""

from __future__ import annotations

import importlib
import sys
import types


def import_with_stand_ins(name: str, stand_ins: dict[str, types.ModuleType]) -> None:
    """Import module `name` with `stand_ins` (module name -> stand-in) in `sys.modules`, then take them away
    (those that are still there: an import of the real module during the import replaced its stand-in)."""
    sys.modules.update(stand_ins)
    try:
        importlib.import_module(name)
    finally:
        for module, stand_in in stand_ins.items():
            if sys.modules.get(module) is stand_in:
                del sys.modules[module]
