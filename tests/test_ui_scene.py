"""Pilot tests of scenes in the app, on the tiny model: create, rounds streaming every speaker, pick who
replies, go on without the user, cancel, restart and resume from disk."""

from __future__ import annotations


import pytest

from app.engine import events as ev
from app.ui.screens import NewSceneScreen, ScenesScreen
from app.ui.widgets import SceneLine, SceneTab
from tests.test_ui_helpers import events_of, palette_offers, ui_caught_up, wait_for

pytestmark = pytest.mark.asyncio
SIZE = (120, 40)


def rounds(app, conversation_id: int) -> list[ev.SceneRoundFinished]:
    return [e for e in events_of(app, ev.SceneRoundFinished) if e.conversation_id == conversation_id]


def scene_replies(app, conversation_id: int) -> list[ev.SceneReplyFinished]:
    return [e for e in events_of(app, ev.SceneReplyFinished) if e.conversation_id == conversation_id]


async def create_scene(pilot, name: str, picks: list[str]) -> SceneTab:
    """F8, type the name, tab to the list and pick personas with space (the list is sorted by name)."""
    app = pilot.app
    await pilot.press("f8")
    await wait_for(pilot, lambda: isinstance(app.screen, NewSceneScreen), what="the new-scene dialog")
    await pilot.press(*name, "tab")
    listed = app.screen.query_one("#scene-members")
    order = [listed.get_option_at_index(i).value for i in range(listed.option_count)]
    for pid in picks:
        listed.highlighted = order.index(pid)
        await pilot.press("space")
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: app.chat_screen.active_scene() is not None, what="the scene tab")
    return app.chat_screen.active_scene()


async def play(pilot, tab: SceneTab, text: str) -> ev.SceneRoundFinished:
    before = len(rounds(pilot.app, tab.conversation_id))
    tab.composer.focus()
    tab.composer.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(rounds(pilot.app, tab.conversation_id)) > before and not tab.generating
                   and ui_caught_up(pilot.app), timeout=30, what="the round")
    return rounds(pilot.app, tab.conversation_id)[-1]


async def test_create_a_scene_and_every_speaker_streams_into_its_own_bubble(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        # too few personas: the dialog says so and stays
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, NewSceneScreen), what="the dialog")
        await pilot.press(*"Lonely", "ctrl+s")
        assert isinstance(app.screen, NewSceneScreen)
        assert "2 to 6" in str(app.screen.query_one("#scene-error").render())
        await pilot.press("escape")
        tab = await create_scene(pilot, "Room", ["tester", "other"])
        conv = app.catalog.get_conversation(tab.conversation_id)
        assert conv.kind == "scene" and conv.title == "Room" and conv.members == ("tester", "other")
        assert tab.ticked() == ["tester", "other"]
        assert "Tester" in str(tab.query_one(".chat-header").render())
        final = await play(pilot, tab, "hello both")
        assert not final.cancelled and final.speakers == ("tester", "other") and final.batch_tps > 0
        finished = {e.persona_id: e for e in scene_replies(app, tab.conversation_id)}
        for pid in ("tester", "other"):
            streamed = [e.text for e in events_of(app, ev.SceneTokensGenerated)
                        if e.conversation_id == tab.conversation_id and e.persona_id == pid]
            # each speaker's deltas add up to exactly its saved reply: all of a reply's text streams before it is saved.
            # (The random tiny model, sampling at 0.7, now and then says only bytes that are no UTF-8 text:
            # that reply is empty and streams nothing, tests/test_model.py::test_text_stream_deltas_add_up...)
            assert finished[pid].stats.generated_tokens > 0
            assert "".join(streamed) == finished[pid].text and all(streamed)
        views = tab.message_views()
        assert [(v.role, v.persona_id) for v in views] == [("user", None), ("assistant", "tester"),
                                                           ("assistant", "other")]
        assert views[0].text == "hello both" and views[0].message_id is not None
        for view in views[1:]:
            reply = finished[view.persona_id]
            assert view.text == reply.text and view.message_id == reply.message_id
            assert view.speaker == app.personas[view.persona_id].name
            assert view.color == app.personas[view.persona_id].color
            assert "ttft" in view.stats and "tok/s" in view.stats
            head = view.query_one(".msg-head").render()
            assert str(head).startswith(view.speaker)
        assert "You" in str(views[0].query_one(".msg-head").render())
        assert "batch" in str(tab.query_one(".round-stats").render())
        assert "batch" in str(tab.query_one(".chat-header").render())
        path = app.catalog.current_path(tab.conversation_id)
        assert [(m.role, m.persona_id) for m in path] == [("user", None), ("assistant", "tester"),
                                                          ("assistant", "other")]


