"""Pilot tests: the real app on the tiny random-weight model, driven by keys and the mouse."""

from __future__ import annotations

import json

import pytest

from app.engine import events as ev
from app.ui.app import DARK, LIGHT, ParleyApp
from app.ui.screens import (TAB_PREFIX, ConversationsScreen, HelpScreen, ImportCardScreen, PersonaEditorScreen)
from app.ui.widgets import ChatPane, MessageView, PersonaList
from tests.test_ui_helpers import events_of, palette_offers, ui_caught_up, wait_for

pytestmark = pytest.mark.asyncio
SIZE = (120, 40)


async def open_persona(pilot, name: str, type_it: bool = False) -> ChatPane:
    """Filter the persona list (typed key by key, or pasted) and press enter, as a user would."""
    app = pilot.app
    await pilot.press("ctrl+f")
    box = app.chat_screen.query_one("#persona-filter")
    box.value = ""
    if type_it:
        await pilot.press(*name.lower())
    else:
        box.value = name.lower()
    await pilot.press("enter")
    await wait_for(pilot, lambda: (p := app.chat_screen.active_pane()) is not None and p.persona.name == name,
                   what=f"the {name} tab")
    return app.chat_screen.active_pane()


def replies(app, conversation_id: int) -> list[ev.ReplyFinished]:
    return [e for e in events_of(app, ev.ReplyFinished) if e.conversation_id == conversation_id]


async def send(pilot, pane: ChatPane, text: str, type_it: bool = False) -> ev.ReplyFinished:
    """Send a message (typed key by key, or pasted into the box) and wait for the finished reply."""
    before = len(replies(pilot.app, pane.conversation_id))
    pane.composer.focus()
    if type_it:
        await pilot.press(*text)
    else:
        pane.composer.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(replies(pilot.app, pane.conversation_id)) > before and not pane.generating
                   and ui_caught_up(pilot.app), what="the reply")
    return replies(pilot.app, pane.conversation_id)[-1]


