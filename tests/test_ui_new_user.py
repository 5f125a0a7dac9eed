"""The app as a new user meets it (issue 16): keys that act everywhere, tabs that come back, honest figures,
and the smaller things a first hour trips on. Pilot, on the tiny model."""

from __future__ import annotations

import time

import pytest

from app.engine import commands as cmd
from app.engine import events as ev
from app.ui.screens import ExportCardScreen, PersonaEditorScreen
from app.ui.widgets import PersonaList
from tests.test_ui import SIZE, open_persona, replies, send
from tests.test_ui_helpers import events_of, palette_offers, ui_caught_up, wait_for

pytestmark = pytest.mark.asyncio


def header(pane) -> str:
    return str(pane.query_one(".chat-header").render())


def hint(pane) -> str:
    return str(pane.query_one(".composer-hint").render())


# -- 1. keys -----------------------------------------------------------------------------


async def test_every_tab_action_has_a_ctrl_or_function_key(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        tester = await open_persona(pilot, "Tester")
        other = await open_persona(pilot, "Other")
        screen = app.chat_screen
        await pilot.press("f6")
        assert screen.active_pane() is tester
        await pilot.press("f7")
        assert screen.active_pane() is other
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "GoToTabScreen", what="the go-to-tab prompt")
        await pilot.press("1")
        await wait_for(pilot, lambda: screen.active_pane() is tester, what="tab 1")
        await send(pilot, tester, "hello")
        copied = []
        app.copy_to_clipboard = copied.append
        tester.composer.focus()
        await pilot.press("ctrl+l")
        assert copied == [tester.last_reply().text]
        await pilot.press("ctrl+w")
        await wait_for(pilot, lambda: screen.pane_ids() == ["tab-other"], what="the tab to close")


async def type_character(pilot, character: str) -> None:
    """A printable key as a terminal's parser delivers it (key name and character); Pilot's press() drops the
    character of keys like "¡". The real bytes are sent through tmux in test_ui_tmux.py."""
    from textual import events
    from textual.keys import _character_to_key

    pilot.app.focused.post_message(events.Key(_character_to_key(character), character))
    await pilot.pause()


async def test_an_option_digit_character_switches_tabs_instead_of_being_typed(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        tester = await open_persona(pilot, "Tester")
        other = await open_persona(pilot, "Other")
        screen = app.chat_screen
        other.composer.focus()
        await type_character(pilot, "¡")  # option+1 on a Mac
        await wait_for(pilot, lambda: screen.active_pane() is tester, what="tab 1")
        assert tester.composer.text == "" and other.composer.text == ""
        await type_character(pilot, "±")  # alt+1 as an 8-bit xterm sends it: tab 1, where we are
        assert tester.composer.text == ""
        await type_character(pilot, "²")  # alt+2, 8-bit
        await wait_for(pilot, lambda: screen.active_pane() is other, what="tab 2")
        await type_character(pilot, "²")  # again: already there, and still not typed
        assert other.composer.text == ""
        other.composer.text = "x"
        other.composer.move_cursor(other.composer.document.end)
        await type_character(pilot, "™")  # in a box with text, characters are text
        assert other.composer.text == "x™" and screen.active_pane() is other


async def test_the_palette_lists_one_theme_command(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"theme")
        await wait_for(pilot, lambda: palette_offers(app, "theme"), what="the palette's theme hits")
        from textual.command import CommandList

        options = app.screen.query_one(CommandList)
        titles = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert sum("theme" in t.lower() for t in titles) == 1, titles


# -- 2. tabs come back -----------------------------------------------------------------------


async def test_tabs_their_order_the_active_one_and_scroll_come_back(make_app):
    app = make_app()
    async with app.run_test(size=(100, 24)) as pilot:
        tester = await open_persona(pilot, "Tester")
        for i in range(6):
            await send(pilot, tester, f"message number {i}\n\nwith\n\nseveral\n\nlines")
        other = await open_persona(pilot, "Other")
        await send(pilot, other, "hi")
        longw = await open_persona(pilot, "Longwinded")
        await pilot.press("f6")  # back to Other: the active one
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is other, what="Other")
        await pilot.press("f6")
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is tester, what="Tester")
        tester.transcript.scroll_to(y=3, animate=False, immediate=True)
        await pilot.pause()
        assert not tester.transcript.following
        await pilot.press("f7")
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is other, what="Other")
        ids = app.chat_screen.pane_ids()
        conversations = {p.persona.id: p.conversation_id for p in app.chat_screen.panes()}
        await pilot.press("ctrl+q")
    assert longw is not None
    again = make_app()
    async with again.run_test(size=(100, 24)) as pilot:
        screen = again.chat_screen
        await wait_for(pilot, lambda: screen.pane_ids() == ids, what="the same tabs in the same order")
        assert {p.persona.id: p.conversation_id for p in screen.panes()} == conversations
        await wait_for(pilot, lambda: screen.active_pane() is not None and screen.active_pane().persona.id == "other",
                       what="the active tab")
        await pilot.press("f6")
        tester = screen.active_pane()
        assert tester.persona.id == "tester"
        await wait_for(pilot, lambda: tester.transcript.scroll_y == 3, what="Tester's scroll position")
        assert not tester.transcript.following


