"""The app marks a reply whose turn added lorebook entries, quietly, and shows them on `l`."""

from __future__ import annotations

import pytest

from tests.test_ui import SIZE, open_persona, send
from tests.test_ui_helpers import wait_for, write_personas

pytestmark = pytest.mark.asyncio

LORE = '''
[lorebook]
[[lorebook.entries]]
name = "Moon"
keys = ["moon"]
content = "The moon here is red."
'''


async def test_reply_with_lore_has_a_marker_and_l_shows_the_entries(tiny_model_dir, tmp_path):
    from app.ui.app import ParleyApp

    folder = write_personas(tmp_path / "personas")
    tester = folder / "tester.toml"
    tester.write_text(tester.read_text() + LORE)
    app = ParleyApp(model=str(tiny_model_dir), personas_dirs=[folder])
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "see the moon")
        await send(pilot, pane, "hello again")
        first, second = [v for v in pane.message_views() if v.role == "assistant"]
        assert "lore: Moon" in first.stats and "lore" not in second.stats
        shown = []
        app.notify = lambda message, **kw: shown.append(message)  # what the user would see
        first.focus()
        await pilot.press("l")
        await wait_for(pilot, lambda: shown, what="the lore notification")
        assert shown[-1] == "Moon: The moon here is red."
        # a transcript opened later shows the same marker, read from the catalog
        await pane.transcript.remove_children()
        pane.reload()
        await wait_for(pilot, lambda: not pane.transcript_pending and len(pane.message_views()) == 4,
                       what="the transcript read again")
        first, second = [v for v in pane.message_views() if v.role == "assistant"]
        assert "lore: Moon" in first.stats and "lore" not in second.stats


async def test_notes_can_be_read_and_edited_in_the_app(make_app):
    from app.catalog.notes import conversation_notes, set_conversation_notes
    from app.ui.notes import NotesScreen

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "hello")
        set_conversation_notes(app.catalog, pane.conversation_id, "Ada met the captain.")
        await app.chat_screen.run_action("notes")  # as the palette entry does
        await wait_for(pilot, lambda: isinstance(app.screen, NotesScreen) and app.screen.query("#notes-text"),
                       what="the notes dialog")
        box = app.screen.query_one("#notes-text")
        assert box.text == "Ada met the captain."
        box.text = "Ada met the captain. They sailed north."
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, NotesScreen), what="the dialog to close")
        assert conversation_notes(app.catalog, pane.conversation_id) == "Ada met the captain. They sailed north."