async def test_pick_who_replies_and_go_on_without_the_user(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Pair", ["tester", "other"])
        # @name picks the speakers of this round only
        final = await play(pilot, tab, "@other only you please")
        assert final.speakers == ("other",)
        assert tab.message_views()[0].text == "only you please"
        # an unknown @name is refused; the text stays in the box
        tab.composer.text = "@nobody hi"
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("@nobody" in n.message for n in app._notifications), what="the refusal")
        assert tab.composer.text == "@nobody hi" and not tab.generating
        assert any("@nobody" in n.message for n in app._notifications)
        # untick Tester (tab from the box to the ticks, space toggles): only Other replies
        tab.composer.text = ""
        await pilot.click(f"#{tab.query_one('#speaker-0').id}")
        assert tab.ticked() == ["other"]
        final = await play(pilot, tab, "and now?")
        assert final.speakers == ("other",)
        await pilot.click("#speaker-0")
        assert tab.ticked() == ["tester", "other"]
        # an empty message: everyone goes on, no line of the user's
        users_before = [v for v in tab.message_views() if v.role == "user"]
        final = await play(pilot, tab, "")
        assert final.speakers == ("tester", "other")
        assert [v for v in tab.message_views() if v.role == "user"] == users_before
        path = app.catalog.current_path(tab.conversation_id)
        assert [m.persona_id for m in path[-2:]] == ["tester", "other"] and path[-3].persona_id == "other"


async def test_escape_cancels_a_round(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Talkers", ["long", "tester"])
        tab.composer.focus()
        await pilot.press(*"go", "enter")
        await wait_for(pilot, lambda: len([e for e in events_of(app, ev.SceneTokensGenerated)
                                             if e.persona_id == "long"]) >= 12, what="the round to stream")
        assert tab.generating and "long" in tab.live
        await pilot.press("escape")
        await wait_for(pilot, lambda: rounds(app, tab.conversation_id) and not tab.generating and ui_caught_up(app),
                       timeout=10, what="the round to stop")
        assert rounds(app, tab.conversation_id)[-1].cancelled
        long_reply = next(e for e in scene_replies(app, tab.conversation_id) if e.persona_id == "long")
        assert long_reply.cancelled and long_reply.stats.generated_tokens < 1500
        await wait_for(pilot, lambda: any(v.persona_id == "long" for v in tab.message_views()),
                       what="the stopped reply's view")
        view = next(v for v in tab.message_views() if v.persona_id == "long")
        assert "stopped" in view.stats and not tab.live
        assert "stopped" in str(tab.query_one(".round-stats").render())


async def test_restart_reopens_the_scene_and_reuses_caches_from_disk(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Kept", ["tester", "other"])
        await play(pilot, tab, "remember this room")
        scene_id = tab.conversation_id
        said = [(v.role, v.persona_id, v.text) for v in tab.message_views()]
    again = make_app()
    async with again.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(again, ev.ModelLoaded), what="the model")
        # the scene's tab comes back by itself (it was open when the app quit); the list reopens it all the same
        restored = again.chat_screen.active_scene()
        assert restored is not None and restored.conversation_id == scene_id
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(again.screen, ScenesScreen), what="the scenes list")
        assert again.screen.query_one("#scene-list").option_count == 1
        await pilot.press("enter")
        await wait_for(pilot, lambda: again.chat_screen.active_scene() is not None, what="the scene tab")
        tab = again.chat_screen.active_scene()
        assert tab.conversation_id == scene_id
        await wait_for(pilot, lambda: len(tab.message_views()) == 3, what="the transcript")
        assert [(v.role, v.persona_id, v.text) for v in tab.message_views()] == said
        assert all(isinstance(v, SceneLine) for v in tab.message_views())
        await wait_for(pilot, lambda: tab.caches == {"tester": "disk", "other": "disk"}, what="caches on disk")
        await play(pilot, tab, "still here?")
        second = {e.persona_id: e for e in scene_replies(again, scene_id)}
        assert set(second) == {"tester", "other"}
        for reply in second.values():
            assert reply.stats.cache == "disk" and reply.stats.reused_tokens > 0
        # the command palette lists the scene and closes with alt+w
        await pilot.press("alt+w")
        await pilot.pause()
        assert again.chat_screen.active_view() is None
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"scene: kept")
        await wait_for(pilot, lambda: palette_offers(again, "scene: kept"), what="the palette to offer the scene")
        await pilot.press("enter")
        await wait_for(pilot, lambda: again.chat_screen.active_scene() is not None
                       and again.screen is again.chat_screen, what="the scene from the palette")
        # deleting it from the list closes its tab
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(again.screen, ScenesScreen), what="the scenes list")
        await pilot.press("d", "y")
        await wait_for(pilot, lambda: again.chat_screen.active_scene() is None, what="the deleted scene's tab to close")
        assert again.catalog.get_conversation(scene_id) is None
        assert again.chat_screen.active_scene() is None


async def test_a_refused_round_gives_the_text_back(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: events_of(app, ev.ModelLoaded), what="the model")
        tab = await create_scene(pilot, "Crowd", ["tester", "other"])
        too_long = "@tester " + " ".join(f"word{i}" for i in range(400))
        tab.composer.text = too_long
        await pilot.press("enter")
        await wait_for(pilot, lambda: events_of(app, ev.EngineFailed), what="the refusal")
        await wait_for(pilot, lambda: not tab.generating, what="the tab to settle")
        assert tab.composer.text == too_long and not tab.live and tab.message_views() == []
        assert any("context window" in n.message for n in app._notifications)
