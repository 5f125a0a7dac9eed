"""Lorebook entries in a running conversation (tiny model): they enter at the end and never force a re-read."""

from __future__ import annotations

import json

import pytest

from app.catalog import Catalog
from app.engine import commands as cmd
from app.engine import events as ev
from tests.engine_helpers import write_persona

LORE = '''
[lorebook]
scan_depth = 2
token_budget = 200

[[lorebook.entries]]
name = "Moon"
keys = ["moon"]
content = "In this world the moon is red and {{user}} fears it."

[[lorebook.entries]]
name = "Harbour"
keys = ["/harbou?r/i"]
content = "The harbour of Vell is closed at night."
insertion_order = 1
'''


@pytest.fixture
def personas_dir(tmp_path):
    folder = tmp_path / "personas"
    write_persona(folder, "keeper")
    with open(folder / "keeper.toml", "a") as f:
        f.write(LORE)
    return folder


def new_conversation() -> int:
    with Catalog() as catalog:
        return catalog.create_conversation("keeper")


def turn_tokens(tiny_model_dir, *messages: dict) -> int:
    """Tokens of the new messages of a turn as the template renders them after a reply."""
    from app.model.chat_tokenizer import ChatTokenizer

    tok = ChatTokenizer(tiny_model_dir)
    head = [{"role": "system", "content": "x"}]
    return len(tok.encode_chat(head + list(messages))) - len(tok.encode_chat(head, add_generation_prompt=False)) + 1


def test_triggered_entries_enter_at_the_end_and_prefill_only_the_new_tokens(runner, tiny_model_dir):
    cid = new_conversation()
    runner.run(cmd.Generate(cid, "Good evening"))
    final, events = runner.run(cmd.Generate(cid, "Look at the MOON over the Harbor"))
    added = [e for e in events if isinstance(e, ev.LoreAdded)]
    assert len(added) == 1 and added[0].entries == ("Harbour", "Moon")  # insertion order
    note = "The harbour of Vell is closed at night.\n\nIn this world the moon is red and User fears it."
    new = turn_tokens(tiny_model_dir, {"role": "user", "content": "Look at the MOON over the Harbor"},
                      {"role": "system", "content": note})
    assert final.stats.cache == "ram"
    assert final.stats.prefilled_tokens <= new + 1  # the note costs only its own tokens
    with Catalog() as catalog:
        path = catalog.current_path(cid)
    assert [i["name"] for i in path[-2].meta["lore"]] == ["Harbour", "Moon"]
    # the next turn appends again: the note stays where it entered, nothing before it is read again
    after, events = runner.run(cmd.Generate(cid, "Is the moon still up?"))  # already present: not added twice
    assert not any(isinstance(e, ev.LoreAdded) for e in events)
    assert after.stats.prefilled_tokens <= turn_tokens(tiny_model_dir, {"role": "user", "content": "Is the moon still up?"}) + 1
    assert after.stats.reused_tokens >= final.stats.reused_tokens + final.stats.prefilled_tokens + final.stats.generated_tokens - 1


def test_regenerate_keeps_the_stored_entries(runner):
    cid = new_conversation()
    first, _ = runner.run(cmd.Generate(cid, "the moon"))
    again, events = runner.run(cmd.Regenerate(cid))
    assert not any(isinstance(e, ev.LoreAdded) for e in events)
    assert again.stats.reused_tokens >= first.stats.reused_tokens + first.stats.prefilled_tokens - 1


def test_cli_chat_json_lists_the_lore(tiny_model_dir, parley_home, personas_dir, capsys):
    import shutil

    from app.cli import main

    (parley_home / "personas").mkdir(parents=True, exist_ok=True)
    shutil.copy(personas_dir / "keeper.toml", parley_home / "personas" / "keeper.toml")
    assert main(["--model", str(tiny_model_dir), "chat", "keeper", "a red moon", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lore"] == ["Moon"]
    assert main(["--model", str(tiny_model_dir), "chat", "keeper", "hello", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lore"] == []
