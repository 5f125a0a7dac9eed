"""Benchmarks behind `parley bench PART`.

`PARTS` maps a part name to a function `part(lm, args) -> dict` that runs the
measurement on a loaded model (`app.model.loader.LoadedModel`) and returns a
flat dict of results (JSON-serialisable). `parley bench` prints them as a
table and writes them with `--json PATH`. Add a part by adding a module here
and an entry to `PARTS` (keys are the positional choices of `parley bench`;
`speed` is what `--quick` runs). Parts are imported lazily so that importing
this package does not import MLX.
"""

from __future__ import annotations

import importlib
from typing import Callable

# part name -> "module:function" (resolved lazily by `get_part`)
PARTS: dict[str, str] = {
    "speed": "app.bench.speed:run",
    "quality": "app.bench.quality:run",
    "ttft": "app.bench.ttft:run",
    "restore": "app.bench.restore:run",
    "capacity": "app.bench.capacity:run",
    "save": "app.bench.save:run",
    "agents": "app.bench.agents:run",
    "peer": "app.bench.peer:run",
    "scene": "app.bench.scene:run",
    "memory": "app.bench.memory:run",
    "serve": "app.bench.serve:run",
    "startup": "app.bench.startup:run",
}


def get_part(name: str) -> Callable:
    module, func = PARTS[name].split(":")
    return getattr(importlib.import_module(module), func)


def get_table(name: str) -> Callable | None:
    """The part's own `report(result) -> str` table, if its module has one."""
    module = importlib.import_module(PARTS[name].split(":")[0])
    return getattr(module, "report", None)
