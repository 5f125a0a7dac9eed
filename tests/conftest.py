"""Shared fixtures: a private PARLEY_HOME per test, the tiny model, the embedded model, the engine runner, the app
builder and the UI test personas; `wait_for`, the one way a Pilot test waits; the `slow` marker on real-model tests.

OpenBLAS must be loaded before the first `import mlx` (see app.fastblas).
"""

from __future__ import annotations

from app import fastblas

fastblas.preload()

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(items) -> None:
    """A test that runs the embedded model (marker `real_model`, or the `embedded_model_dir` fixture) is `slow` too."""
    for item in items:
        if item.get_closest_marker("real_model") or "embedded_model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


async def wait_for(pilot, condition, timeout: float = 15.0, what: str = "the condition") -> None:
    """Let the app run until `condition()` holds, then until the messages that change queued are handled;
    fail after `timeout` seconds. Pilot tests wait with this, never with a fixed pause."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.02)  # a polling interval, not a guess at how long something takes
    await pilot.pause()


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
def personas_dir(tmp_path) -> Path:
    """The UI tests' personas (tests.test_ui_helpers.PERSONAS); a module that needs others defines its own."""
    from tests.test_ui_helpers import write_personas

    return write_personas(tmp_path / "personas")


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
