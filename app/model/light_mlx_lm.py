"""Import the parts of mlx-lm Parley runs on without importing `transformers`.

`import mlx_lm.anything` first runs `mlx_lm/__init__.py`, which imports its
converter, its generator and, through `mlx_lm.utils`, `transformers` and
huggingface_hub's downloader: about 1.3 s of a 2.8 s `parley chat` start-up
on a quiet machine (6 s on a busy one), for code a local model never calls.
Parley uses only the model classes (`mlx_lm.models`), the samplers and
`mlx_lm.utils.load_model`, none of which needs a tokenizer library or a network.

`install()` (called by `app.cli.main` and `app.model.loader.load_model`) does
two things, both only when mlx_lm is not imported yet:
- registers the `mlx_lm` package without running its `__init__`; the first
  access to a name the package would have defined (`mlx_lm.load`,
  `mlx_lm.generate`, ...) runs the real `__init__` then, so other code that
  uses them still works, only later;
- imports `mlx_lm.utils` with its tokenizer and downloader imports deferred:
  `mlx_lm.utils.load` (tokenizer included) and its Hub downloads import the
  real ones on their first call.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from app.stand_ins import import_with_stand_ins

_TOKENIZER_UTILS = "mlx_lm.tokenizer_utils"
# names `mlx_lm/__init__.py` binds to functions (two of them shadow submodules of the same name)
_DEFINED_BY_INIT = frozenset({"convert", "generate", "batch_generate", "stream_generate", "load"})


def install() -> None:
    """Make `import mlx_lm.<module>` cheap (see the module docstring); idempotent."""
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None:
        return  # not installed: the importing code says so itself
    package = importlib.util.module_from_spec(spec)
    package.__getattr__ = _run_real_init(package, spec)
    sys.modules["mlx_lm"] = package
    package.__version__ = importlib.import_module("mlx_lm._version").__version__
    _import_utils_deferring_tokenizer(package)


def _run_real_init(package: types.ModuleType, spec):
    """The package's `__getattr__`: run the real `__init__` once, on the first name it is asked for."""
    state = {"ran": False}

    def __getattr__(name: str):
        if name.startswith("__") or state["ran"]:
            raise AttributeError(f"module 'mlx_lm' has no attribute {name!r}")
        if name not in _DEFINED_BY_INIT and importlib.util.find_spec(f"mlx_lm.{name}") is not None:
            return importlib.import_module(f"mlx_lm.{name}")  # `from mlx_lm import models`
        state["ran"] = True
        spec.loader.exec_module(package)
        return package.__dict__[name] if name in package.__dict__ else __getattr__(name)

    return __getattr__


class _TokenizerWrapperPlaceholder:
    """Stands in for `mlx_lm.tokenizer_utils.TokenizerWrapper` in `mlx_lm.utils`' annotations only."""


def _deferred(module: str, name: str):
    """A function that imports `module.name` on its first call and calls it."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


def _import_utils_deferring_tokenizer(package: types.ModuleType) -> None:
    """Import `mlx_lm.utils` with stand-ins for its two heavy imports, then take the stand-ins away."""
    if "mlx_lm.utils" in sys.modules:
        return
    stubs = {_TOKENIZER_UTILS: types.ModuleType(_TOKENIZER_UTILS)}
    stubs[_TOKENIZER_UTILS].TokenizerWrapper = _TokenizerWrapperPlaceholder
    stubs[_TOKENIZER_UTILS].load = _deferred(_TOKENIZER_UTILS, "load")
    if "huggingface_hub" not in sys.modules:
        stubs["huggingface_hub"] = types.ModuleType("huggingface_hub")
        stubs["huggingface_hub"].snapshot_download = _deferred("huggingface_hub", "snapshot_download")
    try:
        import_with_stand_ins("mlx_lm.utils", stubs)
    finally:
        if package.__dict__.get("tokenizer_utils") is stubs[_TOKENIZER_UTILS]:
            del package.tokenizer_utils  # the real submodule is imported on demand
    # `utils._load_tokenizer` and `utils.snapshot_download` are the deferred functions: real on first call.
