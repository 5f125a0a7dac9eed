"""One store for the cache records (app.catalog.caches): the only SQL on the cache tables, one key builder,
one cache-state type with one rule (RAM beats disk beats none)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.catalog import Catalog
from app.catalog.caches import (CacheStore, CacheSummary, cache_states_by_persona, context_start,
                                conversation_cache_state, conversation_key, preamble_key, set_context_start)

APP = Path(__file__).resolve().parent.parent / "app"
CACHE_TABLE = re.compile(r"\b(caches|cache_blocks|context_starts)\b", re.IGNORECASE)
SQL = re.compile(r"\b(select|insert|update|delete|replace)\b", re.IGNORECASE)
STORE_MODULES = {"catalog/caches.py", "catalog/cache_schema.py"}  # the store, and the migration that made the tables


@dataclass(frozen=True)
class RamState:  # what app.engine.events.CacheState carries (the catalog cannot import the engine)
    conversation_id: int
    persona_id: str
    tokens: int
    bytes: int


def string_literals(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def test_no_sql_on_the_cache_tables_outside_the_store():
    offenders = [f"{f.relative_to(APP)}:{line}: {text.strip()[:70]}"
                 for f in sorted(APP.rglob("*.py")) if str(f.relative_to(APP)) not in STORE_MODULES
                 for line, text in string_literals(f) if CACHE_TABLE.search(text) and SQL.search(text)]
    assert not offenders, "route these through app.catalog.caches.CacheStore:\n" + "\n".join(offenders)


def test_cache_keys_are_built_in_one_place():
    """A literal "conv:..." or "pre:..." key anywhere else would drift from `conversation_key` / `preamble_key`."""
    offenders = []
    for f in sorted(APP.rglob("*.py")):
        if str(f.relative_to(APP)) == "catalog/caches.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                head = str(node.values[0].value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                head = node.value
            else:
                continue
            if head.startswith(("conv:", "pre:")):
                offenders.append(f"{f.relative_to(APP)}:{node.lineno}")
    assert not offenders, offenders


def test_the_sql_check_sees_what_it_should():
    """The pattern the scan above relies on: cache-table SQL matches, prose about caches does not."""
    assert CACHE_TABLE.search("select key from caches where key = ?") and SQL.search("select key from caches")
    assert CACHE_TABLE.search("DELETE FROM cache_blocks WHERE hash = ?")
    assert not (CACHE_TABLE.search("the caches of a persona") and SQL.search("the caches of a persona"))


def test_keys():
    assert conversation_key(7) == "conv:7"
    assert conversation_key(7, "ann") == "conv:7:ann"
    assert preamble_key("ann", "0123456789abcdef0123") == "pre:ann:0123456789abcdef"


@pytest.fixture
def store():
    catalog = Catalog()
    yield CacheStore(catalog)
    catalog.close()


def write(store, key, conversation_id, persona_id, tokens=300, size=1000, chain=("a", "b"), blocks=()):
    store.write(key, conversation_id, persona_id, "fp", "q4", tokens, list(chain), f"{key}.tail", 44, size,
                new_blocks=blocks)


def test_write_read_and_delete_records(store):
    cid = store.catalog.create_conversation("ann")
    write(store, conversation_key(cid), cid, "ann", blocks=[("a", 256, 600), ("b", 256, 700)])
    record = store.record(conversation_key(cid))
    assert (record.conversation_id, record.persona_id, record.tokens, record.chain) == (cid, "ann", 300, ["a", "b"])
    assert store.known_blocks(["a", "b", "c"]) == {"a": 600, "b": 700}
    assert store.referenced_blocks() == {"a", "b"}
    assert store.keys_of_conversation(cid) == {conversation_key(cid)}
    assert store.keys_of_persona("ann") == [conversation_key(cid)]
    assert [r.key for r in store.records("fp", "q4")] == [conversation_key(cid)] and not store.records("other", "q4")
    store.delete(conversation_key(cid))
    store.delete_block("a")
    assert store.record(conversation_key(cid)) is None and [b.hash for b in store.blocks()] == ["b"]


def test_a_record_of_a_deleted_conversation_is_refused(store):
    import sqlite3

    cid = store.catalog.create_conversation("ann")
    store.catalog.delete_conversation(cid)
    with pytest.raises(sqlite3.IntegrityError):
        write(store, conversation_key(cid), cid, "ann", blocks=[("a", 256, 600)])
    assert store.blocks() == []  # the block rows of that save went with it (one transaction)


def test_server_caches_beyond_the_newest_are_named(store):
    for n in range(5):
        write(store, f"srv:{n}", None, "server")
    write(store, "srv_not_a_server_key", None, "server")  # '_' is not a LIKE wildcard here
    assert sorted(store.keys_beyond_newest("srv:", 2)) == ["srv:0", "srv:1", "srv:2"]


def test_context_start_per_speaker():
    with Catalog() as catalog:
        cid = catalog.create_conversation("ann")
        assert context_start(catalog, cid) == 0
        set_context_start(catalog, cid, 5)
        set_context_start(catalog, cid, 9, "bob")
        set_context_start(catalog, cid, 6)
        assert (context_start(catalog, cid), context_start(catalog, cid, "bob")) == (6, 9)


def test_cache_state_per_persona_adds_up_disk_and_ram_beats_it(store):
    a1, a2, b1 = (store.catalog.create_conversation(p) for p in ("ann", "ann", "bob"))
    write(store, conversation_key(a1), a1, "ann", tokens=100, size=10)
    write(store, conversation_key(a2), a2, "ann", tokens=200, size=20)
    write(store, conversation_key(b1), b1, "bob", tokens=50, size=5)
    write(store, preamble_key("bob", "f" * 16), None, "bob", tokens=999, size=999)  # not a conversation's
    rows = store.conversation_rows()
    assert len(rows) == 3
    assert cache_states_by_persona(rows) == {"ann": CacheSummary("disk", 300, 30, a2), "bob": CacheSummary("disk", 50, 5, b1)}
    ram = [RamState(b1, "bob", 70, 9)]
    assert cache_states_by_persona(rows, ram) == {"ann": CacheSummary("disk", 300, 30, a2), "bob": CacheSummary("ram", 70, 9, b1)}
    assert conversation_cache_state(a1, rows, ram) == CacheSummary("disk", 100, 10, a1)
    assert conversation_cache_state(b1, rows, ram) == CacheSummary("ram", 70, 9, b1)
    assert conversation_cache_state(9999, rows, ram) == CacheSummary()


def test_scene_seats_count_per_member(store):
    scene = store.catalog.create_conversation(None, kind="scene", members=["ann", "bob"])
    write(store, conversation_key(scene, "ann"), scene, "ann", tokens=10, size=1)
    write(store, conversation_key(scene, "bob"), scene, "bob", tokens=20, size=2)
    rows = store.conversation_rows()
    ram = [RamState(scene, "bob", 25, 3)]
    assert conversation_cache_state(scene, rows, ram, persona_id="ann").where == "disk"
    assert conversation_cache_state(scene, rows, ram, persona_id="bob") == CacheSummary("ram", 25, 3, scene)
    assert cache_states_by_persona(rows, ram) == {"ann": CacheSummary("disk", 10, 1, scene),
                                                  "bob": CacheSummary("ram", 25, 3, scene)}


def test_one_cache_state_type_the_ui_defines_none_of_its_own():
    """The catalog's CacheSummary is the only cache-state class: a second copy (the UI had one) drifts from the rule."""
    copies = [f"{f.relative_to(APP)}:{node.lineno}" for f in sorted(APP.rglob("*.py"))
              if f.relative_to(APP).parts[0] != "catalog"
              for node in ast.walk(ast.parse(f.read_text(), str(f)))
              if isinstance(node, ast.ClassDef) and "CacheSummary" in node.name]
    assert copies == [], f"a cache-state class outside app/catalog (use app.catalog.caches.CacheSummary): {copies}"
