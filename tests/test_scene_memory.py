"""Scenes get the same memory: each speaker's own lorebook, notes per seat, your name in the room."""

from __future__ import annotations

import pytest

from app.catalog import Catalog
from app.catalog.notes import conversation_notes
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.scene import scene_view
from tests.engine_helpers import EngineRunner, write_persona

LORE = '''
[lorebook]
[[lorebook.entries]]
name = "Moon"
keys = ["moon"]
content = "The moon here is red."
'''


def folder_with_lore(tmp_path):
    folder = tmp_path / "personas"
    write_persona(folder, "ann", max_tokens=8)
    write_persona(folder, "bob", max_tokens=8)
    with open(folder / "ann.toml", "a") as f:
        f.write(LORE)
    return folder


def new_scene(members=("ann", "bob")) -> int:
    with Catalog() as catalog:
        return catalog.create_conversation(None, kind="scene", title="Room", members=list(members))


def play(runner, command, timeout=120.0):
    start = len(runner.seen)
    runner.engine.submit(command)
    final = runner.until((ev.SceneRoundFinished, ev.EngineFailed), timeout)
    events = runner.seen[start:]
    assert isinstance(final, ev.SceneRoundFinished), final
    return {e.persona_id: e for e in events if isinstance(e, ev.SceneReplyFinished)}, events


def test_each_speaker_gets_its_own_lorebook_entries_at_the_end_of_its_view(tiny_model_dir, tmp_path):
    runner = EngineRunner(tiny_model_dir, folder_with_lore(tmp_path))
    try:
        sid = new_scene()
        first, events = play(runner, cmd.SceneRound(sid, "Look, the moon"))
        added = [e for e in events if isinstance(e, ev.LoreAdded)]
        assert [(e.speaker, e.entries) for e in added] == [("ann", ("Moon",))]
        with Catalog() as catalog:
            path = catalog.current_path(sid)
        names = {"ann": "Ann", "bob": "Bob"}
        assert any(line.get("lore") == "The moon here is red." for line in scene_view(path, "ann", names))
        assert not any(line.get("lore") for line in scene_view(path, "bob", names))
        second, events = play(runner, cmd.SceneRound(sid, "And now?"))
        assert not any(isinstance(e, ev.LoreAdded) for e in events)  # already in ann's view
        s1, s2 = first["ann"].stats, second["ann"].stats
        assert s2.reused_tokens >= s1.reused_tokens + s1.prefilled_tokens + s1.generated_tokens - 1
    finally:
        runner.close()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from app.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("scene-small"), context=2048, seed=1)


def test_each_seat_keeps_its_own_notes_when_the_room_outgrows_the_window(small_model, tmp_path):
    runner = EngineRunner(small_model, folder_with_lore(tmp_path))
    try:
        sid = new_scene()
        for r in range(60):
            _, events = play(runner, cmd.SceneRound(sid, f"round {r}: " + " ".join(f"w{r}x{i}" for i in range(10))))
            if any(isinstance(e, ev.ContextTrimmed) for e in events):
                break
        else:
            raise AssertionError("the scene never outgrew the window")
        assert sum(isinstance(e, ev.NotesWritten) for e in events) == 2  # one per seat
        with Catalog() as catalog:
            notes = {pid: conversation_notes(catalog, sid, pid) for pid in ("ann", "bob")}
        assert all(notes.values()) and conversation_notes(Catalog(), sid) == ""
        after, events = play(runner, cmd.SceneRound(sid, "after"))
        assert not any(isinstance(e, ev.ContextTrimmed) for e in events)
        for pid in ("ann", "bob"):
            assert after[pid].stats.reused_tokens > after[pid].stats.prefilled_tokens
    finally:
        runner.close()


def test_the_room_calls_you_by_your_name(tiny_model_dir, tmp_path):
    """scene_view names your lines with the name the engine passes for the seat (effective_user of its persona)."""
    from app.cli import main
    from app.personas import load_personas
    from app.personas.user import effective_user

    main(["user", "--name", "Robin"])
    runner = EngineRunner(tiny_model_dir, folder_with_lore(tmp_path))
    try:
        sid = new_scene()
        play(runner, cmd.SceneRound(sid, "hello"))
    finally:
        runner.close()
    persona = load_personas([tmp_path / "personas"]).personas["ann"]
    with Catalog() as catalog:
        path = catalog.current_path(sid)
    assert scene_view(path, "ann", {None: effective_user(persona).name})[0]["content"] == "Robin: hello"
    assert scene_view(path, "ann", {})[0]["content"] == "User: hello"