# -- 3/4. figures ------------------------------------------------------------------------------


async def test_a_queued_message_says_whom_it_waits_for_and_its_ttft_includes_the_wait(make_app, monkeypatch):
    # The long reply must outlast the keys below on a loaded machine: the fused C step decodes the tiny model's
    # 1,500 tokens in about a second, so this test keeps the per-module path (several times slower).
    monkeypatch.setenv("PARLEY_FUSED_STEP", "0")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        waiting = await open_persona(pilot, "Tester")
        busy = await open_persona(pilot, "Longwinded")
        busy.composer.text = "talk"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.running == busy.conversation_id, what="the long reply")
        await pilot.press("f6")
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is waiting, what="Tester")
        waiting.composer.text = "me too"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Longwinded" in hint(waiting), what="the queued hint")
        assert "waits for Longwinded" in hint(waiting)
        queued_at = time.monotonic()  # the queue time measured below is what this test checks: let some pass
        await wait_for(pilot, lambda: time.monotonic() - queued_at >= 0.5, what="half a second in the queue")
        app.submit(cmd.Cancel())  # stop the long reply: the queued one starts
        await wait_for(pilot, lambda: replies(app, waiting.conversation_id) and not waiting.generating,
                       timeout=30, what="the queued reply")
        stats = replies(app, waiting.conversation_id)[-1].stats
        assert stats.queued_ms >= 400 and stats.ttft_ms > stats.queued_ms
        line = str(waiting.last_reply().query_one(".msg-stats").render())
        assert "queued" in line


async def test_a_cache_read_from_disk_on_opening_says_so_with_its_time(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "remember me")
    again = make_app()
    async with again.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: again.chat_screen.active_pane() is not None, what="the restored tab")
        pane = again.chat_screen.active_pane()
        await wait_for(pilot, lambda: "read from disk in" in header(pane), what="the header")
        assert " ms" in header(pane) and "(new)" not in header(pane)
        reply = await send(pilot, pane, "and again")
        assert reply.stats.cache == "ram" and reply.stats.opened_from == "disk"
        line = str(pane.last_reply().query_one(".msg-stats").render())
        assert "cache ram (read from disk in" in line


# -- 5. the view follows the newest message ------------------------------------------------------


async def test_returning_to_a_tab_whose_reply_finished_in_the_background_shows_its_figures(make_app):
    app = make_app()
    async with app.run_test(size=(100, 24)) as pilot:
        pane = await open_persona(pilot, "Tester")
        for i in range(3):
            await send(pilot, pane, f"turn {i}\n\nwith\n\nlines")
        pane.composer.text = "one more\n\nwith\n\nlines"
        await pilot.press("enter")
        await open_persona(pilot, "Other")  # the reply finishes while its tab is hidden
        await wait_for(pilot, lambda: not pane.generating and ui_caught_up(app), what="the background reply")
        await pilot.press("ctrl+pageup")
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is pane, what="the Tester tab")
        transcript = pane.transcript
        await wait_for(pilot, lambda: transcript.max_scroll_y > 0 and transcript.scroll_y >= transcript.max_scroll_y - 1,
                       what="the newest message in view")
        stats = pane.last_reply().query_one(".msg-stats")
        assert stats.region.bottom <= transcript.region.bottom and "ttft" in str(stats.render())
        await pilot.resize_terminal(90, 20)
        await wait_for(pilot, lambda: transcript.scroll_y >= transcript.max_scroll_y - 1, what="after a resize")


# -- 7. smaller items ------------------------------------------------------------------------------