async def test_open_send_stream_and_finish_with_stats(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester", type_it=True)
        assert pane.query(".greeting"), "the persona's greeting opens the chat"
        finished = await send(pilot, pane, "hello there", type_it=True)
        streamed = [e for e in events_of(app, ev.TokensGenerated) if e.conversation_id == pane.conversation_id]
        # the deltas add up to the saved reply (an empty one, bytes that are no UTF-8 text, streams nothing)
        assert finished.stats.generated_tokens > 0 and (streamed or not finished.text)
        assert "".join(e.text for e in streamed) == finished.text
        views = pane.message_views()
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[0].text == "hello there" and views[0].message_id is not None
        assert views[1].text == finished.text and views[1].message_id == finished.message_id
        assert "ttft" in views[1].stats and "prefilled" in views[1].stats and "tok/s" in views[1].stats
        assert "cache none" in views[1].stats
        path = app.catalog.current_path(pane.conversation_id)
        assert [m.role for m in path] == ["user", "assistant"]
        await wait_for(pilot, lambda: app.chat_screen.query_one(PersonaList).cache_of("tester").where == "ram",
                       what="the sidebar to show the cache in RAM")
        assert app.chat_screen.query_one("#ram").used > 0


async def test_switch_tabs_with_keys_and_mouse(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        tester = await open_persona(pilot, "Tester")
        other = await open_persona(pilot, "Other")
        screen = app.chat_screen
        assert screen.active_pane() is other
        await pilot.press("ctrl+pageup")
        assert screen.active_pane() is tester
        await pilot.press("ctrl+pagedown")
        assert screen.active_pane() is other
        await pilot.press("alt+1")
        assert screen.active_pane() is tester
        await pilot.click(f"#--content-tab-{TAB_PREFIX}other")
        await pilot.pause()
        assert screen.active_pane() is other
        opened = {e.conversation_id for e in events_of(app, ev.ConversationOpened)}
        await wait_for(pilot, lambda: {tester.conversation_id, other.conversation_id}
                       <= {e.conversation_id for e in events_of(app, ev.ConversationOpened)},
                         what="both conversations opened")
        assert opened is not None
        # sending in one tab leaves the other alone
        await send(pilot, other, "hi")
        assert tester.message_views() == []


async def test_regenerate_and_browse_alternatives(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        first = await send(pilot, pane, "tell me")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(replies(app, pane.conversation_id)) == 2 and not pane.generating
                       and ui_caught_up(app), what="the regenerated reply")
        second = replies(app, pane.conversation_id)[-1]
        assert second.message_id != first.message_id
        reply = pane.message_views()[-1]
        assert reply.message_id == second.message_id and reply.alternatives == (2, 2)
        # select the reply (up from the empty message box) and browse back to the first one
        pane.composer.focus()
        await pilot.press("up")
        assert app.focused is reply
        await pilot.press("left")
        await wait_for(pilot, lambda: pane.message_views()[-1].message_id == first.message_id and ui_caught_up(app),
                       what="the first alternative")
        reply = pane.message_views()[-1]
        assert reply.message_id == first.message_id and reply.alternatives == (1, 2)
        assert reply.text == first.text
        assert app.catalog.get_conversation(pane.conversation_id).leaf_id == first.message_id
        await pilot.press("right")
        await wait_for(pilot, lambda: pane.message_views()[-1].message_id == second.message_id and ui_caught_up(app),
                       what="the second alternative")
        # copy the selected reply
        assert app.focused is pane.message_views()[-1]
        await pilot.press("c")
        assert app.clipboard == second.text


async def test_edit_a_past_message_and_resend(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "first question")
        await send(pilot, pane, "second question")
        pane.composer.focus()
        await pilot.press("up", "up", "up")  # reply 2, question 2, reply 1
        await pilot.press("up")  # question 1
        target = app.focused
        assert isinstance(target, MessageView) and target.text == "first question"
        await pilot.press("e")
        assert pane.editing == target.message_id and target.has_class("editing")
        assert pane.composer.text == "first question"
        pane.composer.text = "an edited question"
        before = len(replies(app, pane.conversation_id))
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(replies(app, pane.conversation_id)) > before and not pane.generating
                       and ui_caught_up(app), what="the reply to the edit")
        views = pane.message_views()
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[0].text == "an edited question" and views[0].alternatives == (2, 2)
        path = app.catalog.current_path(pane.conversation_id)
        assert [m.content for m in path][0] == "an edited question"
        # the old branch is still there: browse back to it
        views[0].focus()
        await pilot.press("left")
        await wait_for(pilot, lambda: len(pane.message_views()) == 4 and ui_caught_up(app), what="the old branch")
        assert [v.text for v in pane.message_views() if v.role == "user"] == ["first question", "second question"]


async def test_escape_stops_a_reply(make_app, monkeypatch):
    # The reply must still run when escape arrives on a loaded machine: the fused C step decodes the tiny model's
    # 1,500 tokens in about a second, so this test keeps the per-module path (several times slower).
    monkeypatch.setenv("PARLEY_FUSED_STEP", "0")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Longwinded")
        pane.composer.focus()
        await pilot.press(*"go on", "enter")
        await wait_for(pilot, lambda: len([e for e in events_of(app, ev.TokensGenerated)
                                             if e.conversation_id == pane.conversation_id]) >= 3,
                         what="the reply to start streaming")
        assert pane.generating
        await pilot.press("escape")
        await wait_for(pilot, lambda: replies(app, pane.conversation_id) and not pane.generating and ui_caught_up(app),
                       timeout=10, what="the reply to stop")
        finished = replies(app, pane.conversation_id)[-1]
        assert finished.cancelled
        assert finished.stats.generated_tokens < 1500
        reply = pane.message_views()[-1]
        assert reply.role == "assistant" and "stopped" in reply.stats
        assert app.catalog.current_path(pane.conversation_id)[-1].meta.get("cancelled") is True
        # the app goes on: the next message is answered
        assert not pane.generating


async def test_restart_resumes_the_conversation_from_disk(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        finished = await send(pilot, pane, "remember me")
        conversation_id = pane.conversation_id
    again = make_app()
    async with again.run_test(size=SIZE) as pilot:
        # the tab comes back by itself (the last run left it open); the palette goes to it all the same
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"chat with tester")
        await wait_for(pilot, lambda: palette_offers(again, "chat with tester"), what="the palette to offer the chat")
        await pilot.press("enter")
        await wait_for(pilot, lambda: again.chat_screen.active_pane() is not None, what="the Tester tab")
        pane = again.chat_screen.active_pane()
        assert pane.persona.id == "tester" and pane.conversation_id == conversation_id
        assert [v.text for v in pane.message_views()] == ["remember me", finished.text]
        await wait_for(pilot, lambda: pane.cache_source != "", what="the conversation to open")
        assert pane.cache_source == "disk"
        assert pane.cache_tokens > 0
        await wait_for(pilot, lambda: "read from disk in" in str(pane.query_one(".chat-header").render()),
                       what="the header to say where the cache came from")
        second = await send(pilot, pane, "and again")
        assert second.stats.reused_tokens > 0
    # a third start: moving the list's cursor onto the persona prefetches its conversation into RAM
    # (without the tab coming back from the last run: that would open it at once)
    from app.ui import tab_state
    tab_state.state_path().unlink()
    third = make_app()
    async with third.run_test(size=SIZE) as pilot:
        persona_list = third.chat_screen.query_one(PersonaList)
        await wait_for(pilot, lambda: persona_list.cache_of("tester").where == "disk", what="the cache on disk")
        third.chat_screen.query_one("#persona-filter").value = "test"
        await wait_for(pilot, lambda: persona_list.cache_of("tester").where == "ram", what="the prefetch")
        assert third.chat_screen.active_pane() is None


async def test_new_conversation_list_reopen_and_delete(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "the old one")
        old = pane.conversation_id
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: pane.conversation_id != old and ui_caught_up(app), what="the new conversation")
        assert pane.message_views() == []
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen) and ui_caught_up(app),
                       what="the conversations list")
        listed = app.screen.query_one("#conversation-list")
        assert listed.option_count == 2
        # the newest is first; go to the old one and reopen it
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: pane.conversation_id == old and ui_caught_up(app), what="the old conversation")
        assert [v.text for v in pane.message_views()][0] == "the old one"
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen) and ui_caught_up(app),
                       what="the conversations list")
        await pilot.press("down", "d", "y")
        await wait_for(pilot, lambda: app.screen.query_one("#conversation-list").option_count == 1
                       and ui_caught_up(app), what="the list without the deleted one")
        assert app.catalog.get_conversation(old) is None
        await pilot.press("escape")
        await wait_for(pilot, lambda: pane.conversation_id != old and ui_caught_up(app), what="another conversation")


