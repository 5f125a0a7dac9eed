"""Lorebooks and notes in a scene tab: the quiet lore marker on a speaker's reply (live and reopened, key l
shows the entries) and the notes dialog, which asks whose seat first (tiny model)."""

from __future__ import annotations

import pytest

from app.engine import events as ev
from app.ui.app import ParleyApp
from tests.test_ui_helpers import events_of, wait_for, write_personas
from tests.test_ui_lore import LORE
from tests.test_ui_scene import SIZE, create_scene, play

pytestmark = pytest.mark.asyncio


@pytest.fixture
def lore_app(tiny_model_dir, tmp_path):
    """Tester has a lorebook entry "Moon" (key "moon"); Other has none."""
    folder = write_personas(tmp_path / "personas")
    tester = folder / "tester.toml"
    tester.write_text(tester.read_text() + LORE)
    return ParleyApp(model=str(tiny_model_dir), personas_dirs=[folder])


def replies_by(tab) -> dict[str, list]:
    out: dict[str, list] = {}
    for view in tab.message_views():
        if view.role == "assistant":
            out.setdefault(view.persona_id, []).append(view)
    return out


async def test_a_scene_reply_with_lore_has_the_marker_live_and_reopened(lore_app):
    app = lore_app
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Night", ["tester", "other"])
        await play(pilot, tab, "see the moon")
        await play(pilot, tab, "hello again")
        added = [e for e in events_of(app, ev.LoreAdded) if e.conversation_id == tab.conversation_id]
        assert [(e.speaker, e.entries) for e in added] == [("tester", ("Moon",))]  # only the first round, only Tester

        live = replies_by(tab)
        assert "lore: Moon" in live["tester"][0].stats and live["tester"][0].lore
        assert "lore" not in live["tester"][1].stats  # the entry entered once, with the first round
        assert all("lore" not in v.stats and not v.lore for v in live["other"])  # not Other's lorebook

        shown = []
        app.notify = lambda message, **kw: shown.append(message)  # what the user would see
        live["tester"][0].focus()
        await pilot.press("l")
        await wait_for(pilot, lambda: shown, what="the lore notification")
        assert shown[-1] == "Moon: The moon here is red."

        # closed and reopened: the marker comes back, read from the catalog
        cid = tab.conversation_id
        await app.chat_screen.close_scene(cid)
        await wait_for(pilot, lambda: app.chat_screen.scene_for_conversation(cid) is None, what="the tab to close")
        tab = await app.chat_screen.open_scene(cid)
        await wait_for(pilot, lambda: len(tab.message_views()) == 6, what="the reopened transcript")
        reopened = replies_by(tab)
        assert "lore: Moon" in reopened["tester"][0].stats
        assert [v.lore for v in reopened["tester"]] == [live["tester"][0].lore, ()]
        assert all("lore" not in v.stats for v in reopened["other"])


async def test_notes_in_a_scene_tab_pick_the_seat_then_edit_its_notes(lore_app):
    from app.catalog.notes import conversation_notes, set_conversation_notes
    from app.ui.notes import NotesScreen, SeatScreen

    app = lore_app
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Night", ["tester", "other"])
        cid = tab.conversation_id
        set_conversation_notes(app.catalog, cid, "Tester saw the moon.", "tester")
        set_conversation_notes(app.catalog, cid, "Other stayed inside.", "other")

        await app.chat_screen.run_action("notes")  # as the palette entry does
        await wait_for(pilot, lambda: isinstance(app.screen, SeatScreen) and app.screen.query("#seat-list"),
                       what="the seat picker")
        seats = app.screen.query_one("#seat-list")
        assert [seats.get_option_at_index(i).id for i in range(seats.option_count)] == ["tester", "other"]
        await pilot.press("down", "enter")  # Other's seat
        await wait_for(pilot, lambda: isinstance(app.screen, NotesScreen) and app.screen.query("#notes-text"),
                       what="the notes dialog")
        assert "Other" in str(app.screen.query_one(".dialog-title").render())
        box = app.screen.query_one("#notes-text")
        assert box.text == "Other stayed inside."
        box.text = "Other stayed inside. Then went out."
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, (NotesScreen, SeatScreen)),
                       what="the dialog to close")
        assert conversation_notes(app.catalog, cid, "other") == "Other stayed inside. Then went out."
        assert conversation_notes(app.catalog, cid, "tester") == "Tester saw the moon."  # the other seat untouched

        # escape on the picker opens nothing
        await app.chat_screen.run_action("notes")
        await wait_for(pilot, lambda: isinstance(app.screen, SeatScreen), what="the seat picker")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, SeatScreen), what="the picker to close")
        assert not isinstance(app.screen, NotesScreen)
