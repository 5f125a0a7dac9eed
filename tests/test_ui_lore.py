"""The app marks a reply whose turn added lorebook entries, quietly, and shows them on `l`."""

from __future__ import annotations

import pytest

from tests.test_ui import SIZE, open_persona, send
from tests.test_ui_helpers import wait_until, write_personas

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
        await wait_until(pilot, lambda: shown, what="the lore notification")
        assert shown[-1] == "Moon: The moon here is red."
        # a transcript opened later shows the same marker, read from the catalog
        reply = app.catalog.get_message(first.message_id)
        assert "lore: Moon" in pane._view_for(reply).stats
