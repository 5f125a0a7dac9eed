"""Lorebooks: the matcher's properties, the persona file's [lorebook], cards round-tripping their character_book."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ParleyError
from app.personas import load_personas, parse_persona_toml, preamble_messages, save_persona
from app.personas.cards import export_card, import_card, persona_to_card, read_card
from app.personas.lorebook import LoreEntry, Lorebook, key_pattern, lorebook_of, parse_book, triggered_entries

WORDS = ["moon", "Moon", "sword", "castle", "river", "dragon", "tea", "map"]


def count_words(text: str) -> int:
    return len(text.split())


def entry(i: int, key: str, content: str, order: int = 100, priority: int = 0, case_sensitive: bool = False,
          constant: bool = False, enabled: bool = True) -> LoreEntry:
    return LoreEntry(uid=f"#{i + 1}", name=f"e{i}", keys=(key,), content=content,
                     patterns=(key_pattern(key, case_sensitive, False),), constant=constant, enabled=enabled,
                     case_sensitive=case_sensitive, insertion_order=order, priority=priority, index=i)


entries_st = st.lists(
    st.tuples(st.sampled_from(WORDS), st.integers(1, 30), st.integers(-5, 5), st.integers(-3, 3), st.booleans(),
              st.booleans(), st.booleans()),
    max_size=12,
).map(lambda rows: tuple(
    entry(i, key, "x " * n, order, prio, case, constant, enabled)
    for i, (key, n, order, prio, case, constant, enabled) in enumerate(rows)
))
messages_st = st.lists(st.lists(st.sampled_from(WORDS + ["and", "the"]), max_size=6).map(" ".join), min_size=1, max_size=8)


def occurs(e: LoreEntry, text: str) -> bool:
    key = e.keys[0]
    return key in text if e.case_sensitive else key.lower() in text.lower()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(entries_st, messages_st, st.integers(0, 10), st.integers(0, 200), st.sets(st.sampled_from([f"#{i}" for i in range(1, 13)])))
def test_matcher_properties(entries, messages, depth, budget, present):
    book = Lorebook(entries, scan_depth=depth, token_budget=budget)
    got = triggered_entries(book, messages, count_words, present)
    scanned = "\n".join(messages[-depth:]) if depth else ""
    eligible = [e for e in entries if e.enabled and not e.constant and e.uid not in present and occurs(e, scanned)]
    # triggering: only eligible entries, each at most once
    assert all(e in eligible for e in got) and len({e.uid for e in got}) == len(got)
    # budget: never over, and nothing left out that would still have fitted after the higher-ranked ones
    assert sum(count_words(e.content) for e in got) <= budget
    used = 0
    for e in sorted(eligible, key=lambda e: (-e.priority, e.insertion_order, e.index)):
        fits = used + count_words(e.content) <= budget
        assert (e in got) == fits
        used += count_words(e.content) if fits else 0
    # order: insertion order, then position in the book
    assert got == sorted(got, key=lambda e: (e.insertion_order, e.index))


@given(messages_st)
def test_unlimited_budget_triggers_exactly_the_mentioned_entries(messages):
    entries = tuple(entry(i, w, f"about {w}") for i, w in enumerate(WORDS))
    got = triggered_entries(Lorebook(entries, scan_depth=len(messages), token_budget=10_000), messages, count_words)
    assert {e.keys[0] for e in got} == {w for w in WORDS if w.lower() in " ".join(messages).lower()}


def test_scan_depth_case_and_regex_keys():
    book = parse_book({"scan_depth": 2, "entries": [
        {"keys": ["Moon"], "case_sensitive": True, "content": "The moon is red."},
        {"keys": ["/drag(on|ons)\\b/i"], "content": "Dragons sleep.", "name": "Dragons"},
        {"keys": ["riv.r"], "use_regex": True, "content": "A river."},
        {"keys": ["castle"], "content": "Old castle.", "constant": True},
    ]}, "test", strict=True)
    names = lambda msgs: [e.name for e in triggered_entries(book, msgs, count_words)]  # noqa: E731
    assert names(["the moon rises"]) == []  # case-sensitive key
    assert names(["the Moon rises"]) == ["Moon"]
    assert names(["DRAGONS!"]) == ["Dragons"]
    assert names(["a river"]) == ["riv.r"] and names(["a rivXr"]) == ["riv.r"] and names(["a rover"]) == []
    assert names(["Moon", "x", "y"]) == []  # beyond scan depth 2
    assert names(["a castle"]) == []  # constant entries are in the preamble, never triggered
    assert [e.content for e in book.constant_entries()] == ["Old castle."]


def test_bad_lorebook_in_a_persona_file_names_the_entry_and_field():
    base = 'id = "p"\nname = "P"\n[lorebook]\n[[lorebook.entries]]\ncontent = "x"\n'
    with pytest.raises(ParleyError, match=r"lorebook entry 1.*regular expression"):
        parse_persona_toml((base + 'keys = ["/(/"]\n').encode(), "p.toml")
    with pytest.raises(ParleyError, match=r"lorebook entry 1: field 'constant' must be true or false"):
        parse_persona_toml((base + 'keys = ["a"]\nconstant = "yes"\n').encode(), "p.toml")
    with pytest.raises(ParleyError, match=r"scan_depth"):
        parse_persona_toml('id = "p"\nname = "P"\n[lorebook]\nscan_depth = -1\n'.encode(), "p.toml")


def test_card_lorebook_is_lenient_but_skips_bad_entries():
    book = parse_book({"entries": [{"keys": ["/(/"], "content": "bad"}, {"keys": ["ok"], "content": "good"}]}, "card")
    assert [e.content for e in book.entries] == ["good"]
    huge = {"entries": [{"keys": ["k"], "content": "c"}] * 1500}
    assert len(parse_book(huge, "card").entries) == 1000  # an oversized card book is cut, never refused
    with pytest.raises(ParleyError, match="at most 1000"):
        parse_book(huge, "p.toml", strict=True)


def test_constant_entries_join_the_preamble():
    persona, _ = parse_persona_toml(
        b'id = "p"\nname = "P"\n[lorebook]\n[[lorebook.entries]]\nkeys = []\nconstant = true\n'
        b'content = "{{char}} lives in Vell."\n', "p.toml")
    assert "P lives in Vell." in preamble_messages(persona)[0]["content"]


CARD_BOOK = {
    "name": "World", "description": "", "scan_depth": 3, "token_budget": 200, "recursive_scanning": False,
    "extensions": {"st": {"x": 1}},
    "entries": [
        {"keys": ["glade"], "content": "A quiet place.", "extensions": {"position": 4}, "enabled": True,
         "insertion_order": 10, "case_sensitive": False, "name": "Glade", "priority": 5, "id": 7,
         "comment": "c", "selective": True, "secondary_keys": ["tree"], "constant": False, "position": "after_char"},
        {"keys": ["/moon/i"], "content": "Moon lore", "extensions": {}, "enabled": True, "insertion_order": "3",
         "use_regex": True},
    ],
}


def card_with_book():
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Seraphina", "description": "{{char}} guards the forest.", "first_mes": "Hello, {{user}}.",
        "mes_example": "", "personality": "", "scenario": "", "creator_notes": "", "system_prompt": "",
        "post_history_instructions": "", "alternate_greetings": [], "tags": [], "creator": "", "character_version": "",
        "extensions": {}, "character_book": CARD_BOOK}}


@pytest.mark.parametrize("suffix", [".json", ".png"])
def test_card_lorebook_round_trips_through_the_persona_file_and_export(tmp_path, suffix):
    src = tmp_path / "card.json"
    src.write_text(json.dumps(card_with_book()))
    persona = import_card(src, tmp_path / "user")
    text = persona.source.read_text()
    assert "[[lorebook.entries]]" in text and 'content = "A quiet place."' in text  # editable, not buried in JSON
    loaded = load_personas([tmp_path / "user"]).personas[persona.id]
    assert loaded.card["character_book"] == CARD_BOOK
    out = export_card(loaded, tmp_path / f"out{suffix}")
    again = read_card(out.read_bytes(), str(out))
    assert again.card["character_book"] == CARD_BOOK
    assert persona_to_card(again)["data"]["character_book"] == CARD_BOOK
    # the odd entry (insertion_order as text) is kept for export but does not stop the good one from working
    assert [e.name for e in lorebook_of(loaded).entries] == ["Glade"]


def test_edited_lorebook_in_the_persona_file_is_used_and_saved_back(tmp_path):
    text = b'''id = "p"
name = "P"
[lorebook]
scan_depth = 2
token_budget = 50
[[lorebook.entries]]
name = "Moon"
keys = ["moon", "/lunar?/i"]
content = "The moon is red here."
insertion_order = 5
'''
    persona, warnings = parse_persona_toml(text, "p.toml")
    assert warnings == []
    book = lorebook_of(persona)
    assert (book.scan_depth, book.token_budget) == (2, 50)
    assert [e.name for e in triggered_entries(book, ["LUNA"], count_words)] == ["Moon"]
    save_persona(persona, tmp_path)
    again = load_personas([tmp_path]).personas["p"]
    assert again.card == persona.card
