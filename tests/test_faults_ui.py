"""The fault sweep through the app (Pilot): a full disk while a reply streams, a damaged catalog at start.

The full disk is real: the app runs in a private mount namespace with $PARLEY_HOME on a small tmpfs that
fills between two tokens of the reply (tests/fault_child.py, scenario app_full_during_reply).
"""

from __future__ import annotations

import pytest

from app.ui.app import ParleyApp
from app.ui.problem import ProblemScreen
from tests.test_faults import _digest, damage_catalog
from tests.test_faults_disk import _namespaces_work, assert_clean_after, run_scenario
from tests.test_ui_helpers import wait_for, write_personas

pytestmark = pytest.mark.asyncio


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm (user and mount namespaces)")
async def test_full_disk_while_a_reply_streams_keeps_the_reply_on_screen(tiny_model_dir, parley_home, tmp_path):
    result = run_scenario("app_full_during_reply", tiny_model_dir, parley_home, tmp_path)
    shown = result["app"]
    errors = [n for n in shown["notifications"] if n["severity"] == "error"]
    assert errors and errors[-1]["title"] == "Reply not saved", shown["notifications"]
    assert "could not be saved" in errors[-1]["message"] and "is full" in errors[-1]["message"]
    assert not any("aside" in n["message"] or "Internal error" in n["message"] for n in shown["notifications"])
    views = shown["views"]
    assert [v["role"] for v in views] == ["user", "assistant"]
    assert views[0]["text"] == "tell me a story" and views[0]["saved"], "the user's message is kept"
    unsaved = views[1]
    assert unsaved["unsaved"] and not unsaved["saved"] and "NOT SAVED" in unsaved["stats"]
    assert shown["streamed"].strip() and unsaved["text"] == shown["streamed"], "the whole reply stays on screen"
    after = shown["after"]
    assert after[-2]["text"] == "and now?" and after[-1]["role"] == "assistant" and after[-1]["saved"]
    assert_clean_after(result)


async def test_damaged_catalog_at_start_is_explained_on_screen_and_left_alone(tiny_model_dir, parley_home, tmp_path):
    path = damage_catalog(parley_home)
    before = _digest(path)
    app = ParleyApp(model=str(tiny_model_dir), personas_dirs=[write_personas(tmp_path / "personas")])
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, ProblemScreen), what="the problem screen")
        text = str(app.screen.query_one("#problem").render())
        assert "is damaged" in text and ".recover" in text and "Parley will not write to it" in text
        assert app.engine is None, "no model work against a damaged catalog"
        await pilot.press("q")
    assert _digest(path) == before, "nothing wrote to the damaged catalog"
