"""Catalog reads stay off the UI thread, and a late answer never overwrites a newer one (app.ui.catalog_reads).

The first test records the thread of every catalog read while a user goes through the app (chats, alternatives,
the lists, the palette, a scene, notes, a restart that brings the tabs back): none may run on the main thread,
which is the one Textual's event loop runs on. The others hold a transcript read on its worker thread until a
newer read (or another conversation) has been shown, then let it answer: it must change nothing.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from app.catalog import store
from app.ui.notes import NotesScreen
from app.ui.screens import ConversationsScreen, ScenesScreen
from app.ui.widgets import conversation_tab
from tests.test_ui import SIZE, open_persona, send
from tests.test_ui_helpers import palette_offers, ui_caught_up, wait_for
from tests.test_ui_scene import create_scene, play

pytestmark = pytest.mark.asyncio

_writing = threading.local()


@contextmanager
def reads_on_ui_thread(monkeypatch):
    """Record the catalog's reads that run on the main thread (the UI thread), except those inside a write
    (a write reads the rows it changes; writes may stay on the UI thread when quick). Yields the list."""
    seen: list[str] = []
    rows, transaction = store.Catalog._rows, store.Catalog.transaction

    def recording_rows(self, sql, params=()):
        if threading.current_thread() is threading.main_thread() and not getattr(_writing, "depth", 0):
            seen.append(sql.split("\n")[0][:80])
        return rows(self, sql, params)

    @contextmanager
    def recording_transaction(self):
        _writing.depth = getattr(_writing, "depth", 0) + 1
        try:
            with transaction(self) as tx:
                yield tx
        finally:
            _writing.depth -= 1

    monkeypatch.setattr(store.Catalog, "_rows", recording_rows)
    monkeypatch.setattr(store.Catalog, "transaction", recording_transaction)
    yield seen


async def test_no_catalog_read_runs_on_the_ui_thread(make_app, monkeypatch):
    app = make_app()
    with reads_on_ui_thread(monkeypatch) as seen:
        async with app.run_test(size=SIZE) as pilot:
            pane = await open_persona(pilot, "Tester")  # the latest conversation, then its transcript
            await send(pilot, pane, "hello")  # reloads when the message and the reply are saved
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: len(pane.message_views()) == 2 and pane.message_views()[-1].alternatives
                           == (2, 2) and not pane.generating and ui_caught_up(app), what="the regenerated reply")
            pane.message_views()[-1].focus()
            await pilot.press("left")  # browse: the alternatives and the branch's leaf
            await wait_for(pilot, lambda: pane.message_views()[-1].alternatives == (1, 2) and ui_caught_up(app),
                           what="the first alternative")
            await pilot.press("ctrl+n")  # is this conversation empty? (a message count)
            await wait_for(pilot, lambda: not pane.message_views() and ui_caught_up(app), what="a new conversation")
            await pilot.press("ctrl+o")  # the list with message counts
            await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen) and ui_caught_up(app)
                           and app.screen.query_one("#conversation-list").option_count == 2, what="the list")
            await pilot.press("down", "enter")  # reopen: the conversation's row
            await wait_for(pilot, lambda: len(pane.message_views()) == 2 and ui_caught_up(app), what="the old one")
            await app.chat_screen.run_action("notes")
            await wait_for(pilot, lambda: isinstance(app.screen, NotesScreen), what="the notes")
            await pilot.press("escape")
            tab = await create_scene(pilot, "Tea", ["tester", "other"])  # the name is checked against the scenes
            await play(pilot, tab, "tea?")  # the scene's transcript and its lore
            await pilot.press("f9")
            await wait_for(pilot, lambda: isinstance(app.screen, ScenesScreen) and ui_caught_up(app), what="scenes")
            await pilot.press("escape")
            await pilot.press("ctrl+p")  # the palette lists the scenes
            await pilot.press(*"scene: tea")
            await wait_for(pilot, lambda: palette_offers(app, "scene: tea"), what="the palette")
            await pilot.press("escape")
            app.chat_screen.query_one("#persona-filter").value = "oth"  # a highlight prefetches (the latest chat)
            await wait_for(pilot, lambda: ui_caught_up(app), what="the screen")
        again = make_app()
        async with again.run_test(size=SIZE) as pilot:  # the tabs come back: their conversations' rows
            await wait_for(pilot, lambda: len(again.chat_screen.pane_ids()) == 2 and again.chat_screen.scenes()
                           and ui_caught_up(again), what="the tabs of the last run")
    assert seen == []


def hold_first_read(monkeypatch):
    """The next transcript read reads the catalog, then waits on its worker thread until `release` is set."""
    real = conversation_tab.read_transcript
    held, release, done = [], threading.Event(), threading.Event()

    def read(catalog, conversation_id, shown, details_of):
        result = real(catalog, conversation_id, shown, details_of)
        if not held:
            held.append(conversation_id)
            release.wait(30)
            done.set()
        return result

    monkeypatch.setattr(conversation_tab, "read_transcript", read)
    return held, release, done


async def test_an_older_transcript_read_that_answers_last_is_not_shown(make_app, monkeypatch):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        said = await send(pilot, pane, "one")
        shown = [v.text for v in pane.message_views()]  # the question and its reply
        answered_before = pane.transcript_answers
        held, release, done = hold_first_read(monkeypatch)
        app.catalog.add_message(pane.conversation_id, "user", "two")  # another window goes on...
        pane.reload()  # this read sees "two", then is held
        await wait_for(pilot, lambda: held, what="the first read")
        app.catalog.set_leaf(pane.conversation_id, said.message_id)  # ...and goes back to the reply
        pane.reload()
        await wait_for(pilot, lambda: pane.transcript_answers == 1 + answered_before, what="the newer read")
        assert [v.text for v in pane.message_views()] == shown
        answered, dropped = pane.transcript_answers, pane.stale_reads
        release.set()
        await wait_for(pilot, lambda: done.is_set() and pane.transcript_answers > answered,
                       what="the older read's answer")
        assert [v.text for v in pane.message_views()] == shown  # not "two" from the older read
        assert pane.stale_reads == dropped + 1
        assert not pane.transcript_pending


async def test_a_transcript_read_for_a_conversation_left_is_not_shown(make_app, monkeypatch):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "in the first conversation")
        first = pane.conversation_id
        second = app.catalog.create_conversation("tester")
        app.catalog.add_message(second, "user", "in the second conversation")
        held, release, done = hold_first_read(monkeypatch)
        pane.reload(then=lambda: pane.add_class("-first-applied"))  # held; its follow-up must not run either
        await wait_for(pilot, lambda: held == [first], what="the first conversation's read")
        await app.chat_screen.open_persona("tester", conversation_id=second)
        await wait_for(pilot, lambda: [v.text for v in pane.message_views()] == ["in the second conversation"],
                       what="the second conversation")
        answered, dropped = pane.transcript_answers, pane.stale_reads
        release.set()
        await wait_for(pilot, lambda: done.is_set() and pane.transcript_answers > answered,
                       what="the first read's answer")
        assert pane.conversation_id == second
        assert [v.text for v in pane.message_views()] == ["in the second conversation"]
        assert pane.stale_reads == dropped + 1
        assert not pane.has_class("-first-applied")


async def test_a_reply_begun_while_the_transcript_was_read_stays_last(make_app, monkeypatch):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        said = await send(pilot, pane, "one")
        shown = [v.text for v in pane.message_views()]
        held, release, done = hold_first_read(monkeypatch)
        app.catalog.add_message(pane.conversation_id, "user", "two", parent_id=said.message_id)  # another window
        answered = pane.transcript_answers
        pane.reload()  # reads "two", then is held
        await wait_for(pilot, lambda: held, what="the read")
        await pane._start_reply("three")  # the user sends meanwhile: a new question and its streaming bubble
        release.set()
        await wait_for(pilot, lambda: done.is_set() and pane.transcript_answers > answered, what="the read's answer")
        assert [v.text for v in pane.message_views()] == shown + ["two", "three"]
        assert pane.transcript.children[-1] is pane.streaming_view()


async def test_a_read_asked_for_while_another_is_applied_finishes_the_work_alone(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_persona(pilot, "Tester")
        await send(pilot, pane, "one")
        app.catalog.add_message(pane.conversation_id, "user", "another start", parent_id=None)  # another window
        first = pane.message_views()[0]
        remove = first.remove

        def engine_event_between_two_awaits():  # as a reply's end would: a newer read while this one is applied
            pane.reload()
            return remove()

        first.remove = engine_event_between_two_awaits
        pane.reload()
        await wait_for(pilot, lambda: ui_caught_up(app) and pane.transcript_answers >= 2, what="both reads")
        assert [v.text for v in pane.message_views()] == ["another start"]
