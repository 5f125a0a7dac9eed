"""Import sqlite-utils, the catalog's library, without the two packages only its command line uses.

`import sqlite_utils` imports click (its CLI's progress bars, and an annotation of its plugin hook) and
dateutil's parser (its `parsedate` recipes): ~25-30 ms of CPU at every `parley chat` start on the 2-core
machines (measured with the standard library already imported), for code the catalog never calls (it
runs its own SQL through `Database.execute` over its own connection, plugins off). `install()` imports
sqlite_utils with stand-ins for those two modules; sys.modules holds no stand-in afterwards, so any other
`import click` gets the real one. Inside sqlite_utils the stand-ins stay bound, and the first attribute
asked of one (e.g. `click.progressbar`, `parser.parse`) imports the real module: sqlite_utils keeps its
whole behaviour, its CLI-only parts just load later. The one name read while sqlite_utils imports,
`click.Group` (the annotation of the `register_commands` hook), is a placeholder class.
"""

from __future__ import annotations

import importlib
import sys
import types

from app.stand_ins import import_with_stand_ins

DEFERRED = {"click": ("Group",), "dateutil.parser": ()}  # module -> names read at import (placeholders)


class _Placeholder:
    """Stands in for a class sqlite_utils names only in an annotation while it imports."""


class DeferredModule(types.ModuleType):
    """A module whose first attribute read imports the real one (placeholders for the names in `early`)."""

    def __init__(self, name: str, early: tuple[str, ...]):
        super().__init__(name)
        for attr in early:
            setattr(self, attr, _Placeholder)  # stays so on this stand-in (an annotation's value, nothing more)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            sys.modules.pop(self.__name__, None)
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def install() -> None:
    """Import sqlite_utils (see the module docstring); nothing when it is imported already."""
    if "sqlite_utils" in sys.modules:
        return
    stubs = {name: DeferredModule(name, early) for name, early in DEFERRED.items() if name not in sys.modules}
    import_with_stand_ins("sqlite_utils", stubs)
