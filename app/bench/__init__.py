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
}


def get_part(name: str) -> Callable:
    module, func = PARTS[name].split(":")
    return getattr(importlib.import_module(module), func)