async def test_persona_editor_creates_and_edits(make_app, personas_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        assert isinstance(app.screen, PersonaEditorScreen)
        await pilot.press(*"Ship Cook")
        app.screen.query_one("#ed-system").text = "You cook for the crew."
        app.screen.query_one("#ed-max-tokens").value = "8"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.chat_screen.active_pane() is not None and ui_caught_up(app),
                       what="the new persona's tab")
        assert not isinstance(app.screen, PersonaEditorScreen)
        saved = personas_dir / "ship-cook.toml"
        assert saved.exists() and "You cook for the crew." in saved.read_text()
        assert "ship-cook" in app.personas
        pane = app.chat_screen.active_pane()
        assert pane.persona.id == "ship-cook"
        await send(pilot, pane, "what is for dinner")
        # edit it: a bad colour is refused, naming the field; a good one is saved
        await pilot.press("f2")
        await pilot.pause()
        editor = app.screen
        assert isinstance(editor, PersonaEditorScreen) and editor.persona.id == "ship-cook"
        editor.query_one("#ed-color").value = "blue"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "color" in str(editor.query_one("#ed-error").render())
        editor.query_one("#ed-color").value = "#112233"
        editor.query_one("#ed-description").value = "Feeds everyone."
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.personas["ship-cook"].color == "#112233"
        assert app.personas["ship-cook"].description == "Feeds everyone."
        # a new greeting shows at the top of the open chat
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#ed-greetings").text = "Soup is on!"
        await pilot.press("ctrl+s")
        await pilot.pause()
        greeting = pane.query(".greeting").first()
        assert greeting.text == "Soup is on!" and pane.transcript.children[0] is greeting


async def test_export_and_import_a_character_card(make_app, tmp_path):
    app = make_app()
    card = tmp_path / "tester-card.json"
    async with app.run_test(size=SIZE) as pilot:
        await open_persona(pilot, "Tester")
        await pilot.press("f5")
        await pilot.pause()
        app.screen.query_one("#export-path").value = str(card)
        await pilot.press("enter")
        await pilot.pause()
        data = json.loads(card.read_text())
        assert data["spec"] == "chara_card_v2" and data["data"]["name"] == "Tester"
        await pilot.press("f4")
        await pilot.pause()
        assert isinstance(app.screen, ImportCardScreen)
        app.screen.query_one("#card-path").value = str(tmp_path / "missing.json")
        await pilot.press("enter")
        await pilot.pause()
        assert "missing.json" in str(app.screen.query_one("#card-error").render())
        app.screen.query_one("#card-path").value = str(card)
        await pilot.press("enter")
        await pilot.pause()
        imported = [p for p in app.personas.values() if p.id not in ("tester", "other", "long")]
        assert len(imported) == 1 and imported[0].name == "Tester"
        assert app.chat_screen.active_pane().persona.id == imported[0].id


