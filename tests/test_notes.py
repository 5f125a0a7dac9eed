"""Notes that outlive dropped turns (tiny model, small window): written from the cache, kept, extended, editable."""

from __future__ import annotations

import json
import sys

import pytest

from app.catalog import Catalog
from app.catalog.notes import conversation_notes, set_conversation_notes
from app.cli import main
from app.engine import commands as cmd
from app.engine import events as ev
from app.engine.notes import INSTRUCTION
from tests.engine_helpers import EngineRunner, write_persona

WINDOW = 2048  # room for the notes step (the tiny tokenizer spends ~170 tokens on its instruction)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from app.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("small-window"), context=WINDOW)


@pytest.fixture
def runner(small_model, tmp_path):
    folder = tmp_path / "personas"
    write_persona(folder, "tester")
    r = EngineRunner(small_model, folder)
    yield r
    r.close()


def new_conversation() -> int:
    with Catalog() as catalog:
        return catalog.create_conversation("tester")


def message(turn: int) -> str:
    return f"turn {turn}: " + " ".join(f"word{turn}x{i}" for i in range(12))


def chat_until_trimmed(runner, cid, first_turn=0, limit=40):
    for turn in range(first_turn, first_turn + limit):
        final, events = runner.run(cmd.Generate(cid, message(turn)))
        assert isinstance(final, ev.ReplyFinished), final
        if any(isinstance(e, ev.ContextTrimmed) for e in events):
            return turn, final, events
    raise AssertionError("the conversation never outgrew the window")


def turn_tokens(small_model, text: str) -> int:
    """Tokens a new user turn adds after a reply (its message and the reply's opening)."""
    from app.model.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer(small_model)
    head = [{"role": "system", "content": "x"}]
    return len(tok.encode_chat(head + [{"role": "user", "content": text}])) - len(tok.encode_chat(head, False)) + 1


def instruction_tokens(small_model) -> int:
    from app.model.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer(small_model)
    head = [{"role": "system", "content": "x"}]
    return len(tok.encode_chat(head + [{"role": "user", "content": INSTRUCTION}])) - len(tok.encode_chat(head, False))


def test_overflow_writes_notes_from_the_cache_then_turns_append_again(runner, small_model):
    cid = new_conversation()
    turn, final, events = chat_until_trimmed(runner, cid)
    kinds = [type(e) for e in events]
    assert ev.NotesWritten in kinds and kinds.index(ev.NotesWritten) < kinds.index(ev.ContextTrimmed)
    assert any(isinstance(e, ev.NotesProgressed) for e in events)
    written = next(e for e in events if isinstance(e, ev.NotesWritten))
    # the notes step reads the turns leaving from the cache: only the instruction is new
    assert written.reused_tokens > 300 and written.prefilled_tokens <= instruction_tokens(small_model) + 2
    with Catalog() as catalog:
        notes = conversation_notes(catalog, cid)
    assert notes and notes == written.text
    # the drop itself re-reads the half window that stays (as before); the next turns append again
    for extra in range(2):
        after, events = runner.run(cmd.Generate(cid, message(100 + extra)))
        assert not any(isinstance(e, (ev.ContextTrimmed, ev.NotesWritten)) for e in events)
        assert after.stats.reused_tokens > after.stats.prefilled_tokens
        assert after.stats.prefilled_tokens <= turn_tokens(small_model, message(100 + extra)) + 1
    # a second drop extends the notes
    _, _, events = chat_until_trimmed(runner, cid, first_turn=200)
    second = next(e for e in events if isinstance(e, ev.NotesWritten))
    with Catalog() as catalog:
        assert conversation_notes(catalog, cid) == f"{notes}\n{second.text}".strip()


def test_cancel_while_writing_notes_keeps_the_old_view(runner):
    cid = new_conversation()
    chat_until_trimmed(runner, cid)
    with Catalog() as catalog:
        set_conversation_notes(catalog, cid, "")
        start_before = catalog.query("SELECT start FROM context_starts WHERE conversation_id = ?", (cid,))[0]["start"]
    for turn in range(300, 340):  # until the next drop starts writing notes, then cancel it
        runner.engine.submit(cmd.Generate(cid, message(turn)))
        event = runner.until((ev.NotesProgressed, ev.ReplyFinished))
        if isinstance(event, ev.NotesProgressed):
            runner.engine.cancel()
            final = runner.until((ev.ReplyFinished, ev.EngineFailed))
            assert isinstance(final, ev.ReplyFinished) and final.cancelled and final.message_id == 0
            break
    else:
        raise AssertionError("no second drop")
    with Catalog() as catalog:
        assert conversation_notes(catalog, cid) == ""  # nothing half-written kept
        start = catalog.query("SELECT start FROM context_starts WHERE conversation_id = ?", (cid,))[0]["start"]
        assert start == start_before
    final, events = runner.run(cmd.Regenerate(cid))  # the drop happens again, with its notes
    assert isinstance(final, ev.ReplyFinished) and any(isinstance(e, ev.NotesWritten) for e in events)


def test_notes_cli_reads_sets_and_edits(parley_home, tmp_path, capsys, monkeypatch):
    with Catalog() as catalog:
        cid = catalog.create_conversation("tester")
        set_conversation_notes(catalog, cid, "Ada met the captain.")
    assert main(["notes", "tester"]) == 0
    assert capsys.readouterr().out.strip() == "Ada met the captain."
    assert main(["notes", "tester", "--set", "They sailed north.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"conversation": cid, "seat": None, "notes": "They sailed north."}
    script = tmp_path / "editor.py"
    script.write_text("import sys\np = sys.argv[1]\nopen(p, 'a').write(' Then a storm came.')\n")
    monkeypatch.setenv("VISUAL", f"{sys.executable} {script}")
    assert main(["notes", "--conversation", str(cid), "--edit"]) == 0
    with Catalog() as catalog:
        assert conversation_notes(catalog, cid) == "They sailed north. Then a storm came."
    assert main(["notes", "nobody"]) == 1
    assert "has no chat yet" in capsys.readouterr().err


def test_edited_notes_are_what_the_model_reads(runner, small_model):
    cid = new_conversation()
    chat_until_trimmed(runner, cid)
    with Catalog() as catalog:
        set_conversation_notes(catalog, cid, "The user's name is Robin.")
    final, _ = runner.run(cmd.Generate(cid, "who am I?"))
    # the view after the preamble is read again once (the notes changed), then appends
    assert final.stats.prefilled_tokens > 100
    again, _ = runner.run(cmd.Generate(cid, "and now?"))
    assert again.stats.prefilled_tokens <= turn_tokens(small_model, "and now?") + 1


def test_notes_cli_per_scene_seat(parley_home, capsys):
    with Catalog() as catalog:
        sid = catalog.create_conversation(None, kind="scene", title="Room", members=["ann", "bob"])
    assert main(["notes", "--conversation", str(sid), "--seat", "ann", "--set", "Ann owes Bob a coin."]) == 0
    capsys.readouterr()
    with Catalog() as catalog:
        assert conversation_notes(catalog, sid, "ann") == "Ann owes Bob a coin."
        assert conversation_notes(catalog, sid, "bob") == "" and conversation_notes(catalog, sid) == ""
    assert main(["notes", "--conversation", str(sid), "--seat", "zed"]) == 1
    assert "not a member" in capsys.readouterr().err
