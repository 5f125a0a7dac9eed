"""Snapshot tests of the main screens (pytest-textual-snapshot).

Deterministic: fixed terminal size and theme, the model's name replaced in the title,
snapshots taken once the engine has answered, and the one chat shown is written to the
catalog beforehand with fixed figures (the tiny model's replies and timings vary).
Update after a deliberate change: pytest tests/test_ui_snapshots.py --snapshot-update
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_textual_snapshot

from app.catalog import Catalog
from app.engine import events as ev
from app.ui.app import DARK, LIGHT, ParleyApp
from app.ui.screens import HelpScreen, PersonaEditorScreen, ScenesScreen
from tests.test_ui_helpers import events_of, ui_caught_up, wait_for, write_personas

SIZE = (110, 34)
STATS = {"ttft_ms": 42.0, "reused_tokens": 80, "prefilled_tokens": 12, "generated_tokens": 57,
         "decode_tps": 31.5, "cache": "disk"}


class ParleySnapshots(pytest_textual_snapshot.SVGImageExtension):
    """The SVGs live in tests/snapshots/<test file>/ (not syrupy's __snapshots__)."""

    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(Path(test_location.filepath).parent / "snapshots" / test_location.basename)


@pytest.fixture(autouse=True)
def snapshots_in_tests_snapshots(monkeypatch):
    monkeypatch.setattr(pytest_textual_snapshot, "SVGImageExtension", ParleySnapshots)


@pytest.fixture
def app(tiny_model_dir, tmp_path) -> ParleyApp:
    return ParleyApp(model=str(tiny_model_dir), personas_dirs=[write_personas(tmp_path / "personas")], theme=DARK)


async def still(pilot) -> None:
    """No blinking cursors: a snapshot must not depend on when in the blink it is taken.

    A TextArea keeps the lines it drew in a cache whose key is the same for "cursor in the blink's dark phase"
    and "not blinking": a line drawn in the dark phase would be reused without its cursor, so the snapshot
    depended on timing (it failed on a loaded machine). Its cache is cleared once the blink is off."""
    from textual.widgets import Input, TextArea

    for screen in pilot.app.screen_stack:
        for widget in screen.query("Input, TextArea"):
            if isinstance(widget, (Input, TextArea)):
                widget.cursor_blink = False
            if isinstance(widget, TextArea):
                widget.notify_style_update()  # drops the line cache (see above)
                widget.refresh()
    await wait_for(pilot, lambda: ui_caught_up(pilot.app), what="the screen to catch up with the engine")


async def settle(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded) and ui_caught_up(app), what="the model")
    app.chat_screen.title = "Parley · tiny"
    await still(pilot)


async def open_tester(pilot) -> None:
    app = pilot.app
    await pilot.press(*"tester", "enter")
    await wait_for(pilot, lambda: events_of(app, ev.ConversationOpened) and events_of(app, ev.CacheStatesChanged),
                   what="the conversation to open")
    await settle(pilot)


def test_empty_start(app, snap_compare):
    assert snap_compare(app, terminal_size=SIZE, run_before=settle)


def test_chat_with_messages(app, snap_compare):
    with Catalog() as catalog:
        conversation = catalog.create_conversation("tester")
        catalog.add_message(conversation, "user", "How do I boil an egg?")
        catalog.add_message(conversation, "assistant", "Like this:\n\n1. Bring water to a **boil**.\n"
                            "2. Lower the egg in for `7` minutes.\n3. Cool it in cold water.",
                            meta={"stats": STATS})
        catalog.add_message(conversation, "user", "And a soft one?")
        catalog.add_message(conversation, "assistant", "Six minutes, then straight into *cold* water.",
                            meta={"stats": STATS})
    assert snap_compare(app, terminal_size=SIZE, run_before=open_tester)


def test_chat_in_the_light_theme(tiny_model_dir, tmp_path, snap_compare):
    with Catalog() as catalog:
        conversation = catalog.create_conversation("tester")
        catalog.add_message(conversation, "user", "Light or dark?")
        catalog.add_message(conversation, "assistant", "Both: **ctrl+t** switches.", meta={"stats": STATS})
    app = ParleyApp(model=str(tiny_model_dir), personas_dirs=[write_personas(tmp_path / "personas")], theme=LIGHT)
    assert snap_compare(app, terminal_size=SIZE, run_before=open_tester)


def test_help_screen(app, snap_compare):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, HelpScreen), what="the help")
        await still(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_persona_editor(app, snap_compare):
    async def run_before(pilot):
        await open_tester(pilot)
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, PersonaEditorScreen), what="the persona editor")
        await still(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_scene_with_messages(app, snap_compare):
    """A scene tab: the user's lines as "You", each persona's in its colour, figures lines, who-replies ticks."""
    with Catalog() as catalog:
        scene = catalog.create_conversation(None, kind="scene", title="Egg council", members=["tester", "other"])
        first = catalog.add_message(scene, "user", "How long for a soft egg?")
        catalog.add_message(scene, "assistant", "Six minutes, then **cold** water.", persona_id="tester",
                            meta={"stats": STATS, "round": first})
        catalog.add_message(scene, "assistant", "Five and a half, if the egg is small.", persona_id="other",
                            meta={"stats": STATS, "round": first})
        catalog.add_message(scene, "assistant", "Fine: *five and a half*.", persona_id="tester",
                            meta={"stats": STATS, "round": 99})

    async def run_before(pilot):
        app = pilot.app
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(app.screen, ScenesScreen) and app.screen.query_one("#scene-list")
                       .option_count == 1, what="the scenes list")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.active_scene() is not None
                       and len(app.chat_screen.active_scene().message_views()) == 4, what="the scene tab")
        app.chat_screen.active_scene().composer.focus()  # the message box has the cursor, every run
        await pilot.pause()
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