async def test_help_theme_filter_and_palette(make_app):
    app = make_app(theme=DARK)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await pilot.press(*"long")
        assert screen.query_one(PersonaList).visible_ids() == ["long"]
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is screen
        # the message box: ctrl+j (or shift+enter) starts a new line, enter would send
        pane = await open_persona(pilot, "Tester")
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert pane.composer.text == "a\nb\nc" and pane.message_views() == []
        pane.composer.text = ""
        await pilot.press("ctrl+b")
        assert not screen.query_one("#sidebar").display and app.focused is pane.composer
        await pilot.press("ctrl+b")
        assert screen.query_one("#sidebar").display
        await pilot.press("ctrl+t")
        assert app.theme == LIGHT
        await pilot.press("ctrl+t")
        assert app.theme == DARK
        # every action is in the command palette
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"new persona")
        await wait_for(pilot, lambda: palette_offers(app, "new persona"), what="the palette to offer a new persona")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PersonaEditorScreen), what="the persona editor")


async def test_engine_failure_is_a_notification(tiny_model_dir, personas_dir, tmp_path):
    app = ParleyApp(model=str(tmp_path / "no-such-model"), personas_dirs=[personas_dir])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.EngineFailed) and ui_caught_up(app), what="the engine to fail")
        assert any(n.severity == "error" for n in app._notifications)
        assert app.chat_screen.has_class("-failed")
        assert "no-such-model" in str(app.chat_screen.query_one("#model-label").render())


async def test_progress_bars_for_model_preparation_and_long_prefills(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded) and ui_caught_up(app), what="the model")
        assert not screen.query_one("#model-progress").display or not screen.has_class("-loading")
        # first-run preparation reports progress through the same path as the engine thread
        app._engine_event(ev.ModelLoadProgressed(3, 10, "converting the model"))
        await wait_for(pilot, lambda: screen.has_class("-loading"), what="the model bar")
        bar = screen.query_one("#model-bar")
        assert bar.total == 10 and bar.progress == 3
        assert "converting the model" in str(screen.query_one("#model-label").render())
        app._engine_event(ev.ModelLoaded("tiny", "f" * 64, 2048, "cpu"))
        await wait_for(pilot, lambda: not screen.has_class("-loading"), what="the model bar to go")
        # a long message: the prefill reports progress, the pane shows a bar, then the reply streams
        pane = await open_persona(pilot, "Tester")
        long_text = " ".join(f"word{i}" for i in range(100))
        await send(pilot, pane, long_text)
        progressed = [e for e in events_of(app, ev.PrefillProgressed) if e.conversation_id == pane.conversation_id]
        assert progressed and progressed[-1].done == progressed[-1].total
        prefill_bar = pane.query_one(".prefill-bar")
        assert prefill_bar.total == progressed[-1].total
        assert not pane.has_class("-prefilling")
        # a message too long for the context window: the engine refuses, the app says so and keeps the text
        too_long = " ".join(f"word{i}" for i in range(400))
        pane.composer.text = too_long
        await pilot.press("enter")
        await wait_for(pilot, lambda: events_of(app, ev.EngineFailed), what="the refusal")
        await wait_for(pilot, lambda: not pane.generating and ui_caught_up(app), what="the pane to settle")
        assert pane.composer.text == too_long
        assert any("context window" in n.message for n in app._notifications)
        assert [v.role for v in pane.message_views()] == ["user", "assistant"]


async def test_cache_discarded_and_trimmed_context_are_notified(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        app._engine_event(ev.CacheDiscarded(1, "checksum mismatch"))
        app._engine_event(ev.ContextTrimmed(1, 4))
        await wait_for(pilot, lambda: len(app._notifications) >= 2, what="the notifications")
        texts = " ".join(n.message for n in app._notifications)
        assert "checksum mismatch" in texts and "4 oldest" in texts
