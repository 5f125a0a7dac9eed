"""Shared fixtures: a private PARLEY_HOME per test, the tiny model, the embedded model.

OpenBLAS must be loaded before the first `import mlx` (see app.fastblas).
"""

from __future__ import annotations

from app import fastblas

fastblas.preload()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def parley_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "parley-home"
    monkeypatch.setenv("PARLEY_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer llama with a real BPE tokenizer (built once per session)."""
    from app.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 GGUF converted once per session into an mlx-lm folder."""
    from app.model.convert import convert_gguf
    from app.model.loader import embedded_gguf

    return convert_gguf(embedded_gguf(), tmp_path_factory.mktemp("embedded") / "smollm2")


@pytest.fixture
def runner(tiny_model_dir, personas_dir):
    """An engine thread on the tiny model over the test module's own `personas_dir`."""
    from tests.engine_helpers import EngineRunner

    r = EngineRunner(tiny_model_dir, personas_dir)
    yield r
    r.close()


@pytest.fixture
def make_app(tiny_model_dir, personas_dir):
    """Builds the app on the tiny model over the test module's own `personas_dir` (`run_test` starts it)."""
    from app.ui.app import ParleyApp

    def make(**kwargs) -> ParleyApp:
        return ParleyApp(model=str(tiny_model_dir), personas_dirs=[personas_dir], **kwargs)

    return make