async def test_the_persona_filter_is_cleared_after_enter(make_app, personas_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_persona(pilot, "Tester", type_it=True)
        box = app.chat_screen.query_one("#persona-filter")
        assert box.value == ""
        assert len(app.chat_screen.query_one(PersonaList).visible_ids()) == 3


async def test_an_empty_reply_and_a_reply_stopped_before_its_first_token_say_so(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        said = await send(pilot, pane, "say something")
        # a model whose first token ends its turn leaves an empty reply (the tiny model cannot be made to)
        app.catalog.add_message(pane.conversation_id, "assistant", "", parent_id=said.message_id,
                                persona_id="tester", meta={"stats": {"ttft_ms": 5.0, "reused_tokens": 0,
                                                                     "prefilled_tokens": 3, "generated_tokens": 1,
                                                                     "decode_tps": 0.0, "cache": "ram"}})
        pane.reload()
        await wait_for(pilot, lambda: not pane.transcript_pending, what="the transcript read again")
        assert "(empty reply)" in pane.last_reply().query_one(".msg-body").source
        per_word = app.engine.count_tokens("long " * 100) / 100
        relay = app._engine_event

        def stop_while_reading(event):  # on the engine thread, as the first chunk is read: no race with the UI
            if isinstance(event, ev.PrefillProgressed) and event.done < event.total:
                app.engine.cancel()
            relay(event)

        app.engine._on_event = stop_while_reading
        before = len(replies(app, pane.conversation_id))
        pane.composer.text = "long " * int(1500 / per_word)  # three prefill chunks
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(replies(app, pane.conversation_id)) > before and not pane.generating
                       and ui_caught_up(app), what="the stop")
        app.engine._on_event = relay
        stopped = replies(app, pane.conversation_id)[-1]
        assert stopped.cancelled and stopped.message_id == 0
        notes = pane.transcript.query(".stopped-note")
        assert len(notes) == 1, "the bubble stays"
        assert "stopped before the first token" in notes.first().query_one(".msg-body").source
        assert "stopped" in str(notes.first().query_one(".msg-stats").render())
        await send(pilot, pane, "short again")
        assert not pane.transcript.query(".stopped-note"), "the next message clears the note"


async def test_a_long_paste_shows_its_tokens_and_an_estimate_before_sending(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "a first message so the reading speed is known " * 3)
        assert app.prefill_tps > 0
        pane.composer.text = "word " * 1000
        await wait_for(pilot, lambda: "tokens" in hint(pane), what="the paste note")
        n = app.engine.count_tokens("word " * 1000)
        assert f"{n:,} tokens" in hint(pane) and "about" in hint(pane)


async def test_persona_editor_tab_moves_on_and_the_id_can_be_edited_and_a_missing_prompt_is_warned(make_app,
                                                                                                    personas_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, PersonaEditorScreen), what="the editor")
        editor = app.screen
        await pilot.press(*"Pirate Pete", "tab")
        assert editor.query_one("#ed-id").value == "pirate-pete"
        await pilot.press(*"-x", "tab")  # the id is editable
        await pilot.press(*"A jolly pirate")
        assert editor.query_one("#ed-name").value == "Pirate Pete"
        assert editor.query_one("#ed-id").value == "pirate-pete-x"
        assert editor.query_one("#ed-description").value == "A jolly pirate"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, PersonaEditorScreen), "no system prompt: a warning first"
        assert "no system prompt" in str(editor.query_one("#ed-error").render())
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, PersonaEditorScreen), what="the save")
        assert (personas_dir / "pirate-pete-x.toml").exists()


async def test_export_proposes_a_path_in_the_users_documents_or_home(make_app, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_persona(pilot, "Tester")
        await pilot.press("f5")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportCardScreen), what="the export dialog")
        assert app.screen.query_one("#export-path").value == str(home / "Documents" / "tester.json")


async def test_at_80_columns_the_sidebar_narrows_and_tab_names_fit(make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        for name in ("Tester", "Other", "Longwinded"):
            await open_persona(pilot, name)
        screen = app.chat_screen
        assert screen.query_one("#sidebar").outer_size.width <= 24
        from textual.widgets import Tab

        for tab in screen.tabs.query(Tab):
            assert tab.region.right <= 80 and str(tab.label) in ("Tester", "Other", "Longwinded")
            assert tab.region.width >= len(str(tab.label))


# -- scenes --------------------------------------------------------------------------------------

CHEF = ('id = "chef"\nname = "Chef Nonna Rosa"\ndescription = "Cooks."\ncolor = "#c04040"\n\n'
        '[sampling]\ntemperature = 0.7\nmax_tokens = 4\n')


async def test_scene_handles_ticks_and_a_message_kept_while_a_round_runs(make_app, personas_dir):
    from tests.test_ui_scene import create_scene, play

    (personas_dir / "chef.toml").write_text(CHEF, encoding="utf-8")
    app = make_app()
    said = []
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Kitchen", ["chef", "tester", "long"])
        final = await play(pilot, tab, "@Nonna what is for dinner?")
        assert final.speakers == ("chef",) and tab.message_views()[0].text == "what is for dinner?"
        final = await play(pilot, tab, "@Chef Nonna Rosa @tester, go on")
        assert final.speakers == ("chef", "tester") and tab.message_views()[-3].text == "go on"
        # ticked and unticked members look different
        box = tab.query_one("#speaker-1")
        ticked = box.label.markup
        tab.toggle_speaker("tester")
        await pilot.pause()
        assert tab.ticked() == ["chef", "long"]
        assert "strike" in box.label.markup and "strike" not in ticked
        assert not box.has_class("-on")
        # a message sent while the round runs stays in the box, and the user is told so
        app.notify = lambda text, **kw: said.append(text)
        tab.composer.text = "@longwinded talk"
        await pilot.press("enter")
        await wait_for(pilot, lambda: tab.generating, what="the round")
        tab.composer.text = "wait for me"
        await pilot.press("enter")
        assert tab.composer.text == "wait for me"
        assert any("stays in the box" in s for s in said), said
        app.submit(cmd.Cancel())
        await wait_for(pilot, lambda: not tab.generating, timeout=30, what="the stop")
